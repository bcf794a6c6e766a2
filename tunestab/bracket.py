"""The `max_lr` strategy: per variant, find where the LR starts to diverge, then spend seeds there.

**1. Bracket** (one seed, the space's `trial.seed`). Each variant keeps a bracket [largest
stable LR, smallest divergent LR] in log-LR. Until it is narrow enough (divergent / stable <=
`ratio`), the next LR is one of the `slots` points that split the bracket evenly in log space,
the one farthest from any trial still running, so that `slots` trials of a variant run side by
side and each still halves-or-better the bracket. Before any outcome is known, the ends of the
searched range stand in for the bracket: a trial at the top of the range is not spent to learn
that it diverges, nor one at the bottom to learn that it does not. The bracket is taken
conservatively: the smallest divergent LR bounds it from above, and only stable LRs below that
count.

**2. Boundary seeds.** One seed says where *that seed* diverges. Around the bracket's centre, `seeds`
further seeds (trial.seed + 1, + 2, ...) each run a grid of `points` LRs `step` apart; seed j's grid is
offset by j/seeds of a step, so together the seeds sample the boundary `seeds` times finer than
one grid would. While any trial at the lowest grid level diverged, a level is added below; while
any at the highest completed, one is added above (at most `EXTEND` each way), so that the fit sees
the boundary from both sides. tunestab/boundary.py fits P(diverge | LR) to all of a variant's
trials and reads the max stable LR, with its interval, where it crosses 10%.

**0. An LR range test** (with `range_test`; Smith's test, as fastai's `lr_find`). Before the
bracket, one run per variant whose LR climbs exponentially from the range's low end to its high
end (`lr_schedule: range`, tunestab/loop.py) reports `range_lr`, where its loss passed l0. The
bracket's first `slots` trials then sit just below it, at range_lr / range_margin^(i / slots),
i = 1 ... slots (a ramp fails later than a run held at one LR), instead of splitting the whole
range; from their outcomes the bracket narrows as usual, with the whole range behind it, so an
estimate far off costs a round, not the answer. The range run is not an outcome at a fixed LR:
the bracket and the fit never see it.

A trial that failed (an error, not a divergence) says nothing about the LR and is left out.
`BracketSampler` is this logic as an Optuna sampler over {variant, lr, seed}: the study stores
every trial and its objective (`stable_lr` = lr when the trial completed without diverging, 0
when it diverged or the TEV scheduler stopped it), so a restarted search reads its state back
from the study. `BracketSearch` is Ray Tune's `OptunaSearch` with that sampler; it proposes
nothing while a variant's next step waits on trials in flight, and finishes when every variant
has its boundary trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from ray.tune.search import Repeater, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

OBJECTIVE = "stable_lr"
# Grid levels a variant's boundary grid may grow by on each side.
EXTEND = 3


@dataclass(frozen=True)
class Bracket:
    stable: float | None
    """Largest LR seen stable below the smallest divergent one (None: none yet)."""
    divergent: float | None
    """Smallest LR seen diverging (None: none yet)."""

    def bounds(self, lo: float, hi: float) -> tuple[float, float]:
        """The bracket with the searched range's ends standing in for unknown sides."""
        return (self.stable if self.stable is not None else lo,
                self.divergent if self.divergent is not None else hi)


def bracket(outcomes: list[tuple[float, bool]]) -> Bracket:
    """outcomes: (lr, stable?) of finished trials."""
    divergent = min((lr for lr, ok in outcomes if not ok), default=None)
    stable = max((lr for lr, ok in outcomes if ok and (divergent is None or lr < divergent)), default=None)
    return Bracket(stable, divergent)


def is_done(outcomes, lo: float, hi: float, ratio: float, max_trials: int) -> bool:
    if len(outcomes) >= max_trials:
        return True
    b = bracket(outcomes)
    s, d = b.bounds(lo, hi)
    # Narrow enough, or the range's end is known to be stable (nothing above it is searched).
    return d / s <= ratio or (b.divergent is None and b.stable is not None and b.stable >= hi / ratio)


def next_lr(outcomes, pending: list[float], lo: float, hi: float, slots: int) -> float:
    """The next LR to try for one variant, given finished outcomes and LRs still running."""
    s, d = bracket(outcomes).bounds(lo, hi)
    a, b = math.log(s), math.log(d)
    # The bracket's ends count as taken even when they are the range's ends, so that the
    # middle of the bracket, not a point near an untried end, is the farthest from everything.
    taken = [a, b] + [math.log(x) for x in pending] + [math.log(lr) for lr, _ in outcomes]
    # The slots-section points, then finer ones in case they are all taken already.
    candidates = [a + (b - a) * i / (n + 1) for n in (slots, 2 * slots + 1) for i in range(1, n + 1)]

    def room(x: float) -> float:
        return min((abs(x - t) for t in taken), default=math.inf)

    # Farthest from anything running or tried; on ties the lower LR (cheaper to learn from it
    # when it is stable, no worse when it is not).
    return math.exp(max(candidates, key=lambda x: (round(room(x), 9), -x)))


@dataclass(frozen=True)
class Design:
    """How `max_lr` spends one variant's trials (the space's `max_lr` section)."""

    lo: float
    hi: float
    """The searched LR range."""
    ratio: float = 1.25
    slots: int = 2
    max_trials: int = 12
    """Bracketing trials at most."""
    seed: int = 0
    """The bracketing seed; boundary seeds are seed + 1 ... seed + seeds."""
    seeds: int = 4
    points: int = 4
    step: float = math.sqrt(2)
    range_test: bool = False
    """Start each variant with an LR range test, and bracket from where it failed."""
    range_margin: float = 4.0
    """The first bracketing trials sit at range_lr / range_margin^(i / slots), i = 1 ... slots."""

    def grid_lr(self, centre: float, level: int, j: int) -> float:
        """Boundary seed j's LR at grid level `level` (0 ... points - 1 around the centre)."""
        offset = level - (self.points - 1) / 2 + (j + 0.5) / self.seeds - 0.5
        return min(self.hi, max(self.lo, centre * self.step ** offset))


WAIT = "wait"  # next_trial: nothing to start until a trial in flight finishes
DONE = "done"  # next_trial: this variant has every trial it needs
RANGE = "range"  # lr_schedule of an LR range test run
RUNNING = "running"  # a variant's range test has not reported its range_lr yet


def same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def first_lrs(d: Design, range_lr: float) -> list[float]:
    """The bracket's first LRs after a range test that failed at `range_lr`."""
    return [range_lr / d.range_margin ** ((i + 1) / d.slots) for i in range(d.slots)]


def next_trial(outcomes: list[tuple[float, int, bool]], pending: list[tuple[float, int]], d: Design,
               range_lr: float | None = None):
    """One variant's next trial as (lr, seed), or WAIT, or DONE.

    outcomes: (lr, seed, stable?) of its finished trials; pending: (lr, seed) of those running;
    range_lr: where its LR range test failed, when the design has one (the bracket starts there)."""
    first = [(lr, ok) for lr, seed, ok in outcomes if seed == d.seed]
    running = [lr for lr, seed in pending if seed == d.seed]
    if not is_done(first, d.lo, d.hi, d.ratio, d.max_trials - len(running)):
        if range_lr is not None:
            # The range test's points first, while they still lie inside the bracket and untried
            # (the range's ends are never tried: see the module's doc).
            s, top = bracket(first).bounds(d.lo, d.hi)
            tried = [lr for lr, _ in first] + running
            for lr in first_lrs(d, range_lr):
                if s < lr < top and not any(same(lr, t) for t in tried):
                    return lr, d.seed
        return next_lr(first, running, d.lo, d.hi, d.slots), d.seed
    if running:
        return WAIT  # the bracket may still move
    b = bracket(first)
    if d.seeds < 1 or b.stable is None or b.divergent is None:
        # One seed only, or the boundary lies outside the searched range: nothing to place.
        return DONE
    centre = math.sqrt(b.stable * b.divergent)
    lowest, highest = 0, d.points - 1
    while True:
        todo, waiting = [], False
        for level in range(lowest, highest + 1):
            for j in range(d.seeds):
                lr, seed = d.grid_lr(centre, level, j), d.seed + 1 + j
                if any(same(lr, a) and s == seed for a, s in pending):
                    waiting = True
                elif not any(same(lr, a) and s == seed for a, s, _ in outcomes):
                    todo.append((abs(level - (d.points - 1) / 2), (lr, seed)))
        if todo:
            return min(todo)[1]  # nearest the centre first
        if waiting:
            return WAIT
        grown = False
        if lowest > -EXTEND and d.grid_lr(centre, lowest - 1, 0) > d.lo and any(
                not ok for lr, s, ok in outcomes for j in range(d.seeds)
                if s == d.seed + 1 + j and same(lr, d.grid_lr(centre, lowest, j))):
            lowest, grown = lowest - 1, True
        if highest < d.points - 1 + EXTEND and d.grid_lr(centre, highest + 1, d.seeds - 1) < d.hi and any(
                ok for lr, s, ok in outcomes for j in range(d.seeds)
                if s == d.seed + 1 + j and same(lr, d.grid_lr(centre, highest, j))):
            highest, grown = highest + 1, True
        if not grown:
            return DONE


class BracketSampler(optuna.samplers.BaseSampler):
    """Optuna sampler for `variant` (categorical), then `lr` (log float), `seed` (int) and, with
    range tests, `lr_schedule` (categorical: cosine, or range for a variant's range test)."""

    def __init__(self, variants: list[str], design: Design):
        self.variants, self.design = list(variants), design
        self._chosen: dict[int, tuple[float, int, str]] = {}  # trial number -> its (lr, seed, schedule)

    def state(self, study: optuna.Study, exclude: int | None = None) -> dict[str, tuple[list, list]]:
        """variant -> (finished outcomes [(lr, seed, stable)], pending [(lr, seed)]), range tests
        left out."""
        out = {v: ([], []) for v in self.variants}
        for t in study.get_trials(deepcopy=False):
            v, lr = t.params.get("variant"), t.params.get("lr")
            if v not in out or lr is None or t.number == exclude or t.params.get("lr_schedule") == RANGE:
                continue
            seed = int(t.params.get("seed", self.design.seed))
            if t.state == optuna.trial.TrialState.COMPLETE:
                out[v][0].append((lr, seed, t.values[0] > 0))
            elif t.state == optuna.trial.TrialState.RUNNING:
                out[v][1].append((lr, seed))
        return out

    def ranges(self, study: optuna.Study, exclude: int | None = None) -> dict[str, float | str | None]:
        """variant -> the range_lr of its range test (the objective it reported), RUNNING while
        it runs, or None before it started (or after it failed, so that it runs again)."""
        out: dict[str, float | str | None] = {v: None for v in self.variants}
        for t in study.get_trials(deepcopy=False):
            v = t.params.get("variant")
            if v not in out or t.number == exclude or t.params.get("lr_schedule") != RANGE:
                continue
            if t.state == optuna.trial.TrialState.COMPLETE and t.values[0] > 0:
                out[v] = t.values[0]
            elif t.state == optuna.trial.TrialState.RUNNING and out[v] is None:
                out[v] = RUNNING
        return out

    def proposals(self, study: optuna.Study, exclude: int | None = None) -> dict[str, object]:
        """variant -> its next trial: an (lr, seed, schedule), WAIT or DONE."""
        ranges = self.ranges(study, exclude) if self.design.range_test else {}
        out = {}
        for v, (done, pending) in self.state(study, exclude).items():
            r = ranges.get(v)
            if self.design.range_test and r is None:
                out[v] = (self.design.hi, self.design.seed, RANGE)  # the ramp ends at the range's top
            elif r == RUNNING:
                out[v] = WAIT
            else:
                nxt = next_trial(done, pending, self.design, r)
                out[v] = (*nxt, "cosine") if isinstance(nxt, tuple) else nxt
        return out

    def finished(self, study: optuna.Study) -> bool:
        return all(p == DONE for p in self.proposals(study).values())

    def can_propose(self, study: optuna.Study) -> bool:
        return any(isinstance(p, tuple) for p in self.proposals(study).values())

    def choose(self, study: optuna.Study, trial) -> str:
        """The variant of `trial`, and its (lr, seed) kept for the next parameters."""
        state = self.state(study, exclude=trial.number)
        ready = {v: p for v, p in self.proposals(study, exclude=trial.number).items() if isinstance(p, tuple)}
        choices = list(ready) or self.variants
        # The variant with the fewest trials so far, finished or running.
        variant = min(choices, key=lambda v: (len(state[v][0]) + len(state[v][1]), self.variants.index(v)))
        self._chosen[trial.number] = ready.get(variant) or (self.design.lo, self.design.seed, "cosine")
        return variant

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name == "variant":
            return self.choose(study, trial)
        # Optuna does not ask a sampler for a parameter with one possible value: with one variant
        # (or no boundary seeds), `lr` or `seed` is the first parameter this sampler sees.
        if trial.number not in self._chosen:
            self.choose(study, trial)
        if param_name == "lr":
            return self._chosen[trial.number][0]
        if param_name == "seed":
            return self._chosen[trial.number][1]
        if param_name == "lr_schedule":
            return self._chosen[trial.number][2]
        return optuna.samplers.RandomSampler().sample_independent(study, trial, param_name, param_distribution)


class FinalOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch that scores a trial on its final result only: intermediate reports do not
    carry the objective (it depends on how the trial ends), and Optuna prunes nothing here (the
    TEV scheduler does the stopping)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass


class SeedRepeater(Repeater):
    """The `tune` strategy with `tune.seeds` > 1: Ray Tune's Repeater runs each configuration
    Optuna proposes at `repeat` seeds (trial.seed, + 1, ...) and gives Optuna their mean
    objective, so a candidate is scored over seeds rather than on one seed's luck."""

    def __init__(self, searcher: Searcher, repeat: int, base_seed: int = 0):
        super().__init__(searcher, repeat=repeat, set_index=True)
        self.base_seed = base_seed

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if isinstance(config, dict):  # a copy of the group's config, Repeater's own
            config["seed"] = self.base_seed + config.pop(TRIAL_INDEX)
        return config


class BracketSearch(FinalOnlyOptunaSearch):
    """OptunaSearch over {variant, lr, seed} with BracketSampler; FINISHED when every variant is.

    With `arms` (the `scale` strategy) the sampler's "variants" are arm labels, `variant@size`,
    each bracketed on its own, and a trial's config gets the arm's fields (its variant and the
    size's d_model, n_layer, ...) in place of the label."""

    def __init__(self, variants: list[str], design: Design, storage=None, study_name: str | None = None,
                 arms: dict[str, dict] | None = None):
        self.arms = arms
        self.bracket_sampler = BracketSampler(variants, design)
        space = {"variant": optuna.distributions.CategoricalDistribution(list(variants)),
                 "lr": optuna.distributions.FloatDistribution(design.lo, design.hi, log=True),
                 "seed": optuna.distributions.IntDistribution(design.seed, design.seed + max(design.seeds, 0))}
        if design.range_test:
            space["lr_schedule"] = optuna.distributions.CategoricalDistribution(["cosine", RANGE])
        super().__init__(space=space, metric=OBJECTIVE, mode="max", sampler=self.bracket_sampler,
                         storage=storage, study_name=study_name)

    def suggest(self, trial_id: str):
        study = self._ot_study
        if self.bracket_sampler.finished(study):
            return Searcher.FINISHED
        if not self.bracket_sampler.can_propose(study):
            return None  # every open variant waits on trials in flight; Tune asks again later
        config = super().suggest(trial_id)
        if self.arms and isinstance(config, dict):
            config.update(self.arms[config.pop("variant")])
        return config
