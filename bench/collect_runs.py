"""Run a sweep study's grid to the end and keep every report: the labelled runs behind
bench/scheduler_eval.py.

    python bench/collect_runs.py --space search_spaces/tev_labels.yaml --out docs/data/tev_runs_v2.jsonl

Each (variant, lr, seed) runs in-process (`tunestab.loop.run`, no Ray, one torch thread per
process, `--procs` processes) until its budget ends or the loss-based divergence rule of docs/design.md
ends it. That is what a trial does in a search with the TEV scheduler in shadow mode: the
scheduler only watches, so its decisions can be replayed afterwards from the recorded reports.
One JSON line per run: its settings, its outcome, and the reported metrics the scheduler and the
baselines look at. Runs already in --out are skipped, so an interrupted collection resumes.

`--boundary-seeds N` then tops up each variant's boundary to N seeds: at every LR of --out where
the variant's seeds disagree (or, where none do, at the last LR all seeds survived and the first
all diverged), further seeds run until there are N:

    python bench/collect_runs.py --space search_spaces/tev_labels.yaml --out docs/data/tev_runs_v2.jsonl --boundary-seeds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

from tunestab import spec as spec_mod

KEEP = (
    "step",
    "loss",
    "val_loss",
    "tev_mean",
    "tev_std",
    "grad_norm",
    "lr",
    "attn_logit_max",
    "layer_0/attn_logit_max",
    "out_norm_qkv",
    "loss_max",
    "tev_dispersion_max",
    "tev_growth_max",
    "tev_row_max",
    "embed_update_max",
    "loss_floor",
    "loss_init",
    "diverged",
    "stop_reason",
)


def grid(space: spec_mod.Space) -> list[dict]:
    """Every (variant, grid point) of a sweep space, as TrialConfig values."""
    runs = []
    for variant in space.variants:
        for values in itertools.product(*(p.values for p in space.params)):
            runs.append({**space.trial, "variant": variant, **{p.name: v for p, v in zip(space.params, values)}})
    return runs


def run_key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def boundary_lrs(runs: list[dict]) -> dict[str, list[float]]:
    """Per variant, the LRs its boundary lies at: where its seeds disagree, or where none do, the
    last LR every seed survived and the first every seed diverged at."""
    by: dict[str, dict[float, list[bool]]] = {}
    for r in runs:
        by.setdefault(r["settings"]["variant"], {}).setdefault(r["settings"]["lr"], []).append(bool(r["diverged"]))
    out = {}
    for variant, lrs in by.items():
        mixed = [lr for lr, d in sorted(lrs.items()) if 0 < sum(d) < len(d)]
        if not mixed:
            stable = [lr for lr, d in lrs.items() if not any(d)]
            divergent = [lr for lr, d in lrs.items() if all(d)]
            if stable and divergent:
                mixed = [
                    max(x for x in stable if x < min(divergent))
                    if any(x < min(divergent) for x in stable)
                    else min(stable),
                    min(divergent),
                ]
        out[variant] = mixed
    return out


def boundary_top_up(runs: list[dict], seeds: int) -> list[dict]:
    """The runs that bring every boundary LR (boundary_lrs) to `seeds` seeds."""
    todo = []
    for variant, lrs in boundary_lrs(runs).items():
        for lr in lrs:
            here = [r["settings"] for r in runs if r["settings"]["variant"] == variant and r["settings"]["lr"] == lr]
            have = {s["seed"] for s in here}
            extra = itertools.islice((s for s in itertools.count() if s not in have), max(0, seeds - len(have)))
            todo += [{**here[0], "seed": seed} for seed in extra]
    return todo


def one(settings: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from tunestab.config import config_from
    from tunestab.loop import run
    from tunestab.session import LocalSession

    session = LocalSession(out=open(os.devnull, "w"))
    t0 = time.perf_counter()
    last = run(config_from(settings, where="collect"), session)
    reports = [{k: r[k] for k in KEEP if k in r} for r in session.reports]
    return {
        "settings": settings,
        "loss_init": last["loss_init"],
        "stop_reason": last["stop_reason"],
        "diverged": last["diverged"],
        "steps": settings["steps"],
        "seconds": time.perf_counter() - t0,
        "reports": reports,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="search_spaces/tev_labels.yaml")
    ap.add_argument("--out", default="docs/data/tev_runs_v2.jsonl")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument(
        "--boundary-seeds",
        type=int,
        default=0,
        help="then top up every variant's boundary LRs to this many seeds (0: off)",
    )
    ap.add_argument("--variants", help="only these of the space's variants (comma-separated), in this order")
    args = ap.parse_args(argv)
    space = spec_mod.load(args.space)
    if args.variants:
        wanted = args.variants.split(",")
        unknown = [v for v in wanted if v not in space.variants]
        if unknown:
            print(f"error: --variants: {', '.join(unknown)} not in {args.space}", file=sys.stderr)
            return 2
        space = dataclasses.replace(space, variants=tuple(wanted))
    if space.strategy != "sweep":
        print(f"error: {args.space} is a {space.strategy} space; collect_runs needs a sweep", file=sys.stderr)
        return 2
    collect(grid(space), args.out, args.procs)
    if args.boundary_seeds:
        with open(args.out) as f:
            runs = [json.loads(line) for line in f if line.strip()]
        variants = set(space.variants)
        collect(
            boundary_top_up([r for r in runs if r["settings"]["variant"] in variants], args.boundary_seeds),
            args.out,
            args.procs,
        )
    return 0


def collect(runs: list[dict], out_path: str, procs: int) -> None:
    """Run each of `runs` (settings) not yet in out_path, appending one line per run to it."""
    done = set()
    if os.path.exists(out_path):
        with open(out_path) as f:
            done = {run_key(json.loads(line)["settings"]) for line in f if line.strip()}
    todo = [s for s in runs if run_key(s) not in done]
    print(f"{len(todo)} runs to do, {len(done)} already in {out_path}", file=sys.stderr)
    if not todo:
        return
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with mp.get_context("spawn").Pool(procs) as pool, open(out_path, "a") as out:
        for i, rec in enumerate(pool.imap_unordered(one, todo), 1):
            out.write(json.dumps(rec) + "\n")
            out.flush()
            s = rec["settings"]
            print(
                f"[{i}/{len(todo)}] {s['variant']:>13} lr={s['lr']:<5} seed={s['seed']} "
                f"{rec['stop_reason']:>11} at step {rec['reports'][-1]['step']} ({rec['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
