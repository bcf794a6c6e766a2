"""How often the max stable LR's 90% interval covers the true boundary, in simulated max_lr
searches: tunestab's posterior interval, beside the parametric bootstrap of a Firth-penalised
logistic fit that it replaced.

    python bench/boundary_coverage.py                # 100 searches per cell, about 3 min
    python bench/boundary_coverage.py --searches 300

Each search runs tunestab/bracket.py's design (a bracket on one seed, then 4 boundary seeds x 4
LRs, staggered) against a synthetic outcome with a known boundary, and fits all its trials. Two
readings of seed noise: "coin", where each trial diverges with probability P(lr), a logistic of
the given spread (a chaotic boundary: seed 0 of one proxy completed at LR 0.604 and diverged at
0.6); "thresholds", where each seed has its own boundary, normal in ln LR with that spread, and
is stable below it. The spread is in sqrt(2) steps of LR. The truth is the LR where P(diverge)
is 10%. Results: docs/results.md, "The max stable LR with an interval".
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_boundary import STEP, simulated_searches  # noqa: E402

from tunestab import boundary  # noqa: E402


def firth_bootstrap(x: np.ndarray, y: np.ndarray, rng, replicates: int = 200, p: float = 0.1) -> tuple[float, float]:
    """The alternative: Firth-penalised logistic fit, outcomes redrawn from it at the same LRs,
    refitted; the 5th and 95th percentiles of the crossing (ln LR)."""

    def fit(yy):
        X = np.column_stack([np.ones_like(x), x])
        beta = np.zeros(2)
        for _ in range(100):
            prob = 1 / (1 + np.exp(-np.clip(X @ beta, -30, 30)))
            w = np.clip(prob * (1 - prob), 1e-12, None)
            inv = np.linalg.inv(X.T @ (X * w[:, None]) + 1e-10 * np.eye(2))
            h = w * np.einsum("ij,jk,ik->i", X, inv, X)
            step = inv @ (X.T @ (yy - prob + h * (0.5 - prob)))
            step *= min(1.0, 5 / max(np.abs(step).max(), 1e-30))
            beta = beta + step
            if np.abs(step).max() < 1e-9:
                break
        return beta

    def cross(beta):
        return (math.log(p / (1 - p)) - beta[0]) / beta[1] if beta[1] > 1e-9 else math.nan

    beta = fit(y)
    fitted = 1 / (1 + np.exp(-(beta[0] + beta[1] * x)))
    reps = []
    for _ in range(replicates):
        ys = (rng.random(len(x)) < fitted).astype(float)
        c = cross(fit(ys)) if ys.min() != ys.max() else math.nan
        reps.append(c if not math.isnan(c) else (x.min() - 1 if ys.mean() >= 0.5 else x.max() + 1))
    return tuple(np.quantile(reps, [0.05, 0.95]))


def coverage(model: str, spread: float, searches: int) -> dict:
    hits = {"posterior": 0, "bootstrap": 0}
    widths, trials = [], []
    for i, (done, truth) in enumerate(simulated_searches(model, spread, searches)):
        x = np.log([lr for lr, _, _ in done])
        y = np.array([not ok for _, _, ok in done], dtype=float)
        f = boundary.fit(np.exp(x), y, [s for _, s, _ in done], rng=np.random.default_rng(i))
        trials.append(len(done))
        if f.found:
            hits["posterior"] += math.log(f.low) <= truth <= math.log(f.high)
            widths.append((math.log(f.high) - math.log(f.low)) / STEP)
        if y.min() != y.max():
            lo, hi = firth_bootstrap(x, y, np.random.default_rng(i))
            hits["bootstrap"] += lo <= truth <= hi
    return {**hits, "width": float(np.median(widths)), "trials": float(np.mean(trials))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--searches", type=int, default=100)
    args = ap.parse_args(argv)
    n = args.searches
    print(f"{n} simulated max_lr searches per row; design: bracket to sqrt(2), then 4 boundary seeds x 4 LRs")
    print(
        "| seed noise | spread (sqrt(2) steps) | posterior interval covers | parametric bootstrap covers | "
        "median width (steps) | trials per search |"
    )
    print("|---|---|---|---|---|---|")
    for model in ("coin", "thresholds"):
        for spread in (0.1, 0.3, 0.6, 1.0):
            r = coverage(model, spread, n)
            print(
                f"| {model} | {spread} | {r['posterior']}/{n} | {r['bootstrap']}/{n} | {r['width']:.2f} | "
                f"{r['trials']:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
