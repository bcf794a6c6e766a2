"""After a search: the trial table, the max stable LR per variant, plots, and all of it on the
MLflow parent run.

The max stable LR of a variant is the largest LR whose trial completed its budget without
diverging, below the smallest LR that diverged or was stopped by the TEV scheduler (the same
conservative bracket as tunestab/bracket.py), reported as [largest stable, smallest divergent].
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .bracket import bracket

COLUMNS = ["trial_id", "variant", "lr", "stop_reason", "diverged", "tev_stop_step", "step", "loss", "val_loss",
           "tev_mean", "tev_std"]


def trial_table(space, grid) -> pd.DataFrame:
    rows = []
    for r in grid:
        if r.metrics is None:
            continue
        m, c = r.metrics, r.config
        row = {"trial_id": m.get("trial_id"), "variant": c.get("variant"), "lr": c.get("lr")}
        row.update({p.name: c.get(p.name) for p in space.params if p.name != "lr"})
        row.update({k: m.get(k) for k in COLUMNS[3:]})
        if r.error is not None:
            row["stop_reason"] = "error"
        rows.append(row)
    extra = [p.name for p in space.params if p.name != "lr"]
    # Fixed columns, so that an empty search gives an empty table the summary can still read.
    return pd.DataFrame(rows, columns=COLUMNS[:3] + extra + COLUMNS[3:])


def stable_mask(table: pd.DataFrame) -> pd.Series:
    """Trials that completed their budget without diverging (a TEV stop is not stable)."""
    return (table["stop_reason"] == "completed") & (table["diverged"] == 0)


def summary(table: pd.DataFrame, variants) -> pd.DataFrame:
    rows = []
    for v in variants:
        t = table[table["variant"] == v]
        ran = t[t["stop_reason"] != "error"]
        stable = stable_mask(ran)
        b = bracket(list(zip(ran["lr"], stable)))
        rows.append({"variant": v, "max_stable_lr": b.stable, "smallest_divergent_lr": b.divergent,
                     "best_val_loss": ran[stable]["val_loss"].min() if stable.any() else math.nan,
                     "trials": len(t), "diverged": int((ran["diverged"] == 1).sum()),
                     "tev_stops": int((ran["stop_reason"] == "tev").sum())})
    return pd.DataFrame(rows)


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


def fmt(x, spec=".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summary_markdown(s: pd.DataFrame) -> str:
    lines = ["| variant | max stable LR | bracket | best val loss | trials | diverged | TEV stops |",
             "|---|---|---|---|---|---|---|"]
    for _, r in s.iterrows():
        lines.append(f"| {r['variant']} | {fmt(r['max_stable_lr'])} | [{fmt(r['max_stable_lr'])}, "
                     f"{fmt(r['smallest_divergent_lr'])}] | {fmt(r['best_val_loss'], '.4f')} | {r['trials']} | "
                     f"{r['diverged']} | {r['tev_stops']} |")
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


def plot_tev_curves(grid, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for r in grid:
        df = r.metrics_dataframe
        if df is None or "tev_mean" not in df or r.metrics is None:
            continue
        stopped = r.metrics.get("stop_reason") in ("tev", "blowup", "nonfinite")
        style = {"color": "tab:red" if stopped else "tab:blue", "alpha": 0.7, "lw": 1}
        axes[0].plot(df["step"], df["tev_mean"], **style)
        axes[1].plot(df["step"], df["tev_std"] / df["tev_mean"], **style)
    axes[0].set_ylabel("μ_TEV")
    axes[1].set_ylabel("σ_TEV / μ_TEV (what the scheduler watches)")
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle("TEV of trials that diverged or were stopped (red) and that completed (blue)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(space, grid, tracking_uri: str, parent_run_id: str, run_dir: Path) -> pd.DataFrame:
    """Print the summary, write the tables and plots to run_dir, and log them on the parent run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    table = trial_table(space, grid)
    s = summary(table, space.variants)
    md = summary_markdown(s)
    table.to_csv(run_dir / "trials.csv", index=False)
    s.to_csv(run_dir / "summary.csv", index=False)
    (run_dir / "summary.md").write_text(md + "\n")
    files = [run_dir / "trials.csv", run_dir / "summary.csv", run_dir / "summary.md"]
    if len(table):
        plot_loss_vs_lr(table, run_dir / "loss_vs_lr.png")
        plot_tev_curves(grid, run_dir / "tev_curves.png")
        files += [run_dir / "loss_vs_lr.png", run_dir / "tev_curves.png"]

    client = MlflowClient(tracking_uri)
    metrics = [Metric(f"max_stable_lr/{r['variant']}", float(r["max_stable_lr"]), 0, 0)
               for _, r in s.iterrows() if r["max_stable_lr"] is not None and not pd.isna(r["max_stable_lr"])]
    if metrics:
        client.log_batch(parent_run_id, metrics=metrics)
    for f in files:
        client.log_artifact(parent_run_id, str(f))
    client.set_terminated(parent_run_id, "FINISHED")

    exp = client.get_run(parent_run_id).info.experiment_id
    print(f"\n{space.name} ({space.strategy}): {len(table)} trials\n\n{md}\n")
    if space.strategy == "tune":
        best, per = best_configs(table, space)
        per.to_csv(run_dir / "max_stable_lr_per_config.csv", index=False)
        client.log_artifact(parent_run_id, str(run_dir / "max_stable_lr_per_config.csv"))
        if best:
            client.log_batch(parent_run_id, metrics=[Metric("best_val_loss", float(best["val_loss"]), 0, 0)])
            client.set_tag(parent_run_id, "best_config", str(best))
        print(f"Best configuration: {best}\nLargest stable LR per configuration:\n{per.to_string(index=False)}\n")
    print(f"Results: {run_dir}\nMLflow: experiment {space.name!r} (id {exp}), parent run {parent_run_id}\n"
          f"  mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)")
    return s
