"""Compute a search saves: the `max_lr` strategy with the TEV scheduler against the full LR grid
run to the end (Rybakov et al.'s protocol), on the same variants, model and budget.

    python bench/search_cost.py                       # the first proxy's default.yaml (docs/results/legacy)
    python bench/search_cost.py --space docs/results/legacy/max_lr.yaml --ratio 1.5 --max-trials 8

The searches run through the product (`python -m tunestab.search`), one after the other:
- grid:   strategy `sweep`, scheduler `none`, LR at lo * ratio^k over the space's [lo, hi], so
          neighbouring grid points are one bracket step apart;
- max_lr: strategy `max_lr`, TEV scheduler on, the same [lo, hi] and ratio;
- max_lr + range test (with --range-test): the same, each variant starting with one LR range
          test (tunestab/bracket.py); its tokens count, and where it failed is printed beside the
          bracket it led to.
Tokens are counted from each trial's last reported step (steps x batch_size x seq_len). The grid
is priced two ways: every trial for its whole budget (the protocol: each LR runs to the end and
the curve is judged afterwards), and as actually run, where our loss rule already ends a blown-up
trial early (a stronger baseline than the papers'). The max stable LR of each variant is compared
by the same conservative bracket rule (tunestab/bracket.py): "within one bracket step" means
|log(max_lr / grid)| <= log(ratio).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from tunestab import spec as spec_mod
from tunestab.tables import split_range_tests, summary


def lr_grid(lo: float, hi: float, ratio: float) -> list[float]:
    n = int(math.floor(math.log(hi / lo) / math.log(ratio) + 1e-9))
    return [float(f"{lo * ratio**k:.6g}") for k in range(n + 1)]


def steps_apart(a: float, b: float, ratio: float) -> float:
    """How many bracket steps apart two max stable LRs are (inf when either is missing)."""
    return abs(math.log(a / b)) / math.log(ratio) if a and b and not (pd.isna(a) or pd.isna(b)) else math.inf


def spaces(raw: dict, ratio: float, max_trials: int, slots: int, seeds: int = 0) -> tuple[dict, dict, dict]:
    lo, hi = raw["params"]["lr"]["loguniform"]
    base = {
        k: v
        for k, v in raw.items()
        if k not in ("params", "max_lr", "tune", "scheduler", "strategy", "description", "storage", "tracking_uri")
    }
    grid = {
        **base,
        "name": f"{raw['name']}_cost_grid",
        "strategy": "sweep",
        "params": {"lr": {"grid": lr_grid(lo, hi, ratio)}},
        "scheduler": {"type": "none"},
    }
    maxlr = {
        **base,
        "name": f"{raw['name']}_cost_max_lr",
        "strategy": "max_lr",
        "params": {"lr": {"loguniform": [lo, hi]}},
        "max_lr": {"ratio": ratio, "slots": slots, "max_trials": max_trials, "seeds": seeds},
        "scheduler": raw.get("scheduler", {"type": "tev"}),
    }
    ranged = {**maxlr, "name": f"{raw['name']}_cost_range", "max_lr": {**maxlr["max_lr"], "range_test": True}}
    return grid, maxlr, ranged


def run(space: dict, workdir: Path, reuse: bool = False) -> pd.DataFrame:
    path = workdir / f"{space['name']}.yaml"
    text = yaml.safe_dump(space, sort_keys=False)
    storage = workdir / "results"
    if reuse and path.is_file() and path.read_text() == text:
        # The same space ran to its end in this workdir before (a search's summary is written last).
        done = [d for d in sorted(storage.glob(f"{space['name']}-*")) if (d / "trials.csv").is_file()]
        if done:
            print(f"{space['name']}: reusing {done[-1]}", flush=True)
            return pd.read_csv(done[-1] / "trials.csv")
    path.write_text(text)
    subprocess.run(
        [sys.executable, "-m", "tunestab.search", "--space", str(path), "--storage", str(storage)], check=True
    )
    run_dir = sorted(storage.glob(f"{space['name']}-*"))[-1]
    print(f"{space['name']}: {run_dir}", flush=True)
    return pd.read_csv(run_dir / "trials.csv")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--space",
        default="docs/results/legacy/default.yaml",
        help="base space (max_lr strategy): variants, trial, lr range",
    )
    ap.add_argument("--ratio", type=float, help="bracket step and grid spacing (default: the space's)")
    ap.add_argument("--max-trials", type=int, default=8, help="max_lr trials per variant at most")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="max_lr boundary seeds (default 0: the bracket of one seed, like for like with the "
        "one-seed grid; more buy an interval the grid does not give)",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="take a search that finished in --workdir with the same space instead of running it again",
    )
    ap.add_argument("--workdir", help="keep the results here (default: a temporary folder)")
    ap.add_argument("--range-test", action="store_true", help="also max_lr starting with an LR range test per variant")
    args = ap.parse_args()
    path = spec_mod.resolve_path(args.space)
    raw = yaml.safe_load(path.read_text())
    space = spec_mod.parse(raw, source=str(path))
    ratio = args.ratio or space.max_lr.ratio
    grid_space, maxlr_space, range_space = spaces(raw, ratio, args.max_trials, args.slots, args.seeds)
    tokens_per_step = space.trial_config(space.variants[0]).batch_size * space.trial_config(space.variants[0]).seq_len
    budget = space.trial_config(space.variants[0]).steps

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunestab-cost-"))
    workdir.mkdir(parents=True, exist_ok=True)
    grid_t = run(grid_space, workdir, args.reuse)
    maxlr_t = run(maxlr_space, workdir, args.reuse)
    range_t = run(range_space, workdir, args.reuse) if args.range_test else None

    g, m = summary(grid_t, space.variants).set_index("variant"), summary(maxlr_t, space.variants).set_index("variant")
    print(
        f"\nLR grid: {len(lr_grid(*raw['params']['lr']['loguniform'], ratio))} points from "
        f"{raw['params']['lr']['loguniform'][0]} to {raw['params']['lr']['loguniform'][1]}, ratio {ratio}; "
        f"budget {budget} steps x {tokens_per_step} tokens\n"
    )
    print("| variant | grid: max stable LR | max_lr: bracket | steps apart | grid trials | max_lr trials | TEV stops |")
    print("|---|---|---|---|---|---|---|")
    agree = True
    for v in space.variants:
        gs, ms, md = g.loc[v, "largest_stable_lr"], m.loc[v, "largest_stable_lr"], m.loc[v, "smallest_divergent_lr"]
        apart = steps_apart(ms, gs, ratio)
        agree &= apart <= 1 + 1e-9
        print(
            f"| {v} | {gs:.4g} | [{ms:.4g}, {md:.4g}] | {apart:.2f} | {g.loc[v, 'trials']} | "
            f"{m.loc[v, 'trials']} | {m.loc[v, 'tev_stops']} |"
        )
    grid_full = len(grid_t) * budget * tokens_per_step
    grid_run = grid_t["step"].sum() * tokens_per_step
    maxlr_run = maxlr_t["step"].sum() * tokens_per_step
    print(
        f"\ntokens: grid run to the end {grid_full:,}; grid as run (loss rule ends blow-ups) {grid_run:,}; "
        f"max_lr + TEV {maxlr_run:,}"
    )
    print(f"max_lr + TEV / grid run to the end = {maxlr_run / grid_full:.3f}")
    print(f"max_lr + TEV / grid as run         = {maxlr_run / grid_run:.3f}")
    print(f"same max stable LR within one bracket step for every variant: {'yes' if agree else 'NO'}")
    if range_t is not None:
        fixed, ranged = split_range_tests(range_t)
        r = summary(fixed, space.variants).set_index("variant")
        print(
            "\n| variant | grid: max stable LR | range test failed at | max_lr + range test: bracket | steps apart "
            "| range test / bracket's stable end | trials (range test + bracket) |"
        )
        print("|---|---|---|---|---|---|---|")
        ragree = True
        for v in space.variants:
            gs, rs, rd = g.loc[v, "largest_stable_lr"], r.loc[v, "largest_stable_lr"], r.loc[v, "smallest_divergent_lr"]
            est = ranged[ranged["variant"] == v]["range_lr"].max()
            apart = steps_apart(rs, gs, ratio)
            ragree &= apart <= 1 + 1e-9
            print(
                f"| {v} | {gs:.4g} | {est:.4g} | [{rs:.4g}, {rd:.4g}] | {apart:.2f} | {est / rs:.2f} | "
                f"{int((ranged['variant'] == v).sum())} + {r.loc[v, 'trials']} |"
            )
        range_run = range_t["step"].sum() * tokens_per_step
        print(f"\nmax_lr + range test + TEV {range_run:,} tokens")
        print(f"max_lr + range test + TEV / grid run to the end = {range_run / grid_full:.3f}")
        print(
            f"same max stable LR within one bracket step for every variant, with the range test: "
            f"{'yes' if ragree else 'NO'}"
        )
        agree &= ragree
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
