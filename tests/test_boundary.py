"""The max stable LR with an interval: P(diverge | LR) fitted across seeds, and how often its
interval covers the true boundary in simulated max_lr searches."""

import math
from statistics import NormalDist

import numpy as np
import pytest
from test_bracket import drive

from tunestab import boundary
from tunestab.bracket import Design

STEP = math.log(math.sqrt(2))


def test_a_sharp_boundary_is_placed_in_its_gap():
    lrs = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32] * 3
    f = boundary.fit(lrs, [lr > 0.05 for lr in lrs], seeds=[0] * 6 + [1] * 6 + [2] * 6)
    assert f.found and f.seeds == 3 and f.trials == 18
    # Separated data say only that every seed's boundary is between 0.04 and 0.08: the interval
    # spans that gap (and, with 3 seeds, a little below it: the 10% point may lie lower).
    assert f.low <= 0.045 and 0.06 <= f.high <= 0.085 and f.low < f.lr < f.high


def test_a_gradual_boundary_gives_a_wider_interval_around_its_10_percent_point():
    rng = np.random.default_rng(0)
    lrs = np.exp(np.repeat(np.linspace(np.log(0.01), np.log(1.0), 12), 6))
    p = 1 / (1 + np.exp(-(np.log(lrs) - np.log(0.2)) / 0.5))
    f = boundary.fit(lrs, rng.random(len(lrs)) < p)
    truth = math.exp(math.log(0.2) + 0.5 * math.log(0.1 / 0.9))  # 0.066
    assert f.low < truth < f.high and f.high / f.low > 2


def test_all_stable_or_all_divergent_places_no_boundary():
    assert not boundary.fit([0.1, 0.2, 0.4], [False] * 3).found
    assert not boundary.fit([0.1, 0.2, 0.4], [True] * 3).found
    assert math.isnan(boundary.ratio(boundary.fit([0.1, 0.2], [False, True]), boundary.fit([0.1], [True]))[0])
    point = boundary.ratio(
        boundary.fit([0.1, 0.4], [False, True], [0, 0]), boundary.fit([0.1, 0.2], [False, True], [0, 0])
    )
    assert point[0] > 1 and math.isnan(point[1]) and math.isnan(point[2])  # one seed: the point alone


def test_ratios_have_intervals_that_widen_with_each_side():
    lrs = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64] * 4
    seeds = sorted([0, 1, 2, 3] * 7)
    low = boundary.fit(lrs, [lr > 0.05 for lr in lrs], seeds, rng=np.random.default_rng(1))
    high = boundary.fit(lrs, [lr > 0.2 for lr in lrs], seeds, rng=np.random.default_rng(2))
    r, r_low, r_high = boundary.ratio(high, low)
    assert r == pytest.approx(high.lr / low.lr, rel=0.2)
    assert r_low < 4 < r_high and r_low > 1  # the true ratio of the two boundaries is 4


def simulated_searches(truth_model: str, spread_steps: float, searches: int = 100):
    """`searches` max_lr searches (the real design, tunestab/bracket.py) against a synthetic
    outcome with a known boundary: yields each search's trials [(lr, seed, stable)] and the true
    ln LR where P(diverge) is 10%. Two readings of seed noise: "coin", where each trial diverges
    with probability P(lr) whatever its seed (near the boundary the outcome is chaotic: seed 0 of
    one proxy completed at LR 0.604 and diverged at 0.6); "thresholds", where each seed has its
    own boundary, normal in ln LR, and is stable below it. The spread is in sqrt(2) steps."""
    rng = np.random.default_rng(2026)
    design = Design(1e-3, 1.0, ratio=1.41, seeds=4, points=4, step=math.sqrt(2))
    scale = spread_steps * STEP
    for i in range(searches):
        centre = rng.uniform(math.log(0.01), math.log(0.3))
        if truth_model == "coin":
            truth = centre + scale * math.log(0.1 / 0.9)
            draws = {}

            def outcome(lr, s):
                key = (round(lr, 12), s)
                if key not in draws:
                    draws[key] = rng.random() >= 1 / (1 + math.exp(-(math.log(lr) - centre) / scale))
                return draws[key]
        else:
            truth = centre + scale * NormalDist().inv_cdf(0.1)
            edges = {}

            def outcome(lr, s):
                if s not in edges:
                    edges[s] = centre + scale * rng.standard_normal()
                return math.log(lr) < edges[s]

        yield drive(outcome, design, seed=i), truth


def coverage(truth_model: str, spread_steps: float, searches: int = 100) -> int:
    """How many simulated searches end with an interval that covers the true boundary."""
    covered = 0
    for i, (done, truth) in enumerate(simulated_searches(truth_model, spread_steps, searches)):
        f = boundary.fit(
            [lr for lr, _, _ in done],
            [not ok for _, _, ok in done],
            [s for _, s, _ in done],
            rng=np.random.default_rng(i),
        )
        covered += f.found and math.log(f.low) <= truth <= math.log(f.high)
    return covered


@pytest.mark.parametrize("truth_model", ["coin", "thresholds"])
@pytest.mark.parametrize("spread_steps", [0.1, 0.3])
def test_the_90_percent_interval_covers_the_true_boundary_in_85_of_100_searches(truth_model, spread_steps):
    """The issue's bar, on both readings of "seed noise", with a boundary spread over a tenth and
    a third of a sqrt(2) step. (Measured wider spreads, and the parametric bootstrap this
    replaced: docs/results.md.)"""
    assert coverage(truth_model, spread_steps) >= 85


def test_fewer_than_three_seeds_give_a_point_but_no_interval():
    """One seed's outcomes say where that seed's boundary is, not how it varies between seeds:
    an interval there would be the prior's."""
    lrs = [0.008, 0.011, 0.021, 0.026, 0.034, 0.05]
    one = boundary.fit(lrs, [lr > 0.022 for lr in lrs], seeds=[0] * 6)
    assert one.found and 0.008 < one.lr < 0.026
    assert math.isnan(one.low) and math.isnan(one.high) and one.samples == ()
    three = boundary.fit(lrs * 3, [lr > 0.022 for lr in lrs] * 3, seeds=[0] * 6 + [1] * 6 + [2] * 6)
    assert three.low < three.lr < three.high


@pytest.mark.parametrize("seeds", [1, 5])
def test_the_plotted_curve_crosses_p_at_the_reported_point(seeds):
    """p_diverge.png draws `curve` and marks `lr`: the curve must cross P = p there. It is the
    pointwise posterior median, which crosses at the median of the crossing point; the posterior
    mean drawn before crossed near 0.2, not 0.1, for a one-seed bracket."""
    import numpy as np

    from tunestab.boundary import fit

    rng = np.random.default_rng(seeds)
    lrs = np.exp(rng.uniform(np.log(1e-3), np.log(1.0), 12 * seeds))
    diverged = lrs > 0.05 * np.exp(rng.normal(0, 0.3, len(lrs)))
    f = fit(lrs, diverged, np.repeat(np.arange(seeds), 12), rng=np.random.default_rng(0))
    xs, ps = np.log([c[0] for c in f.curve]), np.array([c[1] for c in f.curve])
    i = int(np.argmax(ps >= f.p))  # the first grid point at or above p
    crossing = xs[i - 1] + (f.p - ps[i - 1]) / (ps[i] - ps[i - 1]) * (xs[i] - xs[i - 1])
    step = xs[1] - xs[0]
    assert abs(crossing - np.log(f.lr)) <= step, (np.exp(crossing), f.lr)
    assert all(lo <= c[1] <= hi for c, (_, lo, hi) in zip(f.curve, f.band))
