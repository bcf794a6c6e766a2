"""The scale strategy's maths: parameter counts, the fit of ln(max stable LR) against ln N with
its prediction interval, and Wortsman et al.'s attention-logit predictor."""

import math

import numpy as np
import pytest

from tunestab import scaling
from tunestab.config import TrialConfig
from tunestab.model import GPT


@pytest.mark.parametrize("variant", ["baseline", "qk_norm", "mlra", "sigma_reparam"])
def test_non_embedding_params_counts_the_blocks_and_the_final_norm_of_the_real_model(variant):
    cfg = TrialConfig(variant=variant, d_model=32, n_head=2, n_layer=2, vocab_size=300)
    model = GPT(cfg)
    embeddings = model.wte.weight.numel() + model.wpe.weight.numel()
    head = 0 if cfg.tie_embeddings else model.lm_head.weight.numel()
    assert scaling.non_embedding_params(cfg) == model.num_params() - embeddings - head
    # The vocabulary does not change it; the width does.
    assert scaling.non_embedding_params(
        TrialConfig(variant=variant, d_model=32, n_head=2, n_layer=2)
    ) == scaling.non_embedding_params(cfg)
    assert scaling.non_embedding_params(
        TrialConfig(variant=variant, d_model=64, n_head=2, n_layer=2)
    ) > scaling.non_embedding_params(cfg)


def simulated(rng, ln_n, alpha=-0.5, sd=0.15, draws=2000):
    """Posterior draws of ln(max stable LR) per size around a measured value that is itself off
    the true line by one measurement error, as boundary.fit's would be."""
    truth = math.log(0.1) + alpha * (np.asarray(ln_n) - ln_n[0])
    measured = truth + rng.normal(0, sd, len(ln_n))
    return [rng.normal(m, sd, draws) for m in measured]


def test_the_prediction_interval_covers_the_true_max_stable_lr_as_often_as_it_says():
    rng = np.random.default_rng(3)
    ln_n = np.log([2.5e4, 5.6e4, 1e5])
    target = math.log(4e5)
    truth = 0.1 * math.exp(-0.5 * (target - ln_n[0]))
    hits, alphas = 0, 0
    for _ in range(200):
        fr = scaling.fit_frontier(ln_n, simulated(rng, ln_n), target, rng=rng, check=False)
        hits += fr.low <= truth <= fr.high
        alphas += fr.alpha_low <= -0.5 <= fr.alpha_high
    # 90% nominal; the Birge widening only widens.
    assert 0.85 <= hits / 200 <= 0.99 and 0.85 <= alphas / 200 <= 0.99, (hits, alphas)


def test_sizes_off_the_line_widen_the_interval_by_the_birge_ratio():
    rng = np.random.default_rng(0)
    ln_n = np.log([1e4, 4e4, 1.6e5, 6.4e5])
    target = math.log(2.56e6)
    straight = [rng.normal(m, 0.05, 4000) for m in (-2.0, -2.5, -3.0, -3.5)]
    bent = [rng.normal(m, 0.05, 4000) for m in (-2.0, -2.8, -2.8, -3.5)]  # 0.3 off at 6 sd
    a = scaling.fit_frontier(ln_n, straight, target)
    b = scaling.fit_frontier(ln_n, bent, target)
    assert a.birge < 2 and b.birge > 3
    assert math.log(b.high / b.low) > 2 * math.log(a.high / a.low)
    assert a.predicted == pytest.approx(math.exp(-4.0), rel=0.05)
    assert scaling.fit_frontier(ln_n[:1], straight[:1], target) is None  # one size: no line


def bent_searches(kappa: float, tau: float, searches: int = 100, sd: float = 0.04) -> float:
    """Coverage of the truth at a larger held-out size when the frontier bends by kappa in ln N,
    over simulated searches at three sizes (the shipped scale_cpu's N)."""
    rng = np.random.default_rng(7)
    ln_n = np.log([25600, 56768, 100224])
    target = math.log(224000)

    def curve(x):
        return math.log(0.7) - 0.3 * (x - ln_n[0]) + kappa * (x - ln_n[0]) ** 2

    hits = 0
    for _ in range(searches):
        samples = [rng.normal(curve(x) + rng.normal(0, sd), sd, 2000) for x in ln_n]
        fr = scaling.fit_frontier(ln_n, samples, target, rng=rng, curvature_prior=tau, check=False)
        hits += fr.low <= math.exp(curve(target)) <= fr.high
    return hits / searches


def test_a_frontier_that_bends_as_the_scale_runs_saw_is_covered_with_the_curvature_term_not_without():
    """kappa = 0.06 puts the w96 point 12% above the line through w32-w64, the size of the scale
    runs' misses there (docs/results.md). The
    straight line's 90% interval misses it more often than not; the curvature prior's covers it."""
    straight, curved = bent_searches(0.06, 0.0), bent_searches(0.06, scaling.CURVATURE_PRIOR)
    assert straight < 0.7 and curved >= 0.85, (straight, curved)  # seen: 0.57 and 0.89
    assert bent_searches(0.0, scaling.CURVATURE_PRIOR) >= 0.9  # and a straight frontier stays covered


def test_the_curvature_term_widens_an_extrapolation_far_more_than_the_measured_sizes():
    rng = np.random.default_rng(0)
    ln_n = np.log([1e4, 4e4, 1.6e5])
    samples = [rng.normal(m, 0.05, 4000) for m in (-2.0, -2.5, -3.0)]
    args = (ln_n, samples, math.log(1.6e6))
    line = scaling.fit_frontier(*args, others=ln_n, curvature_prior=0.0, rng=np.random.default_rng(1))
    curved = scaling.fit_frontier(*args, others=ln_n, rng=np.random.default_rng(1))
    assert line.curvature == line.curvature_sd == 0.0
    assert 0 < curved.curvature_sd <= scaling.CURVATURE_PRIOR and abs(curved.curvature) < curved.curvature_sd
    assert math.log(curved.high / curved.low) > 1.5 * math.log(line.high / line.low)  # 10x past the sizes
    # What the term adds (in ln LR) at the target, 10x past the last size, is several times
    # what it adds at any measured size, where the sizes pin the line.
    added = math.log(curved.high / curved.low) - math.log(line.high / line.low)
    at_sizes = [math.log(b[2] / b[1]) - math.log(a[2] / a[1]) for a, b in zip(line.at, curved.at)]
    assert added > 3 * max(at_sizes)


def test_a_scale_space_fits_with_the_curvature_prior_of_scaling_unless_it_names_one():
    from tunestab.strategies.scale import Scale

    assert Scale().curvature_prior == scaling.CURVATURE_PRIOR


def test_every_fit_of_three_sizes_or_more_predicts_each_size_from_the_others():
    rng = np.random.default_rng(0)
    ln_n = np.log([1e4, 4e4, 1.6e5, 6.4e5])
    medians = [-2.0, -2.5, -2.2, -3.5]  # the third 0.8 above the others' line, at 16 sd
    fr = scaling.fit_frontier(ln_n, [rng.normal(m, 0.05, 4000) for m in medians], math.log(2.56e6))
    assert len(fr.loso) == 4
    predicted, low, high, measured, inside = fr.loso[2]
    assert not inside and measured == pytest.approx(math.exp(-2.2), rel=0.01) and high < measured
    assert predicted == pytest.approx(math.exp(-3.0), rel=0.1)  # the line through the other three
    two = scaling.fit_frontier(ln_n[:2], [rng.normal(m, 0.05, 4000) for m in medians[:2]], math.log(2.56e6))
    assert two.loso == () and two.curvature == 0.0 and two.curvature_sd == scaling.CURVATURE_PRIOR


def test_the_logit_predictor_finds_where_the_extrapolated_logit_reaches_the_threshold():
    # ln logit = 2 ln lr + 0.5 ln N + 5 at every size: at N = e^14, 1e4 is reached at
    # ln lr = (ln 1e4 - 7 - 5) / 2.
    def size(ln_n):
        lrs = [0.01, 0.02, 0.04]
        return ln_n, lrs, [math.exp(2 * math.log(lr) + 0.5 * ln_n + 5) for lr in lrs]

    sizes = [size(8.0), size(9.0), size(10.0)]
    expected = math.exp((math.log(1e4) - 7 - 5) / 2)
    got = scaling.logit_predictor(sizes, 14.0, 1e-3, 10.0, 1e4, points=2000)
    assert got == pytest.approx(expected, rel=0.01)
    # Logits that do not grow with the LR (QK-norm) never reach it: no prediction.
    flat = [(ln_n, [0.01, 0.1], [30.0, 30.0]) for ln_n in (8.0, 9.0, 10.0)]
    assert math.isnan(scaling.logit_predictor(flat, 14.0, 1e-3, 10.0, 1e4))
    # Already past it at the bottom of the range: the range's low end.
    assert scaling.logit_predictor(sizes, 14.0, 0.5, 10.0, 1e4) == 0.5
    assert math.isnan(scaling.logit_predictor(sizes[:1], 14.0, 1e-3, 10.0, 1e4))  # one size
