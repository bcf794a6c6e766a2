"""The `max_lr` strategy: per variant, bracket the largest learning rate that does not diverge.

Each variant keeps a bracket [largest stable LR, smallest divergent LR] in log-LR. Until it is
narrow enough (divergent / stable <= ratio), the next LR is one of the `slots` points that split
the bracket evenly in log space, the one farthest from any trial still running, so that `slots`
trials of a variant can run side by side and each still halves-or-better the bracket. Before any
outcome is known, the ends of the searched range stand in for the bracket: a trial at the top of
the range is not spent to learn that it diverges, nor one at the bottom to learn that it does not.

Outcomes are noisy at the boundary (a seed can diverge where a lower LR did not). The bracket is
taken conservatively: the smallest divergent LR bounds it from above, and only stable LRs below
that count.

A trial that failed (an error, not a divergence) says nothing about the LR and is left out.
`BracketSampler` is this logic as an Optuna sampler: the study stores every trial (variant, lr,
and the objective `stable_lr` = lr when the trial completed without diverging, 0 when it diverged
or the TEV scheduler stopped it), so a restarted search reads its brackets back from the study.
`BracketSearch` is Ray Tune's `OptunaSearch` with that sampler, finishing when every variant's
bracket is narrow enough or has used its trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

OBJECTIVE = "stable_lr"


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


class BracketSampler(optuna.samplers.BaseSampler):
    """Optuna sampler for `variant` (categorical) then `lr` (log float), as in the module doc."""

    def __init__(self, variants: list[str], lo: float, hi: float, ratio: float = 1.25, slots: int = 2,
                 max_trials: int = 12):
        self.variants, self.lo, self.hi = list(variants), lo, hi
        self.ratio, self.slots, self.max_trials = ratio, slots, max_trials

    def state(self, study: optuna.Study, exclude: int | None = None) -> dict[str, tuple[list, list]]:
        """variant -> (finished outcomes [(lr, stable)], pending LRs)."""
        out = {v: ([], []) for v in self.variants}
        for t in study.get_trials(deepcopy=False):
            v, lr = t.params.get("variant"), t.params.get("lr")
            if v not in out or lr is None or t.number == exclude:
                continue
            if t.state == optuna.trial.TrialState.COMPLETE:
                out[v][0].append((lr, t.values[0] > 0))
            elif t.state == optuna.trial.TrialState.RUNNING:
                out[v][1].append(lr)
        return out

    def open_variants(self, study: optuna.Study, exclude: int | None = None) -> list[str]:
        state = self.state(study, exclude)
        return [v for v in self.variants
                if not is_done(state[v][0], self.lo, self.hi, self.ratio, self.max_trials - len(state[v][1]))]

    def finished(self, study: optuna.Study) -> bool:
        return not self.open_variants(study)

    def results(self, study: optuna.Study) -> dict[str, Bracket]:
        return {v: bracket(outcomes) for v, (outcomes, _) in self.state(study).items()}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        state = self.state(study, exclude=trial.number)
        if param_name == "variant":
            open_ = self.open_variants(study, exclude=trial.number) or self.variants
            # The variant with the fewest trials so far, finished or running.
            return min(open_, key=lambda v: (len(state[v][0]) + len(state[v][1]), self.variants.index(v)))
        if param_name == "lr":
            outcomes, pending = state[trial.params["variant"]]
            return next_lr(outcomes, pending, self.lo, self.hi, self.slots)
        return optuna.samplers.RandomSampler().sample_independent(study, trial, param_name, param_distribution)


class FinalOnlyOptunaSearch(OptunaSearch):
    """OptunaSearch that scores a trial on its final result only: intermediate reports do not
    carry the objective (it depends on how the trial ends), and Optuna prunes nothing here (the
    TEV scheduler does the stopping)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass


class BracketSearch(FinalOnlyOptunaSearch):
    """OptunaSearch over {variant, lr} with BracketSampler; FINISHED when every bracket is."""

    def __init__(self, variants: list[str], lo: float, hi: float, ratio: float, slots: int, max_trials: int,
                 storage=None, study_name: str | None = None):
        self.bracket_sampler = BracketSampler(variants, lo, hi, ratio, slots, max_trials)
        space = {"variant": optuna.distributions.CategoricalDistribution(list(variants)),
                 "lr": optuna.distributions.FloatDistribution(lo, hi, log=True)}
        super().__init__(space=space, metric=OBJECTIVE, mode="max", sampler=self.bracket_sampler,
                         storage=storage, study_name=study_name)

    def suggest(self, trial_id: str):
        study = self._ot_study
        if self.bracket_sampler.finished(study):
            return Searcher.FINISHED
        return super().suggest(trial_id)
