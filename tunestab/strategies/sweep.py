"""`sweep`: every combination of the space's grids, for every variant (the papers' protocol), with
Wortsman et al.'s LR sensitivity and Chung et al.'s per-cell table."""

from __future__ import annotations

import math

from ..outcome import STOP_REASON, StopReason
from .base import Strategy, shared_report


class Sweep(Strategy):
    name = "sweep"

    def check(self, draft, sections, problems):
        if not draft.params or any(p.kind != "grid" for p in draft.params):
            problems.append("params: the sweep strategy needs every parameter as a grid (`{grid: [...]}`)")

    def trials_text(self, space):
        return f"grid of {self.num_trials(space)}"

    def report(self, space, every, grid, out):
        from .. import run_dir
        from ..tables import trial_spearman

        table, grid, _ = shared_report(self, space, every, grid, out)
        sens = lr_sensitivity(table, space)
        if len(sens):
            out.table(run_dir.LR_SENSITIVITY_CSV, sens)
        cells = sweep_cells(table, space, trial_spearman(grid))
        if len(cells):
            out.table(run_dir.CELLS_CSV, cells)
        keys = [c for c in sens.columns if c not in SENSITIVITY_COLUMNS]
        for _, r in sens.iterrows():
            name = "/".join(f"{r[k]}" if k == "variant" else f"{k}={r[k]}" for k in keys)
            out.metric(f"lr_sensitivity/{name}", r["lr_sensitivity"])
        if len(sens):
            out.say(f"LR sensitivity (Wortsman et al.; lower is more stable):\n{sens.to_string(index=False)}\n")
        if len(cells) and space.param("seed") is not None:
            out.say(
                f"Per cell over seeds (diverged: by the loss rule or stopped by TEV; the rest: runs that "
                f"did not diverge):\n{cells.to_string(index=False)}\n"
            )


# What lr_sensitivity measures per group; its other columns name the group.
SENSITIVITY_COLUMNS = ["lr_sensitivity", "best_lr", "best_val_loss", "lrs"]


def lr_sensitivity(table, space):
    """Wortsman et al. 2023's LR sensitivity, for a sweep over an LR grid: per variant (and per
    value of every other swept parameter but the seed),

        mean over the LR grid of min(loss(lr), l0)  -  min over the grid of loss(lr),

    with loss the final validation loss averaged over seeds, and l0 the loss at initialisation. A
    diverged or TEV-stopped trial counts as l0 (the clip), so a narrow stable range scores high.
    Lower is better; read it beside loss_vs_lr.png."""
    import pandas as pd

    from ..tables import ran, stable_mask

    keys = ["variant"] + [p.name for p in space.params if p.name not in ("lr", "seed")]
    t = ran(table).copy()
    if t.empty or t["lr"].nunique() < 2:
        return pd.DataFrame(columns=keys + SENSITIVITY_COLUMNS)
    l0 = t["loss_init"].astype(float)
    loss = t["val_loss"].astype(float).where(stable_mask(t), l0)
    t["clipped"] = loss.where(loss < l0, l0).fillna(l0)
    rows = []
    for key, g in t.groupby(keys, dropna=False):
        per_lr = g.groupby("lr")["clipped"].mean()
        rows.append(
            {
                **dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                "lr_sensitivity": per_lr.mean() - per_lr.min(),
                "best_lr": per_lr.idxmin(),
                "best_val_loss": per_lr.min(),
                "lrs": len(per_lr),
            }
        )
    return pd.DataFrame(rows)


# What sweep_cells measures per cell; its other columns name the cell.
CELL_COLUMNS = [
    "seeds",
    "diverged",
    "tev_flagged",
    "tev_mean",
    "tev_std",
    "val_ppl",
    "val_ppl_sd",
    "spearman_tev_gradvar",
]


def sweep_cells(table, space, rho: dict | None = None):
    """For a sweep, Chung et al.'s table: per cell (the variant and every swept parameter but the
    seed), over its seeds: the runs that diverged (loss rule) and that TEV flagged (scheduler
    verdict, stop or shadow), and over the runs that did not diverge, the final mu_TEV, sigma_TEV
    and validation perplexity (mean, and sd of the perplexity) and the mean per-run Spearman
    correlation of mu_TEV with the embedding-gradient variance over training (`rho`)."""
    import pandas as pd

    from ..tables import ran, stable_mask

    keys = ["variant"] + [p.name for p in space.params if p.name != "seed"]
    t = ran(table).copy()
    if t.empty:
        return pd.DataFrame(columns=keys + CELL_COLUMNS)
    t["rho"] = t["trial_id"].map(rho or {}).astype(float)
    rows = []
    for key, g in t.groupby(keys, dropna=False, sort=True):
        ok = g[stable_mask(g)]
        ppl = ok["val_loss"].astype(float).map(math.exp)
        rows.append(
            {
                **dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                "seeds": len(g),
                "diverged": int((g["diverged"] == 1).sum() + (g[STOP_REASON] == StopReason.TEV).sum()),
                "tev_flagged": int(g["tev_stop_step"].notna().sum()),
                "tev_mean": ok["tev_mean"].mean(),
                "tev_std": ok["tev_std"].mean(),
                "val_ppl": ppl.mean(),
                "val_ppl_sd": ppl.std(),
                "spearman_tev_gradvar": g["rho"].mean(),
            }
        )
    return pd.DataFrame(rows)
