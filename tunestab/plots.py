"""The report's plots (matplotlib, Agg): final loss against LR, P(diverge | LR) with the max
stable LR, final loss against a searched architecture parameter, and TEV over training. Each
strategy's own plots are in its module (the scale strategy's frontier)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .bracket import bracket
from .outcome import OUTCOME, TEV_DISPERSION, TEV_MEAN, TEV_STD, Outcome, dispersion, outcome
from .tables import outcomes, ran

# One meaning per colour across every plot of a search: a variant's own colour (none of them green
# or red), green for the reported answer, grey and black for fitted curves. How a run ended is a
# marker on points and a line style on curves, the same in every plot.
PALETTE = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "navy")
ANSWER = "tab:green"
MARKERS = {Outcome.STABLE: "o", Outcome.DIVERGED: "x", Outcome.STOPPED_BY_TEV: "^"}
LINES = {Outcome.STABLE: "-", Outcome.DIVERGED: "--", Outcome.STOPPED_BY_TEV: ":"}
FAILED_AT = "a failed run (x diverged, ^ stopped by TEV) is drawn at its initial loss l0"


def variant_colours(variants) -> dict[str, str]:
    """The colour of each variant, the same in every plot: by its name's sorted order."""
    names = sorted({str(v) for v in variants})
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(names)}


def ran_with_outcomes(table: pd.DataFrame) -> pd.DataFrame:
    """The runs that ran (tables.ran), each with its `outcome` column."""
    t = ran(table)
    return t.assign(**{OUTCOME: outcomes(t)})


def log_lr_axis(ax) -> None:
    """A log LR axis labelled at 1, 2 and 5 of each decade, without the minor labels that
    overlap when the range spans less than a decade or two."""
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("learning rate")


def plot_loss_vs_lr(table: pd.DataFrame, path: Path) -> None:
    """Final validation loss against LR per variant (its colour): stable runs joined by a line;
    failed ones at their l0, the loss a diverged run is scored at (Wortsman et al.'s clip)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = variant_colours(table["variant"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, t in ran_with_outcomes(table).groupby("variant"):
        for o, g in t.sort_values("lr").groupby(OUTCOME, sort=False):
            o = Outcome(o)
            if o not in MARKERS:
                continue
            y = g["val_loss"] if o == Outcome.STABLE else g["loss_init"]
            ax.plot(
                g["lr"],
                y,
                marker=MARKERS[o],
                ls="-" if o == Outcome.STABLE else "none",
                color=colours[v],
                markersize=6 if o == Outcome.STABLE else 9,
                label=f"{v}: {o.value}",
            )
    log_lr_axis(ax)
    ax.set_ylabel("final validation loss")
    ax.set_title(f"final loss against LR; {FAILED_AT}", fontsize=9)
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
    colours = variant_colours(table["variant"])
    fig, axes = plt.subplots(len(found), 1, figsize=(7, 1.9 * len(found) + 0.6), sharex=True, squeeze=False)
    for ax, v in zip(axes[:, 0], found):
        f, t = fits[v], ran_with_outcomes(table[table["variant"] == v])
        div = (t[OUTCOME] != Outcome.STABLE).astype(float)
        jitter = np.random.default_rng(0).uniform(-0.04, 0.04, len(t))
        for o, marker in MARKERS.items():
            at = (t[OUTCOME] == o).to_numpy()
            ax.scatter(
                t["lr"][at],
                (div + jitter)[at],
                s=18,
                marker=marker,
                color=colours[v],
                alpha=0.8,
                label=f"{v}: {o.value}",
            )
        lrs, ps = zip(*f.curve)
        if f.band:
            blrs, lows, highs = zip(*f.band)
            ax.fill_between(blrs, lows, highs, color="grey", alpha=0.2, lw=0)
        ax.plot(lrs, ps, color="black", lw=1.2)
        ax.axhline(f.p, color="grey", lw=0.6, ls=":")
        if f.has_interval:
            ax.axvspan(f.low, f.high, color=ANSWER, alpha=0.15)
            ax.axvline(f.lr, color=ANSWER, lw=1.2)
            ax.plot([f.lr], [f.p], marker="o", color=ANSWER, ms=4)  # where the median curve crosses p
            answer = f"max stable LR {f.lr:.3g} [{f.low:.3g}, {f.high:.3g}]"
        else:
            # Too few seeds for a fitted point: the answer is the bracket, drawn as it is.
            b = bracket(list(zip(t["lr"], ~div.astype(bool))))
            if b.stable is not None and b.divergent is not None:
                ax.axvspan(b.stable, b.divergent, color=ANSWER, alpha=0.3)
            answer = f"max stable LR in [{b.stable or math.nan:.3g}, {b.divergent or math.nan:.3g}] (bracket)"
        ax.set_ylabel("P(diverge)")
        ax.set_title(f"{v}: {answer} from {f.trials} trials, {f.seeds} seeds", fontsize=9)
        log_lr_axis(ax)
    fig.suptitle(
        "P(diverge | LR): posterior median (line), 90% band (grey), the answer (green);\n"
        "runs at 1 (x diverged, ^ stopped by TEV) or 0 (o stable)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params_vs_loss(table: pd.DataFrame, names: list[str], path: Path) -> None:
    """Final validation loss against each searched architecture parameter (an MLRA rank, a softmax
    cap, a depth), per variant (its colour); failed runs at their l0, so a setting that only
    trains at low LR stands out. A larger marker is a higher LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = variant_colours(table["variant"])
    t = ran_with_outcomes(table)
    ln_lr = np.log(t["lr"].astype(float))
    size = 20 + 80 * (ln_lr - ln_lr.min()) / max(float(ln_lr.max() - ln_lr.min()), 1e-12)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for (v, o), g in t.groupby(["variant", OUTCOME]):
            o = Outcome(o)
            if o not in MARKERS:
                continue
            y = g["val_loss"] if o == Outcome.STABLE else g["loss_init"]
            ax.scatter(g[name], y, s=size[g.index], marker=MARKERS[o], color=colours[v], label=f"{v}: {o.value}")
        ax.set_xlabel(name)
        ax.set_ylabel("final validation loss")
        ax.legend(fontsize=7)
    fig.suptitle(f"final loss against {', '.join(names)}; a larger marker is a higher LR;\n{FAILED_AT}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tev_curves(grid, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    colours = variant_colours(r.config.get("variant") for r in grid)
    for r in grid:
        df = r.metrics_dataframe
        if df is None or "tev_mean" not in df or r.metrics is None:
            continue
        # A run that ended no better than its floor (no_progress) trained to the end but failed.
        o = outcome(r.metrics)
        if o not in LINES:
            continue
        v = str(r.config.get("variant"))
        style = {"color": colours[v], "ls": LINES[o], "alpha": 0.7, "lw": 1, "label": f"{v}: {o.value}"}
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
    fig.suptitle(
        "TEV per run, in its variant's colour: solid stable, dashed diverged (or no progress), dotted stopped by TEV",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
