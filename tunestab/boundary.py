"""The max stable LR with an interval: P(diverge | LR) fitted across seeds.

One seed's outcome at one LR is noisy near the boundary (seed 0 of one proxy completed at LR
0.604 in one study and diverged at 0.6 in another), so the answer is a property of the
distribution over seeds, not one trial's LR. With trials at several LRs and seeds,

    P(diverge | lr) = 1 / (1 + exp(-(ln lr - m) / s))

is fitted (m: where half the seeds diverge, s > 0: how gradual the boundary is, both in ln LR).
The max stable LR is where it crosses `p` (10%): q = m + s * ln(p / (1 - p)).

The interval is the `confidence` (90%) equal-tailed posterior interval of q, the posterior
computed on a grid of (m, s) under a flat prior on m and a log-uniform prior on s. The point
estimate is its median. Why a posterior and not a bootstrap: near a sharp boundary the trials are
often perfectly separated (every LR below some gap completes, every one above diverges), where
the maximum-likelihood slope is infinite; a parametric bootstrap of the Firth-penalised fit then
covered the true crossing in only 12-37 of 100 simulated searches, the posterior in 84-95
(docs/results.md, "The max stable LR with an interval"; tests/test_boundary.py keeps it above 85).
On separated data the posterior puts the boundary anywhere in the gap, which is what the data say.

A TEV-stopped trial counts as divergent (predicted), as in the bracket (tunestab/bracket.py).
Only numpy is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

P_DIVERGE = 0.10
CONFIDENCE = 0.90
# The prior on s, in ln LR: from a boundary far sharper than any grid tried (0.01, 1/35 of a
# sqrt(2) step) to one spread over a factor e^5 per logistic unit.
SCALE_RANGE = (0.01, 5.0)
# How gradual the boundary is across seeds can only be read off several seeds: with fewer, the
# posterior of its 10% point is the prior's (one seed's trials, however many, put its lower end
# a thousandfold below the boundary), so no interval is given.
MIN_SEEDS = 3


@dataclass(frozen=True)
class Boundary:
    """The max stable LR of one variant, with its interval."""

    lr: float
    """Where P(diverge) crosses p (posterior median); NaN when the trials cannot place it."""
    low: float
    high: float
    """The `confidence` interval of lr (NaN when lr is)."""
    trials: int
    seeds: int
    """Distinct seeds among the trials."""
    p: float = P_DIVERGE
    curve: tuple[tuple[float, float], ...] = ()
    """(lr, posterior median of P(diverge | lr)) for plotting. P rises with the LR for every
    (m, s), so P(lr) >= p exactly where q <= lr: the pointwise median crosses p at the median
    of q, the reported point, which the posterior mean (plotted before) does not."""
    band: tuple[tuple[float, float, float], ...] = ()
    """(lr, low, high): the `confidence` pointwise posterior band of P(diverge | lr)."""
    samples: tuple[float, ...] = ()
    """ln q drawn from the posterior (for intervals of ratios between variants)."""

    @property
    def found(self) -> bool:
        return not math.isnan(self.lr)

    @property
    def has_interval(self) -> bool:
        """Fitted over MIN_SEEDS seeds or more. With fewer, the point is the prior's as much as
        the data's, and can sit below an LR that trained stably: the answer is then the bracket."""
        return not math.isnan(self.low)


def fit(
    lrs,
    diverged,
    seeds=None,
    p: float = P_DIVERGE,
    confidence: float = CONFIDENCE,
    grid: tuple[int, int] = (240, 60),
    samples: int = 4000,
    rng: np.random.Generator | None = None,
) -> Boundary:
    """The max stable LR of one variant from its trials: (lr, diverged?) pairs, at any seeds.
    With fewer than MIN_SEEDS seeds the point is given without an interval."""
    x = np.log(np.asarray(lrs, dtype=float))
    y = np.asarray(diverged, dtype=float)
    n_seeds = len(set(seeds)) if seeds is not None else 0
    if len(x) < 2 or y.min() == y.max():
        # All stable or all divergent: the boundary lies outside the LRs tried.
        return Boundary(math.nan, math.nan, math.nan, len(x), n_seeds, p)
    m = np.linspace(x.min() - 1.0, x.max() + 1.0, grid[0])
    s = np.exp(np.linspace(*np.log(SCALE_RANGE), grid[1]))
    z = (x[None, None, :] - m[:, None, None]) / s[None, :, None]
    loglik = (-y * np.logaddexp(0, -z) - (1 - y) * np.logaddexp(0, z)).sum(-1)
    w = np.exp(loglik - loglik.max())
    w /= w.sum()
    q = m[:, None] + s[None, :] * math.log(p / (1 - p))
    order = np.argsort(q, axis=None)
    qs, cum = q.ravel()[order], np.cumsum(w.ravel()[order])
    tail = (1 - confidence) / 2
    low, mid, high = (float(qs[min(np.searchsorted(cum, t), len(qs) - 1)]) for t in (tail, 0.5, 1 - tail))
    lr_grid = np.exp(np.linspace(x.min() - 0.5, x.max() + 0.5, 60))
    zz = (np.log(lr_grid)[None, None, :] - m[:, None, None]) / s[None, :, None]
    logistic = 0.5 * (1 + np.tanh(zz / 2))  # 1 / (1 + e^-z), without overflow far from the boundary
    pointwise = _weighted_quantiles(logistic.reshape(-1, len(lr_grid)), w.ravel(), (tail, 0.5, 1 - tail))
    curve = tuple(zip(lr_grid.tolist(), pointwise[1].tolist()))
    band = tuple(zip(lr_grid.tolist(), pointwise[0].tolist(), pointwise[2].tolist()))
    rng = rng or np.random.default_rng(0)
    if seeds is not None and n_seeds < MIN_SEEDS:
        return Boundary(math.exp(mid), math.nan, math.nan, len(x), n_seeds, p, curve, band)
    drawn = rng.choice(qs, size=samples, p=w.ravel()[order])
    return Boundary(
        math.exp(mid), math.exp(low), math.exp(high), len(x), n_seeds, p, curve, band, tuple(drawn.tolist())
    )


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs) -> list[np.ndarray]:
    """Per column of values (draws x points), the weighted quantiles qs, as one array each."""
    order = np.argsort(values, axis=0)
    ordered = np.take_along_axis(values, order, axis=0)
    cum = np.cumsum(weights[order], axis=0)
    out = []
    for q in qs:
        idx = np.minimum((cum < q).sum(axis=0), len(values) - 1)
        out.append(ordered[idx, np.arange(values.shape[1])])
    return out


def ratio(a: Boundary, b: Boundary, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """a.lr / b.lr, with the `confidence` interval of the ratio of the two (independent)
    posteriors: NaN where either boundary was not found; the point alone where either has no
    interval (fewer than MIN_SEEDS seeds)."""
    if not (a.found and b.found):
        return math.nan, math.nan, math.nan
    if not (a.samples and b.samples):
        return a.lr / b.lr, math.nan, math.nan
    n = min(len(a.samples), len(b.samples))
    # Each fit draws its samples from the same seeded generator: paired by index they would move
    # together. Shuffled, they pair as independent draws.
    logs = np.asarray(a.samples[:n]) - np.random.default_rng(1).permutation(np.asarray(b.samples[:n]))
    tail = (1 - confidence) / 2
    low, mid, high = np.quantile(logs, [tail, 0.5, 1 - tail])
    return math.exp(mid), math.exp(low), math.exp(high)
