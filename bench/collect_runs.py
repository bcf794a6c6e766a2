"""Run a sweep study's grid to the end and keep every report: the labelled runs behind
bench/scheduler_eval.py.

    python bench/collect_runs.py --space search_spaces/tev_labels.yaml --out docs/data/tev_runs_v2.jsonl

Each (variant, lr, seed) runs in-process (`tunestab.loop.run`, no Ray, one torch thread per
process, `--procs` processes) until its budget ends or the loss-based divergence rule of docs/design.md
ends it. That is what a trial does in a search with the TEV scheduler in shadow mode: the
scheduler only watches, so its decisions can be replayed afterwards from the recorded reports.
One JSON line per run: its settings, its outcome, and the reported metrics the scheduler and the
baselines look at. Runs already in --out are skipped, so an interrupted collection resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

from tunestab import spec as spec_mod

KEEP = ("step", "loss", "val_loss", "tev_mean", "tev_std", "grad_norm", "lr", "attn_logit_max",
        "layer_0/attn_logit_max", "out_norm_qkv", "loss_max", "tev_dispersion_max", "tev_growth_max",
        "tev_row_max", "embed_update_max", "loss_floor", "loss_init", "diverged", "stop_reason")


def grid(space: spec_mod.Space) -> list[dict]:
    """Every (variant, grid point) of a sweep space, as TrialConfig values."""
    runs = []
    for variant in space.variants:
        for values in itertools.product(*(p.values for p in space.params)):
            runs.append({**space.trial, "variant": variant, **{p.name: v for p, v in zip(space.params, values)}})
    return runs


def run_key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


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
    return {"settings": settings, "loss_init": last["loss_init"], "stop_reason": last["stop_reason"],
            "diverged": last["diverged"], "steps": settings["steps"], "seconds": time.perf_counter() - t0,
            "reports": reports}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="search_spaces/tev_labels.yaml")
    ap.add_argument("--out", default="docs/data/tev_runs.jsonl")
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args(argv)
    space = spec_mod.load(args.space)
    if space.strategy != "sweep":
        print(f"error: {args.space} is a {space.strategy} space; collect_runs needs a sweep", file=sys.stderr)
        return 2
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {run_key(json.loads(line)["settings"]) for line in f if line.strip()}
    todo = [s for s in grid(space) if run_key(s) not in done]
    print(f"{len(todo)} runs to do, {len(done)} already in {args.out}", file=sys.stderr)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with mp.get_context("spawn").Pool(args.procs) as pool, open(args.out, "a") as out:
        for i, rec in enumerate(pool.imap_unordered(one, todo), 1):
            out.write(json.dumps(rec) + "\n")
            out.flush()
            s = rec["settings"]
            print(f"[{i}/{len(todo)}] {s['variant']:>13} lr={s['lr']:<5} seed={s['seed']} "
                  f"{rec['stop_reason']:>11} at step {rec['reports'][-1]['step']} ({rec['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
