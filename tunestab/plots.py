"""The report's plots (matplotlib, Agg): final loss against LR, P(diverge | LR) with the max
stable LR, final loss against a searched architecture parameter, and TEV over training. Each
strategy's own plots are in its module (the scale strategy's frontier)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .bracket import bracket
from .outcome import TEV_DISPERSION, TEV_MEAN, TEV_STD, dispersion, is_stable
from .tables import ran, stable_mask


def plot_loss_vs_lr(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, t in table.groupby("variant"):
        t = t.sort_values("lr")
        ok = stable_mask(t)
        (line,) = ax.plot(t[ok]["lr"], t[ok]["val_loss"], "o-", label=v)
        bad = t[~ok]
        ax.plot(
            bad["lr"],
            [t[ok]["val_loss"].max() if ok.any() else 0] * len(bad),
            "x",
            color=line.get_color(),
            markersize=9,
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title("final loss against LR (x: diverged or stopped by TEV)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_p_diverge(table: pd.DataFrame, fits: dict, path: Path) -> None:
    """Per variant: each trial as a point at 1 (diverged or stopped by TEV) or 0 (completed),
    the posterior median of P(diverge | LR) with its 90% band, and the max stable LR with its
    interval, which the median curve crosses at P = p (boundary.Boundary.curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [v for v, f in fits.items() if f.found]
    fig, axes = plt.subplots(len(found), 1, figsize=(7, 1.9 * len(found) + 0.6), sharex=True, squeeze=False)
    for ax, v in zip(axes[:, 0], found):
        f, t = fits[v], ran(table[table["variant"] == v])
        div = (~stable_mask(t)).astype(float)
        jitter = np.random.default_rng(0).uniform(-0.04, 0.04, len(t))
        ax.scatter(t["lr"], div + jitter, s=14, c=np.where(div > 0, "tab:red", "tab:blue"), alpha=0.7)
        lrs, ps = zip(*f.curve)
        if f.band:
            blrs, lows, highs = zip(*f.band)
            ax.fill_between(blrs, lows, highs, color="grey", alpha=0.2, lw=0)
        ax.plot(lrs, ps, color="black", lw=1.2)
        ax.axhline(f.p, color="grey", lw=0.6, ls=":")
        if f.has_interval:
            ax.axvspan(f.low, f.high, color="tab:green", alpha=0.15)
            ax.axvline(f.lr, color="tab:green", lw=1.2)
            ax.plot([f.lr], [f.p], marker="o", color="tab:green", ms=4)  # where the median curve crosses p
            answer = f"max stable LR {f.lr:.3g} [{f.low:.3g}, {f.high:.3g}]"
        else:
            # Too few seeds for a fitted point: the answer is the bracket, drawn as it is.
            b = bracket(list(zip(t["lr"], ~div.astype(bool))))
            if b.stable is not None and b.divergent is not None:
                ax.axvspan(b.stable, b.divergent, color="tab:green", alpha=0.3)
            answer = f"max stable LR in [{b.stable or math.nan:.3g}, {b.divergent or math.nan:.3g}] (bracket)"
        ax.set_ylabel("P(diverge)")
        ax.set_title(f"{v}: {answer} from {f.trials} trials, {f.seeds} seeds", fontsize=9)
        ax.set_xscale("log")
    axes[-1, 0].set_xlabel("learning rate")
    fig.suptitle("P(diverge | LR): posterior median (line) and 90% band (grey)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params_vs_loss(table: pd.DataFrame, names: list[str], path: Path) -> None:
    """Final validation loss against each searched architecture parameter (an MLRA rank, a softmax
    cap, a depth), coloured by LR; trials that diverged or were stopped by TEV are drawn as x at
    their initial loss, so a setting that only trains at low LR stands out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    ok = stable_mask(table)
    norm = LogNorm(vmin=table["lr"].min(), vmax=max(table["lr"].max(), table["lr"].min() * 1.01))
    for ax, name in zip(axes[0], names):
        sc = ax.scatter(table[ok][name], table[ok]["val_loss"], c=table[ok]["lr"], norm=norm, cmap="viridis")
        bad = table[~ok]
        ax.scatter(bad[name], bad["loss_init"], c=bad["lr"], norm=norm, cmap="viridis", marker="x", s=60)
        ax.set_xlabel(name)
        ax.set_ylabel("final validation loss (x: diverged or TEV-stopped, at l0)")
    fig.colorbar(sc, ax=axes[0].tolist(), label="learning rate")
    fig.suptitle(f"final loss against {', '.join(names)}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tev_curves(grid, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for r in grid:
        df = r.metrics_dataframe
        if df is None or "tev_mean" not in df or r.metrics is None:
            continue
        # A run that ended no better than its floor (no_progress) trained to the end but failed.
        stable = is_stable(r.metrics)
        style = {"color": "tab:blue" if stable else "tab:red", "alpha": 0.7, "lw": 1}
        axes[0].plot(df["step"], df["tev_mean"], **style)
        # The worker's own sigma/mu; runs recorded before it reported one, from its parts.
        spread = (
            df[TEV_DISPERSION]
            if TEV_DISPERSION in df
            else [dispersion(m, s) for m, s in zip(df[TEV_MEAN], df[TEV_STD])]
        )
        axes[1].plot(df["step"], spread, **style)
    axes[0].set_ylabel("μ_TEV")
    axes[1].set_ylabel("σ_TEV / μ_TEV")
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle("TEV of trials that failed (diverged, no progress, or stopped: red) and that completed (blue)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
