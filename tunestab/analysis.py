"""After a search: the trial table, the max stable LR per variant with its interval, ratios
between variants, plots, and all of it on the MLflow parent run.

The max stable LR of a variant is where P(diverge | LR), fitted to all its trials across seeds,
crosses 10% (tunestab/boundary.py), with a 90% interval. A trial that diverged or was stopped by
the TEV scheduler counts as divergent. The bracket [largest stable, smallest divergent] of
tunestab/bracket.py is reported beside it.
"""

from __future__ import annotations

import math
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from . import boundary
from .bracket import bracket
from .metrics import FINITE_CAP
from .tracking import INCOMPLETE_FILE

COLUMNS = ["trial_id", "variant", "lr", "seed", "stop_reason", "diverged", "tev_stop_step", "step", "loss",
           "val_loss", "loss_init", "tev_mean", "tev_std"]
# Fixed after the variant, the LR and the seed: the searched parameters go between them and these.
FIXED = 4


# With LR range tests (max_lr.range_test): which trials were range tests, and where each failed.
RANGE_COLUMNS = ["lr_schedule", "range_lr"]


def range_tests(space) -> bool:
    return space.strategy in ("max_lr", "scale") and space.max_lr.range_test


# With the scale strategy: which size a trial trained, and its final max attention logit (the
# second predictor's input, tunestab/scaling.py).
SCALE_COLUMNS = ["size", "attn_logit_max"]


def trial_table(space, grid) -> pd.DataFrame:
    rows = []
    for r in grid:
        if r.metrics is None:
            continue
        m, c = r.metrics, r.config
        row = {"trial_id": m.get("trial_id"), "variant": c.get("variant"), "lr": c.get("lr"),
               "seed": c.get("seed", space.trial.get("seed", 0))}
        row.update({p.name: c.get(p.name) for p in space.params if p.name not in ("lr", "seed")})
        row.update({k: m.get(k) for k in COLUMNS[FIXED:]})
        row.update(lr_schedule=c.get("lr_schedule", "cosine"), range_lr=m.get("range_lr"))
        if space.strategy == "scale":
            row.update(size=space.scale.size_of(c), attn_logit_max=m.get("attn_logit_max"))
        if r.error is not None:
            row["stop_reason"] = "error"
        rows.append(row)
    extra = [p.name for p in space.params if p.name not in ("lr", "seed")]
    # Fixed columns, so that an empty search gives an empty table the summary can still read.
    return pd.DataFrame(rows, columns=COLUMNS[:FIXED] + extra + COLUMNS[FIXED:]
                        + (RANGE_COLUMNS if range_tests(space) else [])
                        + (SCALE_COLUMNS if space.strategy == "scale" else []))


def by_arm(table: pd.DataFrame) -> pd.DataFrame:
    """The scale strategy's table with `variant` as the arm, `variant@size`: what max_lr
    bracketed separately, and what the boundary fit and the summary take one by one."""
    return table.assign(variant=table["variant"].astype(str) + "@" + table["size"].astype(str))



def split_range_tests(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials at a fixed LR schedule, LR range tests): a range test is no outcome at an LR, so
    the bracket, the fit and the plots see only the first."""
    if "lr_schedule" not in table:
        return table, table.iloc[0:0]
    ranged = table["lr_schedule"] == "range"
    return table[~ranged], table[ranged]


def stable_mask(table: pd.DataFrame) -> pd.Series:
    """Trials that completed their budget without diverging (a TEV stop is not stable)."""
    return (table["stop_reason"] == "completed") & (table["diverged"] == 0)


def boundaries(table: pd.DataFrame, variants, p: float = boundary.P_DIVERGE) -> dict[str, boundary.Boundary]:
    """Per variant, P(diverge | LR) fitted to all its trials that ran (tunestab/boundary.py)."""
    out = {}
    for v in variants:
        ran = table[(table["variant"] == v) & (table["stop_reason"] != "error")]
        # Each variant's posterior draws from its own generator, so ratios pair independent draws.
        out[v] = boundary.fit(ran["lr"].astype(float), ~stable_mask(ran), ran["seed"], p,
                              rng=np.random.default_rng(zlib.crc32(str(v).encode())))
    return out


SUMMARY_COLUMNS = ["variant", "max_stable_lr", "max_stable_lr_low", "max_stable_lr_high", "seeds", "trials",
                   "largest_stable_lr", "smallest_divergent_lr", "best_val_loss", "diverged", "tev_stops"]


def summary(table: pd.DataFrame, variants, fits: dict | None = None) -> pd.DataFrame:
    """One row per variant: the fitted max stable LR and its interval (when `fits` has it), the
    bracket, the best validation loss of a stable trial, and how the trials ended."""
    rows = []
    for v in variants:
        t = table[table["variant"] == v]
        ran = t[t["stop_reason"] != "error"]
        stable = stable_mask(ran)
        b = bracket(list(zip(ran["lr"], stable)))
        f = (fits or {}).get(v)
        rows.append({"variant": v, "max_stable_lr": f.lr if f else math.nan,
                     "max_stable_lr_low": f.low if f else math.nan, "max_stable_lr_high": f.high if f else math.nan,
                     "seeds": int(ran["seed"].nunique()), "trials": len(t),
                     "largest_stable_lr": b.stable, "smallest_divergent_lr": b.divergent,
                     "best_val_loss": ran[stable]["val_loss"].min() if stable.any() else math.nan,
                     "diverged": int((ran["diverged"] == 1).sum()), "tev_stops": int((ran["stop_reason"] == "tev").sum())})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# Rybakov et al. 2024's 1.5x claims compare these with qk_norm; every variant is also compared
# with the baseline.
RYBAKOV_PAIRS = (("qk_norm_cap", "qk_norm"), ("qkv_norm", "qk_norm"), ("qk_fc_norm", "qk_norm"))


def ratios(fits: dict[str, boundary.Boundary]) -> pd.DataFrame:
    """Max stable LR of one variant over another's, with the 90% interval of the ratio."""
    pairs = [(v, "baseline") for v in fits if v != "baseline" and "baseline" in fits]
    pairs += [(a, b) for a, b in RYBAKOV_PAIRS if a in fits and b in fits]
    rows = []
    for a, b in pairs:
        r, low, high = boundary.ratio(fits[a], fits[b])
        rows.append({"variant": a, "reference": b, "ratio": r, "ratio_low": low, "ratio_high": high})
    return pd.DataFrame(rows, columns=["variant", "reference", "ratio", "ratio_low", "ratio_high"])


def best_configs(table: pd.DataFrame, space) -> tuple[dict | None, pd.DataFrame]:
    """For `tune`: the stable trial with the lowest val_loss, and per configuration of the
    searched parameters other than lr, the largest LR that stayed stable."""
    keys = ["variant"] + [p.name for p in space.params if p.name != "lr"]
    stable = table[stable_mask(table)]
    best = None
    if len(stable):
        row = stable.loc[stable["val_loss"].idxmin()]
        best = {k: row[k].item() if hasattr(row[k], "item") else row[k] for k in keys + ["lr", "val_loss"]}
    per = stable.groupby(keys, dropna=False)["lr"].max().rename("max_stable_lr").reset_index()
    return best, per


def config_scores(table: pd.DataFrame, space) -> pd.DataFrame:
    """For `tune` over seeds: per configuration (the variant and the searched parameters), its
    seeds, the mean and sd over seeds of the objective Optuna saw (the final validation loss, or
    l0 for a trial that diverged or was stopped), and how many seeds diverged. Best first."""
    keys = ["variant"] + [p.name for p in space.params if p.name != "seed"]
    t = table[table["stop_reason"] != "error"].copy()
    t["objective"] = t["val_loss"].astype(float).where(stable_mask(t), t["loss_init"].astype(float))
    rows = []
    for key, g in t.groupby(keys, dropna=False):
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))), "seeds": len(g),
                     "objective_mean": g["objective"].mean(), "objective_sd": g["objective"].std(),
                     "diverged": int((~stable_mask(g)).sum())})
    out = pd.DataFrame(rows, columns=keys + ["seeds", "objective_mean", "objective_sd", "diverged"])
    return out.sort_values("objective_mean").reset_index(drop=True)


def separated(scores: pd.DataFrame) -> bool | None:
    """Whether the best configuration stands outside the seed spread of the runner-up: its mean
    plus one sd below the runner-up's mean minus one sd. None with fewer than two configurations
    of two or more seeds."""
    ranked = scores[scores["seeds"] >= 2]
    if len(ranked) < 2:
        return None
    best, second = ranked.iloc[0], ranked.iloc[1]
    return bool(best["objective_mean"] + best["objective_sd"] < second["objective_mean"] - second["objective_sd"])


# What lr_sensitivity measures per group; its other columns name the group.
SENSITIVITY_COLUMNS = ["lr_sensitivity", "best_lr", "best_val_loss", "lrs"]


def lr_sensitivity(table: pd.DataFrame, space) -> pd.DataFrame:
    """Wortsman et al. 2023's LR sensitivity, for a sweep over an LR grid: per variant (and per
    value of every other swept parameter but the seed),

        mean over the LR grid of min(loss(lr), l0)  -  min over the grid of loss(lr),

    with loss the final validation loss averaged over seeds, and l0 the loss at initialisation. A
    diverged or TEV-stopped trial counts as l0 (the clip), so a narrow stable range scores high.
    Lower is better; read it beside loss_vs_lr.png."""
    keys = ["variant"] + [p.name for p in space.params if p.name not in ("lr", "seed")]
    t = table[table["stop_reason"] != "error"].copy()
    if t.empty or t["lr"].nunique() < 2:
        return pd.DataFrame(columns=keys + SENSITIVITY_COLUMNS)
    l0 = t["loss_init"].astype(float)
    loss = t["val_loss"].astype(float).where(stable_mask(t), l0)
    t["clipped"] = loss.where(loss < l0, l0).fillna(l0)
    rows = []
    for key, g in t.groupby(keys, dropna=False):
        per_lr = g.groupby("lr")["clipped"].mean()
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                     "lr_sensitivity": per_lr.mean() - per_lr.min(), "best_lr": per_lr.idxmin(),
                     "best_val_loss": per_lr.min(), "lrs": len(per_lr)})
    return pd.DataFrame(rows)


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); NaN with fewer than 3 pairs
    or a constant series. Here, not scipy's, which is not a dependency."""
    d = pd.DataFrame({"x": x, "y": y}).astype(float).replace([math.inf, -math.inf], math.nan).dropna()
    if len(d) < 3:
        return math.nan
    return float(d["x"].rank().corr(d["y"].rank()))


def trial_spearman(grid, a: str = "tev_mean", b: str = "grad_var_embed") -> dict:
    """Per trial id: the Spearman correlation of metrics a and b over the trial's reports."""
    out = {}
    for r in grid:
        df = r.metrics_dataframe
        if r.metrics is not None and df is not None and a in df and b in df:
            # Reports held at FINITE_CAP stand for non-finite values: not a rank to correlate.
            keep = (df[a].abs() < FINITE_CAP) & (df[b].abs() < FINITE_CAP)
            out[r.metrics.get("trial_id")] = spearman(df[a][keep], df[b][keep])
    return out


# What sweep_cells measures per cell; its other columns name the cell.
CELL_COLUMNS = ["seeds", "diverged", "tev_flagged", "tev_mean", "tev_std", "val_ppl", "val_ppl_sd",
                "spearman_tev_gradvar"]


def sweep_cells(table: pd.DataFrame, space, rho: dict | None = None) -> pd.DataFrame:
    """For a sweep, Chung et al.'s table: per cell (the variant and every swept parameter but the
    seed), over its seeds: the runs that diverged (loss rule) and that TEV flagged (scheduler
    verdict, stop or shadow), and over the runs that did not diverge, the final mu_TEV, sigma_TEV
    and validation perplexity (mean, and sd of the perplexity) and the mean per-run Spearman
    correlation of mu_TEV with the embedding-gradient variance over training (`rho`)."""
    keys = ["variant"] + [p.name for p in space.params if p.name != "seed"]
    t = table[table["stop_reason"] != "error"].copy()
    if t.empty:
        return pd.DataFrame(columns=keys + CELL_COLUMNS)
    t["rho"] = t["trial_id"].map(rho or {}).astype(float)
    rows = []
    for key, g in t.groupby(keys, dropna=False, sort=True):
        ok = g[stable_mask(g)]
        ppl = ok["val_loss"].astype(float).map(math.exp)
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                     "seeds": len(g), "diverged": int((g["diverged"] == 1).sum() + (g["stop_reason"] == "tev").sum()),
                     "tev_flagged": int(g["tev_stop_step"].notna().sum()),
                     "tev_mean": ok["tev_mean"].mean(), "tev_std": ok["tev_std"].mean(),
                     "val_ppl": ppl.mean(), "val_ppl_sd": ppl.std(), "spearman_tev_gradvar": g["rho"].mean()})
    return pd.DataFrame(rows)


def fmt(x, spec=".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def interval(low, high) -> str:
    return "-" if pd.isna(low) or pd.isna(high) else f"[{fmt(low)}, {fmt(high)}]"


def summary_markdown(s: pd.DataFrame, p: float = boundary.P_DIVERGE) -> str:
    ranged = "range_test_lr" in s
    lines = [f"| variant | max stable LR (P(diverge) = {p:g}) | 90% interval | seeds | trials | bracket | "
             "best val loss | diverged | TEV stops |" + (" range test failed at |" if ranged else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if ranged else "")]
    for _, r in s.iterrows():
        lines.append(f"| {r['variant']} | {fmt(r['max_stable_lr'])} | {interval(r['max_stable_lr_low'], r['max_stable_lr_high'])} | "
                     f"{r['seeds']} | {r['trials']} | [{fmt(r['largest_stable_lr'])}, "
                     f"{fmt(r['smallest_divergent_lr'])}] | {fmt(r['best_val_loss'], '.4f')} | {r['diverged']} | "
                     f"{r['tev_stops']} |" + (f" {fmt(r['range_test_lr'])} |" if ranged else ""))
    return "\n".join(lines)


def ratios_markdown(r: pd.DataFrame) -> str:
    lines = ["| max stable LR of | over | ratio | 90% interval |", "|---|---|---|---|"]
    for _, row in r.iterrows():
        lines.append(f"| {row['variant']} | {row['reference']} | {fmt(row['ratio'])} | "
                     f"{interval(row['ratio_low'], row['ratio_high'])} |")
    return "\n".join(lines)


def plot_loss_vs_lr(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, t in table.groupby("variant"):
        t = t.sort_values("lr")
        ok = stable_mask(t)
        line, = ax.plot(t[ok]["lr"], t[ok]["val_loss"], "o-", label=v)
        bad = t[~ok]
        ax.plot(bad["lr"], [t[ok]["val_loss"].max() if ok.any() else 0] * len(bad), "x", color=line.get_color(),
                markersize=9)
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
    the fitted P(diverge | LR), and the max stable LR with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [v for v, f in fits.items() if f.found]
    fig, axes = plt.subplots(len(found), 1, figsize=(7, 1.9 * len(found) + 0.6), sharex=True, squeeze=False)
    for ax, v in zip(axes[:, 0], found):
        f, t = fits[v], table[(table["variant"] == v) & (table["stop_reason"] != "error")]
        div = (~stable_mask(t)).astype(float)
        jitter = np.random.default_rng(0).uniform(-0.04, 0.04, len(t))
        ax.scatter(t["lr"], div + jitter, s=14, c=np.where(div > 0, "tab:red", "tab:blue"), alpha=0.7)
        lrs, ps = zip(*f.curve)
        ax.plot(lrs, ps, color="black", lw=1.2)
        if not math.isnan(f.low):
            ax.axvspan(f.low, f.high, color="tab:green", alpha=0.15)
        ax.axvline(f.lr, color="tab:green", lw=1.2)
        ax.axhline(f.p, color="grey", lw=0.6, ls=":")
        ax.set_ylabel("P(diverge)")
        interval = f"[{f.low:.3g}, {f.high:.3g}]" if not math.isnan(f.low) else "(no interval: fewer than 3 seeds)"
        ax.set_title(f"{v}: max stable LR {f.lr:.3g} {interval} from {f.trials} trials, {f.seeds} seeds", fontsize=9)
        ax.set_xscale("log")
    axes[-1, 0].set_xlabel("learning rate")
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
        # The colour says what stable_mask says: a run that ended no better than its floor
        # (no_progress) trained to the end but failed.
        stable = r.metrics.get("stop_reason") == "completed" and not r.metrics.get("diverged")
        style = {"color": "tab:blue" if stable else "tab:red", "alpha": 0.7, "lw": 1}
        axes[0].plot(df["step"], df["tev_mean"], **style)
        axes[1].plot(df["step"], df["tev_std"] / df["tev_mean"], **style)
    axes[0].set_ylabel("μ_TEV")
    axes[1].set_ylabel("σ_TEV / μ_TEV")
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle("TEV of trials that failed (diverged, no progress, or stopped: red) and that completed (blue)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SCALE_TABLE_COLUMNS = ["variant", "size", "role", "n_params", "max_stable_lr", "max_stable_lr_low",
                       "max_stable_lr_high", "predicted", "predicted_low", "predicted_high", "logit_predicted"]


def scale_table(space, table: pd.DataFrame, fits: dict) -> tuple[pd.DataFrame, dict]:
    """The scale strategy's answer. table: by_arm's table (range tests left out); fits: arm ->
    Boundary. Per variant and size (the target last): N without embeddings, the measured max
    stable LR with its interval (at the target only with scale.measure_target), and the fit's
    value there with its interval; at the target, Wortsman's logit predictor too. Returns the
    table and variant -> scaling.Frontier (None where fewer than two sizes have an interval)."""
    from . import scaling

    sizes, target = space.scale.sizes, next(iter(space.scale.target))
    lo, hi = space.param("lr").values
    rows, frontiers = [], {}
    for v in space.variants:
        n = {name: scaling.non_embedding_params(space.trial_config(v, **fields))
             for name, fields in space.scale.every_size.items()}
        used = [name for name in sizes if fits.get(f"{v}@{name}") is not None and fits[f"{v}@{name}"].samples]
        fr = scaling.fit_frontier([math.log(n[x]) for x in used], [fits[f"{v}@{x}"].samples for x in used],
                                  math.log(n[target]), others=[math.log(n[x]) for x in sizes],
                                  rng=np.random.default_rng(zlib.crc32(str(v).encode())))
        frontiers[v] = fr
        completed = []
        for name in sizes:
            t = table[(table["variant"] == f"{v}@{name}") & (table["stop_reason"] != "error")]
            t = t[stable_mask(t)]
            completed.append((math.log(n[name]), t["lr"].astype(float).tolist(),
                              t["attn_logit_max"].astype(float).tolist()))
        logit = scaling.logit_predictor(completed, math.log(n[target]), lo, hi, space.scale.logit_threshold)
        for i, name in enumerate([*sizes, target]):
            f = fits.get(f"{v}@{name}")
            pred = (fr.at[i] if name != target else (fr.predicted, fr.low, fr.high)) if fr else (math.nan,) * 3
            rows.append({"variant": v, "size": name, "role": "target" if name == target else "fit",
                         "n_params": n[name], "max_stable_lr": f.lr if f else math.nan,
                         "max_stable_lr_low": f.low if f else math.nan, "max_stable_lr_high": f.high if f else math.nan,
                         "predicted": pred[0], "predicted_low": pred[1], "predicted_high": pred[2],
                         "logit_predicted": logit if name == target else math.nan})
    return pd.DataFrame(rows, columns=SCALE_TABLE_COLUMNS), frontiers


# The validation's goal (issue 18): the prediction interval no wider than one sqrt(2) step either side.
SQRT2_STEP = math.sqrt(2)


def scale_verdicts(t: pd.DataFrame) -> dict[str, dict]:
    """Per variant with a measured target: is the measured max stable LR inside the prediction
    interval, and is the interval within one sqrt(2) step either side of the prediction?"""
    out = {}
    for _, r in t[(t["role"] == "target") & t["max_stable_lr"].notna() & t["predicted"].notna()].iterrows():
        out[r["variant"]] = {"inside": bool(r["predicted_low"] <= r["max_stable_lr"] <= r["predicted_high"]),
                             "narrow": bool(r["predicted_high"] / r["predicted"] <= SQRT2_STEP * (1 + 1e-9)
                                            and r["predicted"] / r["predicted_low"] <= SQRT2_STEP * (1 + 1e-9))}
    return out


def scale_markdown(t: pd.DataFrame, frontiers: dict, threshold: float) -> str:
    lines = ["| variant | size | parameters (no embeddings) | measured max stable LR | 90% interval | "
             "line through the fitted sizes | 90% interval | logit predictor |", "|---|---|---|---|---|---|---|---|"]
    for _, r in t.iterrows():
        size = f"**{r['size']}** (target)" if r["role"] == "target" else r["size"]
        lines.append(f"| {r['variant']} | {size} | {r['n_params']:,} | {fmt(r['max_stable_lr'])} | "
                     f"{interval(r['max_stable_lr_low'], r['max_stable_lr_high'])} | {fmt(r['predicted'])} | "
                     f"{interval(r['predicted_low'], r['predicted_high'])} | "
                     f"{fmt(r['logit_predicted']) if r['role'] == 'target' else ''} |")
    lines.append("")
    for v, fr in frontiers.items():
        if fr is None:
            lines.append(f"- {v}: no fit (fewer than two sizes have a max stable LR with an interval)")
            continue
        fit = f"chi^2/dof about the line {fr.birge ** 2:.2f}" if not math.isnan(fr.birge) else "two sizes: no check of the line"
        lines.append(f"- {v}: max stable LR ~ N^{fr.alpha:.2f} [{fr.alpha_low:.2f}, {fr.alpha_high:.2f}] from "
                     f"{fr.sizes} sizes; {fit}" + (" (interval widened by its square root)" if fr.birge > 1 else ""))
    lines.append(f"- logit predictor: the lowest LR at which the max attention logit, extrapolated to the target "
                 f"size, reaches {threshold:g} ('-': it does not within the searched range)")
    return "\n".join(lines)


def plot_frontier(t: pd.DataFrame, frontiers: dict, path: Path) -> None:
    """The stability frontier: max stable LR against N (log-log) per variant, measured sizes with
    their intervals, the fitted line with its band out to the target, the region above the line
    (divergent) shaded, and the prediction at the target (star; diamond: the logit predictor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    top = np.nanmax(t[["max_stable_lr_high", "predicted_high", "max_stable_lr"]].to_numpy(dtype=float)) * 3
    for i, (v, g) in enumerate(t.groupby("variant", sort=False)):
        c = f"C{i}"
        fit, target = g[g["role"] == "fit"], g[g["role"] == "target"]
        ax.errorbar(fit["n_params"], fit["max_stable_lr"],
                    yerr=[fit["max_stable_lr"] - fit["max_stable_lr_low"], fit["max_stable_lr_high"] - fit["max_stable_lr"]],
                    fmt="o", color=c, capsize=3, label=f"{v}: measured")
        if target["max_stable_lr"].notna().any():
            ax.errorbar(target["n_params"], target["max_stable_lr"],
                        yerr=[target["max_stable_lr"] - target["max_stable_lr_low"],
                              target["max_stable_lr_high"] - target["max_stable_lr"]],
                        fmt="s", mfc="none", color=c, capsize=3, label=f"{v}: measured at the target (not fitted)")
        fr = frontiers.get(v)
        if fr is not None:
            n, mid, low, high = (np.array(a) for a in zip(*fr.line))
            ax.plot(n, mid, color=c, lw=1.2)
            ax.fill_between(n, low, high, color=c, alpha=0.18)
            ax.fill_between(n, mid, top, color=c, alpha=0.06)  # above the frontier: divergent
            ax.errorbar(target["n_params"], [fr.predicted], yerr=[[fr.predicted - fr.low], [fr.high - fr.predicted]],
                        fmt="*", ms=12, color=c, capsize=4, label=f"{v}: predicted {fr.predicted:.3g}")
        if target["logit_predicted"].notna().any():
            ax.plot(target["n_params"], target["logit_predicted"], "D", mfc="none", color=c, ms=8,
                    label=f"{v}: attention-logit predictor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top=top)
    ax.set_xlabel("parameters without embeddings, N")
    ax.set_ylabel("max stable learning rate")
    ax.set_title("Stability frontier (shaded above a variant's line: divergent; band: 90% interval)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(space, grid, tracking_uri: str, parent_run_id: str, run_dir: Path) -> pd.DataFrame:
    """Print the summary, write the tables and plots to run_dir, and log them on the parent run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    every = trial_table(space, grid)
    scale = space.strategy == "scale"
    # The scale strategy's arms (variant@size) are bracketed and fitted one by one, like variants.
    table, ranged = split_range_tests(by_arm(every) if scale else every)
    names = list(space.arms()) if scale else list(space.variants)
    if len(ranged):
        grid = [r for r in grid if r.config.get("lr_schedule") != "range"]
    p = space.max_lr.p_diverge
    # A boundary in LR is read where the trials differ in LR and seed alone (not in a depth or a
    # rank as well, whose trials would be pooled into one curve).
    fits = (boundaries(table, names, p) if space.param("lr") is not None
            and space.strategy != "tune" and all(q.name in ("lr", "seed") for q in space.params) else None)
    s = summary(table, names, fits)
    if range_tests(space):
        # Where each variant's range test failed, beside the answer it led to (issue 17 asks how
        # far apart they are).
        s["range_test_lr"] = [ranged[ranged["variant"] == v]["range_lr"].max() for v in s["variant"]]
    md = summary_markdown(s, p)
    rat = ratios(fits) if fits and not scale else None
    every.to_csv(run_dir / "trials.csv", index=False)
    s.to_csv(run_dir / "summary.csv", index=False)
    (run_dir / "summary.md").write_text(md + "\n" + (f"\n{ratios_markdown(rat)}\n" if rat is not None and len(rat) else ""))
    files = [run_dir / "trials.csv", run_dir / "summary.csv", run_dir / "summary.md"]
    if rat is not None and len(rat):
        rat.to_csv(run_dir / "ratios.csv", index=False)
        files.append(run_dir / "ratios.csv")
    if fits and any(f.found for f in fits.values()):
        plot_p_diverge(table, fits, run_dir / "p_diverge.png")
        files.append(run_dir / "p_diverge.png")
    if len(table):
        plot_loss_vs_lr(table, run_dir / "loss_vs_lr.png")
        plot_tev_curves(grid, run_dir / "tev_curves.png")
        files += [run_dir / "loss_vs_lr.png", run_dir / "tev_curves.png"]
        # Architecture parameters worth a picture: numeric, searched, and not the LR or the seed.
        arch = [p.name for p in space.params if p.name not in ("lr", "seed")
                and pd.api.types.is_numeric_dtype(table[p.name]) and table[p.name].nunique() > 1]
        if arch:
            plot_params_vs_loss(table, arch, run_dir / "params_vs_loss.png")
            files.append(run_dir / "params_vs_loss.png")
    sens = lr_sensitivity(table, space) if space.strategy == "sweep" else None
    if sens is not None and len(sens):
        sens.to_csv(run_dir / "lr_sensitivity.csv", index=False)
        files.append(run_dir / "lr_sensitivity.csv")
    cells = sweep_cells(table, space, trial_spearman(grid)) if space.strategy == "sweep" else None
    if cells is not None and len(cells):
        cells.to_csv(run_dir / "cells.csv", index=False)
        files.append(run_dir / "cells.csv")

    # MLflow's metric names take no "@": an arm's metrics are <key>/<variant>/<size>.
    metrics = [Metric(f"{key}/{r['variant'].replace('@', '/')}", float(r[key]), 0, 0) for _, r in s.iterrows()
               for key in ("max_stable_lr", "max_stable_lr_low", "max_stable_lr_high", "range_test_lr")
               if key in r and not pd.isna(r[key])]
    scale_md = verdicts = None
    if scale:
        st, frontiers = scale_table(space, table, fits)
        verdicts = scale_verdicts(st)
        scale_md = scale_markdown(st, frontiers, space.scale.logit_threshold)
        st.to_csv(run_dir / "scale.csv", index=False)
        (run_dir / "scale.md").write_text(scale_md + "\n")
        files += [run_dir / "scale.csv", run_dir / "scale.md"]
        if st["max_stable_lr"].notna().any():
            plot_frontier(st, frontiers, run_dir / "frontier.png")
            files.append(run_dir / "frontier.png")
        for _, r in st[st["role"] == "target"].iterrows():
            metrics += [Metric(f"{key}/{r['variant']}", float(r[col]), 0, 0)
                        for key, col in (("predicted_max_lr", "predicted"), ("predicted_max_lr_low", "predicted_low"),
                                         ("predicted_max_lr_high", "predicted_high"),
                                         ("logit_predicted_max_lr", "logit_predicted")) if not pd.isna(r[col])]
        metrics += [Metric(f"lr_scaling_exponent{suffix}/{v}", float(getattr(fr, f"alpha{suffix}")), 0, 0)
                    for v, fr in frontiers.items() if fr is not None for suffix in ("", "_low", "_high")]
    if rat is not None:
        metrics += [Metric(f"lr_ratio{suffix}/{r['variant']}_vs_{r['reference']}", float(r[f"ratio{suffix}"]), 0, 0)
                    for _, r in rat.iterrows() for suffix in ("", "_low", "_high") if not pd.isna(r[f"ratio{suffix}"])]
    if sens is not None:
        keys = [c for c in sens.columns if c not in SENSITIVITY_COLUMNS]
        metrics += [Metric("lr_sensitivity/" + "/".join(f"{r[k]}" if k == "variant" else f"{k}={r[k]}" for k in keys),
                           float(r["lr_sensitivity"]), 0, 0) for _, r in sens.iterrows()]
    best = per = None
    scores = verdict = None
    if space.strategy == "tune":
        best, per = best_configs(table, space)
        per.to_csv(run_dir / "max_stable_lr_per_config.csv", index=False)
        files.append(run_dir / "max_stable_lr_per_config.csv")
        if best:
            metrics.append(Metric("best_val_loss", float(best["val_loss"]), 0, 0))
        if space.tune.seeds > 1:
            scores = config_scores(table, space)
            verdict = separated(scores)
            scores.to_csv(run_dir / "configs.csv", index=False)
            files.append(run_dir / "configs.csv")
            if len(scores):
                top = scores.iloc[0]
                metrics += [Metric("best_objective_mean", float(top["objective_mean"]), 0, 0)]

    print(f"\n{space.name} ({space.strategy}): {len(table)} trials\n\n{md}\n")
    if fits and any(f.found and math.isnan(f.low) for f in fits.values()):
        print(f"(An interval needs trials at {boundary.MIN_SEEDS} seeds or more, to tell how the boundary varies "
              f"between seeds: set max_lr.seeds.)\n")
    if rat is not None and len(rat):
        print(f"Ratios of max stable LRs, with 90% intervals:\n\n{ratios_markdown(rat)}\n")
    if scale_md is not None:
        print(f"Max stable LR against model size, and at {next(iter(space.scale.target))}:\n\n{scale_md}\n")
        for v, verdict in verdicts.items():
            print(f"{v}: the target's measured max stable LR lies inside the prediction interval: "
                  f"{'yes' if verdict['inside'] else 'no'}; the interval is within one sqrt(2) step either side: "
                  f"{'yes' if verdict['narrow'] else 'no'}")
    if sens is not None and len(sens):
        print(f"LR sensitivity (Wortsman et al.; lower is more stable):\n{sens.to_string(index=False)}\n")
    if cells is not None and len(cells) and space.param("seed") is not None:
        print(f"Per cell over seeds (diverged: by the loss rule or stopped by TEV; the rest: runs that "
              f"did not diverge):\n{cells.to_string(index=False)}\n")
    if space.strategy == "tune":
        print(f"Best configuration: {best}\nLargest stable LR per configuration:\n{per.to_string(index=False)}\n")
    if scores is not None:
        print(f"Configurations over {space.tune.seeds} seeds, best mean objective first:\n{scores.head(10).to_string(index=False)}\n"
              f"The best stands outside the runner-up's seed spread (mean +- sd): "
              f"{'yes' if verdict else 'no' if verdict is not None else 'not enough configurations'}\n")
    print(f"Results: {run_dir}")
    try:
        client = MlflowClient(tracking_uri)
        if best:
            client.set_tag(parent_run_id, "best_config", str(best))
        if scores is not None and len(scores):
            client.set_tag(parent_run_id, "best_config_over_seeds", str(scores.iloc[0].to_dict()))
            client.set_tag(parent_run_id, "best_config_separated", str(verdict))
        if metrics:
            client.log_batch(parent_run_id, metrics=metrics)
        for f in files:
            client.log_artifact(parent_run_id, str(f))
        # Last, so that a reader who sees the parent FINISHED finds everything on it.
        client.set_terminated(parent_run_id, "FINISHED")
        exp = client.get_run(parent_run_id).info.experiment_id
    except Exception as e:  # the tracking store went away: the files above hold it all
        with open(run_dir / INCOMPLETE_FILE, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} parent run: {type(e).__name__}: {e}\n")
        print(f"MLflow at {tracking_uri} failed ({type(e).__name__}: {str(e)[:200]}): the parent run is not "
              f"complete. When it is back:\n  python -m tunestab.replay {run_dir}")
        return s
    from .mlflow_view import runs_url

    if tracking_uri.startswith(("http://", "https://")):
        where = f"  {runs_url(tracking_uri, exp, parent_run_id)}"
    else:
        where = (f"  mlflow ui --backend-store-uri {tracking_uri} --port 5000\n"
                 f"  then open {runs_url('http://127.0.0.1:5000', exp, parent_run_id)}")
    print(f"MLflow: experiment {space.name!r} (id {exp}), parent run {parent_run_id}; its trials' charts, "
          f"stability first:\n{where}")
    if (run_dir / INCOMPLETE_FILE).exists():
        print(f"Some results did not reach MLflow while it was away ({run_dir / INCOMPLETE_FILE}); log them with\n"
              f"  python -m tunestab.replay {run_dir}")
    return s
