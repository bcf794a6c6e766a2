"""Calibrate the TEV scheduler's rule on labelled runs and evaluate it on held-out runs, next to
two loss-based early stoppers on the same runs.

    python bench/collect_runs.py          # the labelled runs (search_spaces/tev_calibration.yaml)
    python bench/scheduler_eval.py --train-seeds 0 > docs/scheduler_eval.md

A run is *divergent* when the loss-based rule of docs/design.md ended it (nonfinite, blowup) or
marked it at the end (no_progress), at the step of its last report ("loss step"); *converged*
when it completed its budget. Every rule is replayed on the recorded reports, which is what a
rule in shadow mode sees; the TEV rule is replayed through `TEVScheduler` itself.

Measured on the held-out runs:
- recall: divergent runs the rule stops (at or before the loss step);
- false stops: converged runs the rule stops;
- lead: loss step - stop step, in steps, as a fraction of the loss step (the goal: median >= 30%)
  and as a fraction of the budget;
- compute: training steps a search would spend with the rule, against the loss rule alone and
  against running every trial to the end (the grid protocol of Rybakov et al.).
Thresholds are tuned on the runs with --train-seeds: no false stop, then highest recall, then
longest median lead, then the most conservative thresholds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
from types import SimpleNamespace

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from tunestab.scheduler import TEVRule, TEVScheduler

DIVERGED = ("nonfinite", "blowup", "no_progress")


def load(path: str) -> list[dict]:
    with open(path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    for i, r in enumerate(runs):
        r["id"] = f"r{i}"
        r["divergent"] = r["stop_reason"] in DIVERGED
        r["end"] = r["reports"][-1]["step"]
    return runs


# -- rules, each replayed over the recorded reports: run id -> first stop step (or None) --------

def tev_stops(rule: TEVRule, runs: list[dict]) -> dict[str, int | None]:
    sched = TEVScheduler(rule, shadow=True)
    for r in runs:
        trial = SimpleNamespace(trial_id=r["id"])
        sched.on_trial_add(None, trial)
        for rep in r["reports"]:
            sched.on_trial_result(None, trial, dict(rep))
    return {r["id"]: sched.verdicts.get(r["id"], {}).get("step") for r in runs}


def spike_stops(params: dict, runs: list[dict]) -> dict[str, int | None]:
    """Rolling-window loss-spike rule in the manner of Composer's KillLossSpike: a report is an
    outlier when its loss is above `multiplier` x the mean of the previous `window` reports;
    `patience` outliers in a row stop the run."""
    out = {}
    for r in runs:
        losses, streak, out[r["id"]] = [], 0, None
        for rep in r["reports"]:
            past = losses[-params["window"]:]
            spike = len(past) == params["window"] and rep["loss"] > params["multiplier"] * statistics.mean(past)
            streak = streak + 1 if spike else 0
            losses.append(rep["loss"])
            if streak >= params["patience"]:
                out[r["id"]] = rep["step"]
                break
    return out


def asha_stops(params: dict, runs: list[dict], seed: int = 0) -> dict[str, int | None]:
    """Ray's AsyncHyperBandScheduler on the training loss, all runs as if they ran side by side
    (reports interleaved by step, trials in a shuffled order)."""
    import numpy as np

    np.random.seed(seed)
    sched = AsyncHyperBandScheduler(time_attr="step", metric="loss", mode="min", max_t=max(r["end"] for r in runs),
                                    grace_period=params["grace_period"], reduction_factor=params["reduction_factor"])
    order = list(runs)
    random.Random(seed).shuffle(order)
    trials = {r["id"]: SimpleNamespace(trial_id=r["id"]) for r in order}
    for r in order:
        sched.on_trial_add(None, trials[r["id"]])
    out = {r["id"]: None for r in runs}
    by_step = sorted({rep["step"] for r in runs for rep in r["reports"]})
    for step in by_step:
        for r in order:
            if out[r["id"]] is not None:
                continue
            rep = next((x for x in r["reports"] if x["step"] == step), None)
            if rep is None:
                continue
            if sched.on_trial_result(None, trials[r["id"]], dict(rep)) == TrialScheduler.STOP:
                out[r["id"]] = step
    return out


# -- scoring --------------------------------------------------------------------------------

def score(runs: list[dict], stops: dict[str, int | None]) -> dict:
    div = [r for r in runs if r["divergent"]]
    conv = [r for r in runs if not r["divergent"]]
    caught = [r for r in div if stops[r["id"]] is not None]
    leads = [r["end"] - stops[r["id"]] for r in caught]
    used = sum(min(r["end"], stops[r["id"]] or r["end"]) for r in runs)
    return {
        "divergent": len(div), "converged": len(conv),
        "recall": len(caught) / len(div) if div else float("nan"),
        "false_stops": sum(stops[r["id"]] is not None for r in conv),
        "median_lead_steps": statistics.median(leads) if leads else 0,
        "median_lead_of_loss_step": statistics.median(l / r["end"] for l, r in zip(leads, caught)) if leads else 0,
        "median_lead_of_budget": statistics.median(l / r["steps"] for l, r in zip(leads, caught)) if leads else 0,
        "steps_used": used,
        "steps_loss_rule_only": sum(r["end"] for r in runs),
        "steps_full_grid": sum(r["steps"] for r in runs),
    }


def objective(s: dict, size: float) -> tuple:
    # No false stop first, then recall, then lead; `size` prefers the most conservative rule.
    return (-s["false_stops"], s["recall"], s["median_lead_of_loss_step"], size)


def tune_tev(train: list[dict]) -> tuple[TEVRule, dict]:
    best = None
    for md, rise, floor, min_step, patience in itertools.product(
            (0.36, 0.38, 0.40, 0.45, 0.50, 0.60), (0.0, 1.5, 1.6, 1.7, 1.8, 2.0), (0.25, 0.30, 0.35),
            (20, 30), (1, 2)):
        if rise == 0 and floor != 0.30:
            continue  # the floor only matters to the rise test
        rule = TEVRule(max_dispersion=md, dispersion_rise=rise, rise_floor=floor, min_step=min_step,
                       patience=patience)
        s = score(train, tev_stops(rule, train))
        key = objective(s, md + (rise or 10) + floor + min_step / 100 + patience)
        if best is None or key > best[0]:
            best = (key, rule, s)
    return best[1], best[2]


def tune_spike(train: list[dict]) -> tuple[dict, dict]:
    best = None
    for mult, window, patience in itertools.product((1.1, 1.2, 1.3, 1.5, 2.0), (3, 5), (1, 2)):
        p = {"multiplier": mult, "window": window, "patience": patience}
        s = score(train, spike_stops(p, train))
        key = objective(s, mult + patience)
        if best is None or key > best[0]:
            best = (key, p, s)
    return best[1], best[2]


def row(name: str, s: dict) -> str:
    return (f"| {name} | {s['recall']:.2f} ({round(s['recall'] * s['divergent'])}/{s['divergent']}) | "
            f"{s['false_stops']}/{s['converged']} | {s['median_lead_steps']:.0f} | "
            f"{s['median_lead_of_loss_step']:.0%} | {s['median_lead_of_budget']:.0%} | "
            f"{1 - s['steps_used'] / s['steps_loss_rule_only']:.1%} | {1 - s['steps_used'] / s['steps_full_grid']:.1%} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="docs/data/tev_runs.jsonl")
    ap.add_argument("--train-seeds", default="0", help="comma-separated seeds to tune on; the rest is held out")
    args = ap.parse_args(argv)
    runs = load(args.runs)
    train_seeds = {int(s) for s in args.train_seeds.split(",")}
    train = [r for r in runs if r["settings"]["seed"] in train_seeds]
    test = [r for r in runs if r["settings"]["seed"] not in train_seeds]
    if not train or not test:
        print("error: --train-seeds must leave runs on both sides", file=sys.stderr)
        return 2

    rule, train_tev = tune_tev(train)
    spike, train_spike = tune_spike(train)
    asha = {"grace_period": 20, "reduction_factor": 3}
    methods = {
        "TEV scheduler (tuned)": tev_stops(rule, test),
        "TEV scheduler (shipped defaults)": tev_stops(TEVRule(), test),
        "loss spike (tuned)": spike_stops(spike, test),
        "ASHA on loss (grace 20, rf 3)": asha_stops(asha, test),
    }
    print(f"Runs: {args.runs}: {len(runs)} ({sum(r['divergent'] for r in runs)} divergent). "
          f"Tuned on seeds {sorted(train_seeds)} ({len(train)} runs), held out: {len(test)} runs.\n")
    print(f"Tuned TEV rule: `{rule}`  (on the tuning runs: recall {train_tev['recall']:.2f}, "
          f"false stops {train_tev['false_stops']}, median lead {train_tev['median_lead_of_loss_step']:.0%})\n")
    print(f"Tuned loss-spike rule: `{spike}` (on the tuning runs: recall {train_spike['recall']:.2f}, "
          f"false stops {train_spike['false_stops']})\n")
    print("Held-out runs:\n")
    print("| rule | recall | false stops | median lead (steps) | lead / loss step | lead / budget "
          "| steps saved vs loss rule alone | vs full grid |")
    print("|---|---|---|---|---|---|---|---|")
    scores = {}
    for name, stops in methods.items():
        scores[name] = score(test, stops)
        print(row(name, scores[name]))

    print("\nPer divergent held-out run (TEV scheduler, tuned): loss step, TEV stop step, lead\n")
    print("| variant | lr | seed | loss rule | loss step | TEV stop | lead |")
    print("|---|---|---|---|---|---|---|")
    stops = methods["TEV scheduler (tuned)"]
    for r in sorted(test, key=lambda r: (r["settings"]["lr"], r["settings"]["variant"], r["settings"]["seed"])):
        if r["divergent"]:
            s = stops[r["id"]]
            lead = f"{(r['end'] - s) / r['end']:.0%}" if s is not None else "missed"
            print(f"| {r['settings']['variant']} | {r['settings']['lr']} | {r['settings']['seed']} | "
                  f"{r['stop_reason']} | {r['end']} | {s if s is not None else '-'} | {lead} |")
    false = [r for r in test if not r["divergent"] and stops[r["id"]] is not None]
    if false:
        print("\nFalse stops (converged runs the tuned rule would stop):\n")
        for r in false:
            print(f"- {r['settings']['variant']} lr={r['settings']['lr']} seed={r['settings']['seed']} "
                  f"at step {stops[r['id']]}")
    print("\n```json\n" + json.dumps({"rule": rule.__dict__, "held_out": scores}, indent=1) + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
