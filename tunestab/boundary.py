"""The max stable LR with an interval: a logistic fit of P(diverge | LR) across seeds.

One seed's outcome at one LR is noisy near the boundary: a seed can diverge where a lower LR
completed, and another seed completes where this one diverged. So the answer is not one trial's
LR but a property of the distribution over seeds. With trials at several LRs and seeds,

    P(diverge | lr) = 1 / (1 + exp(-(a + b * ln lr)))        (b > 0)

is fitted by maximum likelihood with Firth's penalty (Firth 1993, the Jeffreys prior): boundary
data are often perfectly separated (every trial below some LR completes, every one above it
diverges), where the plain maximum-likelihood slope is infinite and Firth's stays finite. The
max stable LR is where the fitted probability crosses `p` (10% by default), and its interval is a
parametric bootstrap: outcomes are redrawn from the fitted curve at the same LRs, refitted, and
the crossing's percentiles taken. Redrawing every trial independently ignores that one seed's
outcomes are ordered in LR, which makes the interval wider, not narrower, than the data warrant
(tests/test_boundary.py measures its coverage on simulated searches).

A TEV-stopped trial counts as divergent (predicted), as in the bracket (tunestab/bracket.py).
Only numpy is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

P_DIVERGE = 0.10
CONFIDENCE = 0.90
BOOTSTRAP = 400


def firth_logistic(x: np.ndarray, y: np.ndarray, iterations: int = 100) -> np.ndarray:
    """(a, b) of P(y = 1 | x) = sigmoid(a + b x), by Firth-penalised maximum likelihood."""
    X = np.column_stack([np.ones_like(x), x])
    beta = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ beta, -30, 30)))
        w = np.clip(p * (1 - p), 1e-12, None)
        info = X.T @ (X * w[:, None])
        inv = np.linalg.inv(info + 1e-10 * np.eye(2))
        h = w * np.einsum("ij,jk,ik->i", X, inv, X)  # leverages of the weighted hat matrix
        step = inv @ (X.T @ (y - p + h * (0.5 - p)))
        # Step halving keeps the penalised likelihood from overshooting on separated data.
        largest = np.abs(step).max()
        if largest > 5:
            step *= 5 / largest
        beta = beta + step
        if largest < 1e-9:
            break
    return beta


def crossing(beta: np.ndarray, p: float = P_DIVERGE) -> float:
    """ln lr where sigmoid(a + b ln lr) = p; NaN unless the fit rises with the LR."""
    a, b = beta
    if not b > 1e-9:
        return math.nan
    return (math.log(p / (1 - p)) - a) / b


@dataclass(frozen=True)
class Boundary:
    """The max stable LR of one variant, with its interval."""

    lr: float
    """Where the fitted P(diverge) crosses p; NaN when the trials cannot place it."""
    low: float
    high: float
    """The `confidence` bootstrap interval of lr (NaN when lr is)."""
    trials: int
    seeds: int
    """Distinct seeds among the trials."""
    beta: tuple[float, float]
    """(a, b) of the fit in ln lr; (nan, nan) when there is none."""
    replicates: tuple[float, ...] = ()
    """ln lr of the crossing in each bootstrap replicate (for ratio intervals)."""

    def p_diverge(self, lr) -> np.ndarray:
        a, b = self.beta
        return 1.0 / (1.0 + np.exp(-(a + b * np.log(lr))))


def fit(lrs, diverged, seeds=None, p: float = P_DIVERGE, confidence: float = CONFIDENCE,
        bootstrap: int = BOOTSTRAP, rng: np.random.Generator | None = None) -> Boundary:
    """The max stable LR of one variant from its trials: (lr, diverged?) pairs, any seeds."""
    x = np.log(np.asarray(lrs, dtype=float))
    y = np.asarray(diverged, dtype=float)
    n_seeds = len(set(seeds)) if seeds is not None else 0
    nan = Boundary(math.nan, math.nan, math.nan, len(x), n_seeds, (math.nan, math.nan))
    # Both outcomes must be seen for a boundary to be placed between them.
    if len(x) < 2 or y.min() == y.max():
        return nan
    beta = firth_logistic(x, y)
    centre = crossing(beta, p)
    if math.isnan(centre):
        return nan
    rng = rng or np.random.default_rng(0)
    fitted = 1.0 / (1.0 + np.exp(-(beta[0] + beta[1] * x)))
    reps = []
    for _ in range(bootstrap):
        y_star = (rng.random(len(x)) < fitted).astype(float)
        c = crossing(firth_logistic(x, y_star), p) if y_star.min() != y_star.max() else math.nan
        # A replicate with one outcome only, or a falling curve, puts the crossing beyond the
        # LRs tried: at the side its outcomes point to, so the interval widens instead of
        # silently dropping the hardest replicates.
        if math.isnan(c):
            c = x.min() - 1.0 if y_star.mean() >= 0.5 else x.max() + 1.0
        reps.append(c)
    tail = (1 - confidence) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    return Boundary(math.exp(centre), math.exp(low), math.exp(high), len(x), n_seeds,
                    (float(beta[0]), float(beta[1])), tuple(float(r) for r in reps))


def ratio(a: Boundary, b: Boundary, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """a.lr / b.lr with a `confidence` interval from the two independent bootstraps."""
    if math.isnan(a.lr) or math.isnan(b.lr) or not a.replicates or not b.replicates:
        return math.nan, math.nan, math.nan
    n = min(len(a.replicates), len(b.replicates))
    logs = np.asarray(a.replicates[:n]) - np.asarray(b.replicates[:n])
    tail = (1 - confidence) / 2
    low, high = np.quantile(logs, [tail, 1 - tail])
    return a.lr / b.lr, math.exp(low), math.exp(high)
