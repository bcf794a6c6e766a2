"""The tables a search's report is made of, pure pandas (no Ray, Optuna or MLflow): one row per
trial, then per variant (or arm) the max stable LR with its interval, the bracket and how its
trials ended, and the ratios between variants.

The max stable LR of a variant is where P(diverge | LR), fitted to all its trials across seeds,
crosses 10% (tunestab/boundary.py), with a 90% interval. A trial that diverged or was stopped by
the TEV scheduler counts as divergent (tunestab/outcome.py decides it, once). The bracket
[largest stable, smallest divergent] of tunestab/bracket.py is reported beside it. Each
strategy's own tables are in its module (tunestab/strategies/).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd

from . import boundary
from .bracket import bracket
from .metrics import FINITE_CAP
from .outcome import (
    DIVERGED,
    LOSS,
    LOSS_INIT,
    LR,
    OUTCOME,
    STEP,
    STOP_REASON,
    TEV_MEAN,
    TEV_STD,
    TEV_STOP_STEP,
    TRIAL_ID,
    VAL_LOSS,
    Outcome,
    StopReason,
    TrialKey,
    is_stable,
    outcome,
)

COLUMNS = [
    TRIAL_ID,
    "variant",
    LR,
    "seed",
    OUTCOME,
    STOP_REASON,
    DIVERGED,
    TEV_STOP_STEP,
    STEP,
    LOSS,
    VAL_LOSS,
    LOSS_INIT,
    TEV_MEAN,
    TEV_STD,
]
# Fixed after the variant, the LR and the seed: the searched parameters go between them and these.
FIXED = 4


def trial_table(space, grid, columns: dict | None = None) -> pd.DataFrame:
    """One row per trial that reported (grid: Tune's results). `columns`: a strategy's own,
    name -> f(config, metrics)."""
    columns = columns or {}
    extra = [p.name for p in space.params if p.name not in ("lr", "seed")]
    rows = []
    for r in grid:
        if r.metrics is None:
            continue
        m, c = r.metrics, r.config
        key = TrialKey.of(c, space.trial.get("seed", 0))
        row = {TRIAL_ID: m.get(TRIAL_ID), "variant": key.variant, LR: key.lr, "seed": key.seed}
        row.update({name: c.get(name) for name in extra})
        row.update({k: m.get(k) for k in COLUMNS[FIXED:]})
        row.update({name: f(c, m) for name, f in columns.items()})
        if r.error is not None:
            row["stop_reason"] = StopReason.ERROR.value
        row[OUTCOME] = outcome(row).value
        rows.append(row)
    # Fixed columns, so that an empty search gives an empty table the summary can still read.
    return pd.DataFrame(rows, columns=COLUMNS[:FIXED] + extra + COLUMNS[FIXED:] + list(columns))


def split_range_tests(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials at a fixed LR schedule, LR range tests): a range test is no outcome at an LR, so
    the bracket, the fit and the plots see only the first."""
    if "lr_schedule" not in table:
        return table, table.iloc[0:0]
    ranged = table["lr_schedule"] == "range"
    return table[~ranged], table[ranged]


def stable_mask(table: pd.DataFrame) -> pd.Series:
    """outcome.is_stable of each row: completed its budget without diverging."""
    return pd.Series([is_stable(r) for r in table.to_dict("records")], index=table.index, dtype=bool)


def outcomes(table: pd.DataFrame) -> pd.Series:
    """Each row's `outcome`: the column trial_table writes, or read from the row where a table
    was built without it (an older trials.csv, a study's own table)."""
    if OUTCOME in table:
        return table[OUTCOME]
    return pd.Series([outcome(r).value for r in table.to_dict("records")], index=table.index, dtype=object)


def ran(table: pd.DataFrame) -> pd.DataFrame:
    """The trials that ran: an error says nothing about the LR."""
    return table[table[STOP_REASON] != StopReason.ERROR]


def boundaries(table: pd.DataFrame, variants, p: float = boundary.P_DIVERGE) -> dict[str, boundary.Boundary]:
    """Per variant, P(diverge | LR) fitted to all its trials that ran (tunestab/boundary.py)."""
    out = {}
    for v in variants:
        t = ran(table[table["variant"] == v])
        # Each variant's posterior draws from its own generator, so ratios pair independent draws.
        out[v] = boundary.fit(
            t["lr"].astype(float), ~stable_mask(t), t["seed"], p, rng=np.random.default_rng(zlib.crc32(str(v).encode()))
        )
    return out


SUMMARY_COLUMNS = [
    "variant",
    "basis",
    "max_stable_lr",
    "max_stable_lr_low",
    "max_stable_lr_high",
    "seeds",
    "trials",
    "largest_stable_lr",
    "smallest_divergent_lr",
    "best_val_loss",
    "diverged",
    "tev_stops",
]


def summary(table: pd.DataFrame, variants, fits: dict | None = None) -> pd.DataFrame:
    """One row per variant: the fitted max stable LR and its interval (when `fits` has it), the
    bracket, the best validation loss of a stable trial, and how the trials ended. `basis` says
    what the answer is: `fit` (a point with its interval, over MIN_SEEDS seeds or more), or
    `bracket` (fewer seeds: [largest stable, smallest divergent] is the answer, no point)."""
    rows = []
    for v in variants:
        t = table[table["variant"] == v]
        done = ran(t)
        stable = stable_mask(done)
        b = bracket(list(zip(done["lr"], stable)))
        f = (fits or {}).get(v)
        fitted = f is not None and f.has_interval
        ended = outcomes(done)
        rows.append(
            {
                "variant": v,
                "basis": "fit" if fitted else "bracket",
                "max_stable_lr": f.lr if fitted else math.nan,
                "max_stable_lr_low": f.low if fitted else math.nan,
                "max_stable_lr_high": f.high if fitted else math.nan,
                "seeds": int(done["seed"].nunique()),
                "trials": len(t),
                "largest_stable_lr": b.stable,
                "smallest_divergent_lr": b.divergent,
                "best_val_loss": done[stable]["val_loss"].min() if stable.any() else math.nan,
                "diverged": int((ended == Outcome.DIVERGED).sum()),
                "tev_stops": int((ended == Outcome.STOPPED_BY_TEV).sum()),
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# Rybakov et al. 2024's 1.5x claims compare these with qk_norm; every variant is also compared
# with the baseline.
RYBAKOV_PAIRS = (("qk_norm_cap", "qk_norm"), ("qkv_norm", "qk_norm"), ("qk_fc_norm", "qk_norm"))


def ratios(fits: dict[str, boundary.Boundary], brackets: dict | None = None) -> pd.DataFrame:
    """Max stable LR of one variant over another's, with the 90% interval of the ratio (`basis`
    fit). Where either variant has too few seeds for a fit, its bracket is its answer and the
    ratio's bounds come from the two brackets (`basis` bracket: [stable_a / divergent_b,
    divergent_a / stable_b], no point); `brackets`: variant -> (largest stable, smallest
    divergent)."""
    pairs = [(v, "baseline") for v in fits if v != "baseline" and "baseline" in fits]
    pairs += [(a, b) for a, b in RYBAKOV_PAIRS if a in fits and b in fits]
    rows = []
    for a, b in pairs:
        if fits[a].has_interval and fits[b].has_interval:
            r, low, high = boundary.ratio(fits[a], fits[b])
            basis = "fit"
        else:
            (sa, da), (sb, db) = (brackets or {}).get(a, (None, None)), (brackets or {}).get(b, (None, None))
            r = math.nan
            low = sa / db if sa and db else math.nan
            high = da / sb if da and sb else math.nan
            basis = "bracket"
        rows.append({"variant": a, "reference": b, "basis": basis, "ratio": r, "ratio_low": low, "ratio_high": high})
    return pd.DataFrame(rows, columns=["variant", "reference", "basis", "ratio", "ratio_low", "ratio_high"])


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


def fmt(x, spec=".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def interval(low, high) -> str:
    return "-" if pd.isna(low) or pd.isna(high) else f"[{fmt(low)}, {fmt(high)}]"


def summary_markdown(s: pd.DataFrame, p: float = boundary.P_DIVERGE) -> str:
    ranged = "range_test_lr" in s
    lines = [
        f"| variant | max stable LR (P(diverge) = {p:g}) | 90% interval | seeds | trials | bracket | "
        "best val loss | diverged | TEV stops |" + (" range test failed at |" if ranged else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if ranged else ""),
    ]
    for _, r in s.iterrows():
        answer = fmt(r["max_stable_lr"])
        if r.get("basis") == "bracket":
            answer = f"in [{fmt(r['largest_stable_lr'])}, {fmt(r['smallest_divergent_lr'])}] (bracket)"
        lines.append(
            f"| {r['variant']} | {answer} | {interval(r['max_stable_lr_low'], r['max_stable_lr_high'])} | "
            f"{r['seeds']} | {r['trials']} | [{fmt(r['largest_stable_lr'])}, "
            f"{fmt(r['smallest_divergent_lr'])}] | {fmt(r['best_val_loss'], '.4f')} | {r['diverged']} | "
            f"{r['tev_stops']} |" + (f" {fmt(r['range_test_lr'])} |" if ranged else "")
        )
    return "\n".join(lines)


def ratios_markdown(r: pd.DataFrame) -> str:
    lines = ["| max stable LR of | over | ratio | 90% interval |", "|---|---|---|---|"]
    for _, row in r.iterrows():
        bounds = interval(row["ratio_low"], row["ratio_high"])
        if row.get("basis") == "bracket":
            bounds = f"between {bounds} (bounds from the brackets)" if bounds != "-" else "-"
        lines.append(f"| {row['variant']} | {row['reference']} | {fmt(row['ratio'])} | {bounds} |")
    return "\n".join(lines)


def answer_line(summary: pd.DataFrame, ratio_table: pd.DataFrame | None = None) -> str:
    """The summary in one line, for the parent run's `answer` column in the MLflow view: each
    variant's max stable LR (a fitted point and its 90% interval, or its bracket below 3 seeds),
    then each ratio."""
    parts = []
    for r in summary.to_dict("records"):
        if r["basis"] == "fit":
            parts.append(
                f"{r['variant']} {fmt(r['max_stable_lr'])} [{fmt(r['max_stable_lr_low'])}, {fmt(r['max_stable_lr_high'])}]"
            )
        else:
            parts.append(f"{r['variant']} in [{fmt(r['largest_stable_lr'])}, {fmt(r['smallest_divergent_lr'])}]")
    for r in [] if ratio_table is None else ratio_table.to_dict("records"):
        bounds = f"[{fmt(r['ratio_low'])}, {fmt(r['ratio_high'])}]"
        head = f"{fmt(r['ratio'])}x {bounds}" if r["basis"] == "fit" else f"in {bounds}x"
        parts.append(f"{r['variant']}/{r['reference']} {head}")
    return "; ".join(parts)


def outcome_counts(table: pd.DataFrame) -> str:
    """How the members ended, "8 stable, 3 diverged, 1 stopped_by_tev", in Outcome's order."""
    counts = outcomes(table).value_counts()
    return ", ".join(f"{int(counts[o.value])} {o.value}" for o in Outcome if o.value in counts)
