"""The `scale` strategy's predictions: the max stable LR at a size larger than any measured.

**Measure.** For each variant and each size the space names, `max_lr` finds the max stable LR
with its 90% posterior interval (tunestab/boundary.py).

**Fit.** Per variant, ln(max stable LR) = a + alpha * ln N, with N the parameter count without
the embeddings (Kaplan et al.'s and Wortsman et al.'s convention: the embeddings' size does not
set how the blocks' activations grow). The fit is repeated on draws from every size's posterior,
so each prediction carries the measurements' uncertainty; its 90% interval is the draws' 5-95%
range. A line is a model, not a law: when the sizes scatter about it more than their intervals
allow (chi^2 per degree of freedom above 1, with each size's sigma from its posterior), the
interval is widened by the square root of that ratio (the Birge ratio), so that lack of fit is
paid for in the interval rather than hidden. With two sizes there is no such check.

**Model form.** A straight line in ln N is also a guess about the sizes not measured: the frontier
may bend (docs/results.md: in the two QK-norm blow-up runs the w96 point missed the line through
w32-w64 by about 12%, above it in one run and below in the other). So the fit carries a
curvature term, ln(max stable LR) = line + kappa * (ln N)^2, with its own prior
kappa ~ N(0, tau^2) (`curvature_prior`, tau; 0.06 by default, which bends the frontier by about
that 12% at w96). The term matters where (ln N)^2 departs from the line the fit puts through the sizes
(`bend`): little among the measured sizes, more the farther an extrapolation goes. With three
sizes or more the data speak to kappa too (the sizes' departure from their line along that
shape, weighed against their posteriors' spread: a normal posterior for kappa); with two, kappa
is its prior. Each draw of the line gets a draw of kappa, so the prediction's interval carries
both. tau = 0 is the straight line alone. Every fit of three sizes or more also reports each size
as predicted by the fit through the others (`leave_one_out`), and whether it lay inside. Coverage
of a held-out larger size, with straight and bent frontiers: docs/results/scale_design_sim.py.

Only numpy here, and torch to count parameters (`non_embedding_params`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.90


def non_embedding_params(cfg) -> int:
    """Parameters of a TrialConfig's model without token and position embeddings or the LM head,
    counted on the meta device (no memory, any size)."""
    import torch

    from .model import GPT

    if cfg.vocab_size < 1:  # set from the tokenizer when training; the blocks do not depend on it
        cfg = dataclasses.replace(cfg, vocab_size=256)
    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.ln_f.parameters())


@dataclass(frozen=True)
class Frontier:
    """One variant's fit of ln(max stable LR) against ln N, and its prediction at the target."""

    alpha: float
    """The exponent: max stable LR ~ N^alpha (median over draws)."""
    alpha_low: float
    alpha_high: float
    predicted: float
    """The max stable LR at the target size (median over draws)."""
    low: float
    high: float
    """Its 90% interval, widened by `birge` when above 1."""
    birge: float
    """sqrt(chi^2 / degrees of freedom) of the sizes about the line; NaN with two sizes."""
    sizes: int
    """Sizes the fit used (those whose boundary has an interval)."""
    line: tuple[tuple[float, float, float, float], ...] = ()
    """(N, median, low, high) along ln N, from the smallest size to the target, for the plot."""
    at: tuple[tuple[float, float, float], ...] = ()
    """(median, low, high) at each of the `others` sizes fit_frontier was asked about."""
    curvature: float = 0.0
    """kappa's posterior mean (0 with two sizes, or with no curvature prior)."""
    curvature_sd: float = 0.0
    """kappa's posterior sd (its prior's, tau, with two sizes)."""
    loso: tuple[tuple[float, float, float, float, bool], ...] = ()
    """Per fitted size, in order: (predicted by the fit through the other sizes, its low, high,
    the size's measured median, whether that lay inside). Empty below three sizes."""


# The prior sd of the curvature kappa in ln N (docs/results.md: the size of the scale runs' misses);
# the `scale` section's default (scale.curvature_prior).
CURVATURE_PRIOR = 0.06


def bend(x_fit, x_at) -> np.ndarray:
    """How far (ln N)^2 lies at x_at from the least-squares line through it at x_fit: what a
    curvature of 1 in ln N adds at x_at to a line fitted at x_fit."""
    x_fit, x_at = np.asarray(x_fit, dtype=float), np.asarray(x_at, dtype=float)
    return x_at**2 - np.polyval(np.polyfit(x_fit, x_fit**2, 1), x_at)


def leave_one_out(x: np.ndarray, y: np.ndarray, curvature_prior: float, confidence: float, seed: int):
    """Each size as the fit through the other sizes predicts it: (predicted, low, high, measured
    median, inside) per size. x: ln N of the sizes; y: sizes x draws of ln(max stable LR)."""
    rows = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        f = fit_frontier(
            x[keep],
            list(y[keep]),
            float(x[i]),
            rng=np.random.default_rng(seed + i),
            confidence=confidence,
            curvature_prior=curvature_prior,
            check=False,
        )
        measured = math.exp(float(np.median(y[i])))
        rows.append((f.predicted, f.low, f.high, measured, bool(f.low <= measured <= f.high)))
    return tuple(rows)


def fit_frontier(
    ln_n,
    samples,
    target_ln_n: float,
    others=(),
    rng: np.random.Generator | None = None,
    confidence: float = CONFIDENCE,
    curvature_prior: float = CURVATURE_PRIOR,
    check: bool = True,
) -> Frontier | None:
    """ln_n: each size's ln N; samples: each size's draws of ln(max stable LR) (the posterior of
    boundary.fit); others: more ln N to read the line at (the measured sizes, for the table);
    curvature_prior: tau, the prior sd of the curvature term (0: a straight line); check: with
    three sizes or more, predict each from the others (Frontier.loso). None with fewer than two
    distinct sizes."""
    x = np.asarray(ln_n, dtype=float)
    if len(x) < 2 or len(set(x.tolist())) < 2:
        return None
    rng = rng or np.random.default_rng(0)
    k = min(len(s) for s in samples)
    # Independent draws per size: each posterior shuffled on its own before pairing by index.
    y = np.stack([rng.permutation(np.asarray(s, dtype=float))[:k] for s in samples])  # sizes x k
    xc = x - x.mean()
    slope = (xc[:, None] * (y - y.mean(0))).sum(0) / (xc**2).sum()
    intercept = y.mean(0) - slope * x.mean()
    tail = (1 - confidence) / 2

    # Lack of fit: the sizes' medians about the line through them, in units of their posterior sds.
    med, sd = np.median(y, 1), y.std(1)
    birge = math.nan
    if len(x) > 2:
        b = np.polyfit(x, med, 1)
        chi2 = float((((med - np.polyval(b, x)) / np.maximum(sd, 1e-12)) ** 2).sum())
        birge = math.sqrt(chi2 / (len(x) - 2))
    widen = birge if birge > 1 else 1.0

    # The curvature: kappa's posterior from its prior and the sizes' departure from their line
    # along r = bend(x, x) (zero for two sizes), with the sizes' mean posterior variance as the
    # noise of each. One variance for all keeps r orthogonal to every line: per-size weights
    # would read a line's intercept and slope as curvature.
    r = bend(x, x) if len(x) > 2 else np.zeros_like(x)  # two points lie on their line
    noise = max(float(np.mean(sd**2)), 1e-24)
    kappa, kappa_sd = 0.0, 0.0
    if curvature_prior > 0:
        kappa_sd = 1 / math.sqrt(1 / curvature_prior**2 + float((r**2).sum()) / noise)
        kappa = kappa_sd**2 * float((r * med).sum()) / noise
    kappas = kappa + kappa_sd * rng.standard_normal(k)

    def at(ln_point: float) -> tuple[float, float, float]:
        pred = intercept + slope * ln_point + kappas * float(bend(x, ln_point))
        lo, mid, hi = np.quantile(pred, [tail, 0.5, 1 - tail])
        return math.exp(mid), math.exp(mid - widen * (mid - lo)), math.exp(mid + widen * (hi - mid))

    a_lo, a_mid, a_hi = np.quantile(slope, [tail, 0.5, 1 - tail])
    pred, low, high = at(target_ln_n)
    xs = np.linspace(min(x.min(), target_ln_n), max(x.max(), target_ln_n), 40)
    line = tuple((math.exp(p), *at(p)) for p in xs)
    return Frontier(
        float(a_mid),
        float(a_lo),
        float(a_hi),
        pred,
        low,
        high,
        birge,
        len(x),
        line,
        tuple(at(o) for o in others),
        kappa,
        kappa_sd,
        leave_one_out(x, y, curvature_prior, confidence, int(rng.integers(1 << 30))) if check and len(x) > 2 else (),
    )


def logit_predictor(
    sizes: list[tuple[float, list[float], list[float]]],
    target_ln_n: float,
    lo: float,
    hi: float,
    threshold: float,
    points: int = 400,
) -> float:
    """Wortsman et al.'s logit extrapolation as a max-LR prediction (see the module's doc).

    sizes: per size (ln N, LRs of its completed trials, their final max attention logits).
    Returns the lowest LR in [lo, hi] at which the extrapolated logit reaches `threshold`: lo
    when it does already there, NaN when it never does (or fewer than two sizes have two LRs)."""
    fits = []
    for ln_n, lrs, logits in sizes:
        lrs, logits = np.asarray(lrs, dtype=float), np.asarray(logits, dtype=float)
        ok = np.isfinite(logits) & (logits > 0) & np.isfinite(lrs) & (lrs > 0)
        if len(set(lrs[ok].tolist())) < 2:
            continue
        fits.append((ln_n, np.polyfit(np.log(lrs[ok]), np.log(logits[ok]), 1)))
    if len({f[0] for f in fits}) < 2:
        return math.nan
    grid = np.linspace(math.log(lo), math.log(hi), points)
    x = np.array([f[0] for f in fits])
    z = np.stack([np.polyval(f[1], grid) for f in fits])  # sizes x grid: ln logit
    degree = 2 if len(x) >= 3 else 1
    coeffs = np.polyfit(x, z, degree)  # (degree + 1) x grid
    at_target = sum(c * target_ln_n ** (degree - i) for i, c in enumerate(coeffs))
    over = np.nonzero(at_target >= math.log(threshold))[0]
    return math.exp(grid[over[0]]) if len(over) else math.nan
