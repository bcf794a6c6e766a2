"""The max_lr bracketing converges on synthetic outcome functions, alone, in parallel slots, and
as an Optuna sampler."""

import math
import random

import optuna
import pytest

from tunestab.bracket import (
    DONE,
    EXTEND,
    WAIT,
    Bracket,
    Design,
    bracket,
    first_lrs,
    is_done,
    next_bracket_lr,
    next_trial,
    split,
)
from tunestab.searchers import BracketSampler

LO, HI, RATIO = 1e-3, 3.0, 1.25


def search(threshold, slots=1, max_trials=30, seed=0):
    """Run the bracketing with up to `slots` trials in flight, finishing in a random order."""
    rng = random.Random(seed)
    design = Design(LO, HI, RATIO, slots=slots, max_trials=max_trials, seeds=0)
    trials = []  # (lr, stable?) in the order proposed; stable None while running
    while (lr := next_bracket_lr(trials, design)) is not None:
        if lr == WAIT:
            running = [i for i, (_, ok) in enumerate(trials) if ok is None]
            i = rng.choice(running)
            trials[i] = (trials[i][0], trials[i][0] < threshold)
            continue
        assert LO <= lr <= HI and not any(lr == t for t, ok in trials if ok is None)
        trials.append((lr, None))
    assert all(ok is not None for _, ok in trials)
    return trials, bracket(trials)


def test_a_round_splits_the_bracket_evenly_in_log_lr():
    # Nothing known: the searched range is the bracket. Then the bracket the outcomes leave.
    assert split([], 1e-3, 1.0, 2) == pytest.approx([1e-2, 1e-1])
    assert split([(0.01, True), (0.1, False)], 1e-3, 1.0, 1) == pytest.approx([math.sqrt(1e-3)])
    first = [(lr, lr < 0.05) for lr in split([], 1e-3, 1.0, 5)]
    nxt = next_bracket_lr(first, Design(1e-3, 1.0, 1.25, slots=5, seeds=0))
    assert nxt == pytest.approx(split(first, 1e-3, 1.0, 5)[0])  # the next round starts at its lowest
    assert split(first, 1e-3, 1.0, 5)[0] > max(lr for lr, ok in first if ok)


@pytest.mark.parametrize("threshold", [2e-3, 0.01, 0.137, 0.5, 2.9])
def test_sequential_bracketing_ends_within_ratio_around_the_threshold(threshold):
    outcomes, b = search(threshold)
    s, d = b.bounds(LO, HI)
    assert s < threshold <= d and d / s <= RATIO
    # Bisection in log-LR: log2(log(3000) / log(1.25)) = 5.2 halvings.
    assert len(outcomes) <= math.ceil(math.log2(math.log(HI / LO) / math.log(RATIO)))


@pytest.mark.parametrize("threshold", [0.01, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parallel_slots_converge_with_more_trials_but_fewer_rounds(threshold, seed):
    outcomes, b = search(threshold, slots=3, seed=seed)
    s, d = b.bounds(LO, HI)
    assert s < threshold <= d and d / s <= RATIO
    assert len(set(lr for lr, _ in outcomes)) == len(outcomes)  # no LR tried twice
    assert len(outcomes) <= 12


def test_everything_stable_ends_at_the_top_of_the_range():
    outcomes, b = search(threshold=100.0)
    assert b.divergent is None and b.stable >= HI / RATIO


def test_everything_divergent_ends_at_the_bottom_of_the_range():
    outcomes, b = search(threshold=1e-6)
    assert b.stable is None and b.divergent <= LO * RATIO


def test_noisy_boundary_is_bracketed_conservatively():
    # 0.5 diverged although 0.6 did not (another seed would disagree): only stable LRs below the
    # smallest divergent one count.
    b = bracket([(0.1, True), (0.5, False), (0.6, True), (1.0, False)])
    assert b == Bracket(stable=0.1, divergent=0.5)


def test_max_trials_ends_a_variant():
    assert is_done([(0.1, True)] * 4, LO, HI, RATIO, max_trials=4)
    assert not is_done([(0.1, True)] * 3, LO, HI, RATIO, max_trials=4)


@pytest.mark.parametrize(
    "thresholds", [{"baseline": 0.05, "qk_norm": 0.4}, {"baseline": 0.05}], ids=["two variants", "one variant"]
)
def test_as_an_optuna_sampler_each_variant_gets_its_own_bracket(tmp_path, thresholds):
    # One variant: Optuna never asks the sampler for a one-choice `variant` (it crashed with a
    # KeyError on `lr` before the sampler chose lazily).
    design = Design(LO, HI, RATIO, slots=2, max_trials=12, seeds=0)
    sampler = BracketSampler(list(thresholds), design)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, sampler=sampler, direction="maximize")
    space = {
        "variant": optuna.distributions.CategoricalDistribution(list(thresholds)),
        "lr": optuna.distributions.FloatDistribution(LO, HI, log=True),
        "seed": optuna.distributions.IntDistribution(0, 0),
    }
    in_flight = []
    while not sampler.finished(study):
        while len(in_flight) < 4 and sampler.can_propose(study):
            in_flight.append(study.ask(fixed_distributions=space))
        t = in_flight.pop(0)
        lr, variant = t.params["lr"], t.params["variant"]
        study.tell(t, lr if lr < thresholds[variant] else 0.0)  # the `stable_lr` objective
    for t in in_flight:  # trials still running when the search finished complete as usual
        study.tell(t, t.params["lr"] if t.params["lr"] < thresholds[t.params["variant"]] else 0.0)
    # A new sampler reading the stored study (a restarted search) sees the same brackets.
    reread = BracketSampler(list(thresholds), design)
    state = reread.state(optuna.load_study(study_name="s", storage=storage, sampler=reread))
    for variant, threshold in thresholds.items():
        s, d = bracket([(lr, ok) for lr, _, ok in state[variant]]).bounds(LO, HI)
        assert s < threshold <= d and d / s <= RATIO, (variant, s, d)


# --------------------------------------------------------------------------------------------
# the boundary seeds


def drive(outcome, design: Design, parallel: int = 4, seed: int = 0):
    """Run one variant's max_lr to the end with `parallel` trials in flight, finishing in a
    random order; outcome(lr, seed) -> stable?"""
    rng = random.Random(seed)
    trials = []  # (lr, seed, stable or None while running), in the order proposed
    while True:
        while sum(ok is None for *_, ok in trials) < parallel:
            nxt = next_trial(trials, design)
            if not isinstance(nxt, tuple):
                break
            assert nxt not in [(lr, s) for lr, s, _ in trials] and design.lo <= nxt[0] <= design.hi
            trials.append((*nxt, None))
        running = [i for i, (*_, ok) in enumerate(trials) if ok is None]
        if not running:
            assert next_trial(trials, design) == DONE
            return trials
        i = running[rng.randrange(len(running))]
        lr, s, _ = trials[i]
        trials[i] = (lr, s, outcome(lr, s))


def test_boundary_seeds_sample_a_staggered_grid_around_the_bracket():
    d = Design(LO, HI, ratio=1.41, seeds=4, points=4, step=math.sqrt(2), seed=7)
    done = drive(lambda lr, s: lr < 0.1, d)
    first = [(lr, ok) for lr, s, ok in done if s == 7]
    b = bracket(first)
    assert b.stable < 0.1 <= b.divergent and b.divergent / b.stable <= 1.41
    grid = sorted((lr, s) for lr, s, _ in done if s != 7)
    assert {s for _, s in grid} == {8, 9, 10, 11}  # seeds besides the bracketing one
    centre = math.sqrt(b.stable * b.divergent)
    per_seed = {s: sorted(lr for lr, t in grid if t == s) for s in (8, 9, 10, 11)}
    for j, s in enumerate((8, 9, 10, 11)):
        assert len(per_seed[s]) == 4  # a sharp boundary inside the grid: no level added
        steps = [math.log(b_ / a_) / math.log(math.sqrt(2)) for a_, b_ in zip(per_seed[s], per_seed[s][1:])]
        assert steps == pytest.approx([1, 1, 1])
        assert math.log(per_seed[s][0] / centre) / math.log(math.sqrt(2)) == pytest.approx(-1.5 + (j + 0.5) / 4 - 0.5)
    # Together the four seeds sample the boundary at a quarter of a step.
    every = sorted(lr for lr, _ in grid)
    assert [math.log(b_ / a_) / math.log(math.sqrt(2)) for a_, b_ in zip(every, every[1:])] == pytest.approx(
        [0.25] * 15
    )


def test_the_grid_grows_until_both_sides_of_the_boundary_are_seen():
    """Seeds whose boundaries lie far apart: levels are added below while the lowest still sees
    a divergence, and above while the highest still sees a stable run, EXTEND at most."""
    boundary = {0: 0.1, 1: 0.02, 2: 0.1, 3: 0.1, 4: 0.5}
    d = Design(LO, HI, ratio=1.41, seeds=4, points=4, step=math.sqrt(2))
    done = drive(lambda lr, s: lr < boundary[s], d)
    for s in (1, 4):
        lrs = sorted(lr for lr, t, _ in done if t == s)
        assert 4 < len(lrs) <= 4 + 2 * EXTEND
    assert min(lr for lr, t, ok in done if t == 1) < 0.02  # seed 1's boundary is seen from below
    assert any(ok for lr, t, ok in done if t == 1) or len([1 for _, t, _ in done if t == 1]) == 4 + 2 * EXTEND


def test_nothing_starts_while_the_bracket_may_still_move():
    d = Design(LO, HI, ratio=1.41, seeds=2, step=math.sqrt(2))
    done = [(0.07, 0, True), (0.095, 0, False)]  # narrow enough: 0.095 / 0.07 = 1.36
    assert next_trial(done + [(0.08, 0, None)], d) == WAIT  # but a bracketing trial is still in flight
    lr, seed = next_trial(done, d)
    assert seed in (1, 2)  # a boundary seed's grid trial


@pytest.mark.parametrize("outcome,why", [(lambda lr, s: True, "every LR stable"), (lambda lr, s: False, "none")])
def test_no_boundary_seeds_when_the_boundary_is_outside_the_range(outcome, why):
    done = drive(outcome, Design(LO, HI, ratio=1.41, seeds=4, step=math.sqrt(2)))
    assert {s for _, s, _ in done} == {0}, why


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_the_trials_a_variant_runs_do_not_depend_on_concurrency_or_finishing_order(slots):
    """The bracket proposes in rounds chosen from earlier rounds' outcomes alone, and the grid
    grows only once its levels have all finished: 1, 2 or 4 trials at once, finishing in any
    order, run the same (lr, seed) set. Boundaries differ by seed, so the grid grows."""
    boundary = {0: 0.1, 1: 0.03, 2: 0.1, 3: 0.12, 4: 0.4}
    d = Design(LO, HI, ratio=1.25, slots=slots, max_trials=12, seeds=4, points=3, step=math.sqrt(2))
    runs = {
        (parallel, order): sorted((lr, s) for lr, s, _ in drive(lambda lr, s: lr < boundary[s], d, parallel, order))
        for parallel in (1, 2, 4)
        for order in range(3)
    }
    first = runs[(1, 0)]
    assert len(first) > 12 and {s for _, s in first} == {0, 1, 2, 3, 4}
    assert all(r == first for r in runs.values()), {k: len(r) for k, r in runs.items()}


def sampler_run(thresholds: dict, design: Design, parallel: int, order: int) -> list:
    """BracketSampler driven as Tune drives it, `parallel` trials in flight finishing in a
    random order; returns every (variant, lr, seed) it proposed."""
    rng = random.Random(order)
    sampler = BracketSampler(list(thresholds), design)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    space = {
        "variant": optuna.distributions.CategoricalDistribution(list(thresholds)),
        "lr": optuna.distributions.FloatDistribution(LO, HI, log=True),
        "seed": optuna.distributions.IntDistribution(0, design.seeds),
    }
    in_flight = []
    while not sampler.finished(study):
        while len(in_flight) < parallel and sampler.can_propose(study):
            in_flight.append(study.ask(fixed_distributions=space))
        t = in_flight.pop(rng.randrange(len(in_flight)))
        lr, variant = t.params["lr"], t.params["variant"]
        study.tell(t, lr if lr < thresholds[variant] * (1.1 if t.params["seed"] % 2 else 0.9) else 0.0)
    return sorted((t.params["variant"], t.params["lr"], t.params["seed"]) for t in study.trials)


def test_the_sampler_proposes_the_same_trials_at_concurrency_1_and_4():
    thresholds = {"baseline": 0.05, "qk_norm": 0.4}
    d = Design(LO, HI, ratio=1.41, slots=2, max_trials=12, seeds=2, points=2, step=math.sqrt(2))
    one = sampler_run(thresholds, d, parallel=1, order=0)
    assert len(one) > 2 * 6
    for parallel, order in ((4, 0), (4, 1), (2, 2)):
        assert sampler_run(thresholds, d, parallel, order) == one, (parallel, order)


# --------------------------------------------------------------------------------------------
# the LR range test before the bracket


def test_after_a_range_test_the_bracket_starts_just_below_where_it_failed():
    d = Design(LO, HI, ratio=1.41, slots=2, range_margin=4.0, seeds=0, range_test=True)
    assert first_lrs(d, 0.8) == pytest.approx([0.4, 0.2])
    assert next_trial([], d, 0.8) == (pytest.approx(0.4), 0)
    assert next_trial([(0.4, 0, None)], d, 0.8) == (pytest.approx(0.2), 0)
    # The two make the first round: 0.2 comes second whatever 0.4's outcome, known or not.
    assert next_trial([(0.4, 0, False)], d, 0.8) == (pytest.approx(0.2), 0)
    assert next_trial([(0.4, 0, True)], d, 0.8) == (pytest.approx(0.2), 0)
    # The next round waits for both, then splits the bracket they left ([0.4, 3] here).
    assert next_trial([(0.4, 0, True), (0.2, 0, None)], d, 0.8) == WAIT
    lr, _ = next_trial([(0.4, 0, True), (0.2, 0, True)], d, 0.8)
    assert 0.4 < lr < HI


def range_search(thresholds: dict, range_lr: dict, design: Design, tmp_path):
    """Drive BracketSampler like Tune does, 4 trials in flight; a range test reports
    range_lr[variant], a fixed-LR trial is stable below its variant's threshold."""
    sampler = BracketSampler(list(thresholds), design)
    study = optuna.create_study(
        study_name="r", storage=f"sqlite:///{tmp_path / 'r.db'}", sampler=sampler, direction="maximize"
    )
    space = {
        "variant": optuna.distributions.CategoricalDistribution(list(thresholds)),
        "lr": optuna.distributions.FloatDistribution(LO, HI, log=True),
        "seed": optuna.distributions.IntDistribution(0, 0),
        "lr_schedule": optuna.distributions.CategoricalDistribution(["cosine", "range"]),
    }
    in_flight, order = [], []
    while not sampler.finished(study):
        while len(in_flight) < 4 and sampler.can_propose(study):
            in_flight.append(study.ask(fixed_distributions=space))
        t = in_flight.pop(0)
        v, lr, schedule = t.params["variant"], t.params["lr"], t.params["lr_schedule"]
        order.append((v, schedule))
        study.tell(t, range_lr[v] if schedule == "range" else (lr if lr < thresholds[v] else 0.0))
    return sampler, study, order


@pytest.mark.parametrize(
    "factor", [1.0, 3.0, 100.0, 0.01], ids=["at the boundary", "3x above", "100x above", "100x below"]
)
def test_max_lr_starts_with_one_range_test_per_variant_and_brackets_from_it(tmp_path, factor):
    thresholds = {"baseline": 0.05, "qk_norm": 0.4}
    design = Design(LO, HI, RATIO, slots=2, max_trials=12, seeds=0, range_test=True)
    estimate = {v: min(HI, max(LO, t * factor)) for v, t in thresholds.items()}
    sampler, study, order = range_search(thresholds, estimate, design, tmp_path)
    for v, threshold in thresholds.items():
        mine = [schedule for variant, schedule in order if variant == v]
        assert mine[0] == "range" and mine.count("range") == 1, mine  # first, and once
        s, d = bracket([(lr, ok) for lr, _, ok in sampler.state(study)[v]]).bounds(LO, HI)
        assert s < threshold <= d and d / s <= RATIO, (v, s, d)  # wherever the estimate was
        assert len(sampler.state(study)[v]) <= design.max_trials
        assert sampler.ranges(study)[v] == pytest.approx(estimate[v])
    if factor == 3.0:
        # A good estimate saves trials, its own included: the same search without it brackets
        # from the whole range.
        (tmp_path / "plain").mkdir()
        _, plain, _ = range_search(
            thresholds, estimate, Design(LO, HI, RATIO, slots=2, max_trials=12, seeds=0), tmp_path / "plain"
        )
        assert len(study.trials) < len(plain.trials)


@pytest.mark.slow
def test_bracket_search_runs_its_range_tests_and_boundary_seeds_under_tune(tmp_path):
    """BracketSearch in a real Tune run: a range test per arm first, then it waits (suggest ->
    None) while the bracket may still move, then hands out the boundary seeds' grid, and
    finishes. The arms are the scale strategy's: one variant at two sizes, each bracketed on its
    own, with the size's fields in each trial's config in place of the arm's label. The trainable
    stands in for a trial with a known boundary per size; its range test fails at 3x the boundary."""
    import ray
    from ray import tune

    from tunestab.searchers import BracketSearch

    edges = {16: 0.3, 32: 0.05}  # d_model -> boundary
    arms = {
        "baseline@w16": {"variant": "baseline", "d_model": 16},
        "baseline@w32": {"variant": "baseline", "d_model": 32},
    }

    def trial(config):
        assert config["variant"] == "baseline"
        assert config["size"] == {16: "w16", 32: "w32"}[config["d_model"]]  # the arm's size, a field of its own
        if config["lr_schedule"] == "range":
            tune.report({"stable_lr": 3 * edges[config["d_model"]]})
            return
        stable = config["lr"] < edges[config["d_model"]] * (1.1 if config["seed"] % 2 else 0.95)
        tune.report({"stable_lr": config["lr"] if stable else 0.0})

    design = Design(LO, HI, ratio=1.41, slots=2, max_trials=10, seeds=2, points=2, step=math.sqrt(2), range_test=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = BracketSearch(list(arms), design, storage=storage, study_name="b", arms=arms)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        results = tune.Tuner(
            trial,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=200, max_concurrent_trials=3),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    configs = [r.config for r in results]
    for d_model, edge in edges.items():
        mine = [c for c in configs if c["d_model"] == d_model]
        assert [c["lr"] for c in mine if c["lr_schedule"] == "range"] == [HI]  # one ramp, to the top
        grid = [c for c in mine if c["seed"] in (1, 2)]
        assert len(grid) >= 2 * 2  # both boundary seeds, at two LRs or more each
        assert min(c["lr"] for c in grid) < edge < max(c["lr"] for c in grid)
    assert all(r.error is None for r in results)


@pytest.mark.slow
def test_under_tune_a_search_at_concurrency_1_and_4_runs_the_same_trials(tmp_path):
    """BracketSearch in real Tune runs of a trainable with a known boundary per variant and seed:
    one trial at a time and four at once propose the same (variant, lr, seed) set."""
    import ray
    from ray import tune

    from tunestab.searchers import BracketSearch

    edges = {"baseline": 0.05, "qk_norm": 0.4}

    def trial(config):
        stable = config["lr"] < edges[config["variant"]] * (1.1 if config["seed"] % 2 else 0.9)
        tune.report({"stable_lr": config["lr"] if stable else 0.0})

    design = Design(LO, HI, ratio=1.41, slots=2, max_trials=10, seeds=2, points=2, step=math.sqrt(2))
    ran = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        for concurrency in (1, 4):
            storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / f'optuna{concurrency}.db'}")
            searcher = BracketSearch(list(edges), design, storage=storage, study_name="c")
            results = tune.Tuner(
                tune.with_resources(trial, {"cpu": 0.25}),
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=200, max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(storage_path=str(tmp_path / f"tune{concurrency}"), verbose=0),
            ).fit()
            assert all(r.error is None for r in results)
            ran[concurrency] = sorted((r.config["variant"], r.config["lr"], r.config["seed"]) for r in results)
    finally:
        ray.shutdown()
    assert len(ran[1]) > 2 * 6 and ran[1] == ran[4]
