"""The Optuna and Ray Tune adapters of the search strategies: the pure design they drive is
elsewhere (tunestab/bracket.py for max_lr and scale), so that it can be read and tested without
Optuna or Ray.

- `BracketSampler`: the max_lr bracket and boundary seeds (tunestab/bracket.py) as an Optuna
  sampler over {variant, lr, seed}. The study stores every trial and its objective (`stable_lr`,
  tunestab/outcome.py: the LR when the trial was stable, 0 when it diverged or the TEV scheduler
  stopped it), so a restarted search reads its state back from the study.
- `BracketSearch`: Ray Tune's `OptunaSearch` with that sampler; it proposes nothing while a
  variant's next step waits on trials in flight, and finishes when every variant has its
  boundary trials.
- `FinalOnlyOptunaSearch`, `SeedRepeater`: the `tune` strategy's searchers.
- `GridSearch`: the `sweep` strategy's grid.
- `PopulationSearch`: wraps any of them, so that the members they propose train in populations,
  one Tune trial each (tunestab/members.py).
"""

from __future__ import annotations

import os
import pickle
import tempfile

import optuna
from ray.tune.search import Repeater, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

from .bracket import DONE, RANGE, RUNNING, WAIT, Design, next_trial
from .members import MEMBER_FIELDS, ended, population_config, reports_of, shared_key
from .outcome import SIZE, STABLE_LR, split_arm


class BracketSampler(optuna.samplers.BaseSampler):
    """Optuna sampler for `variant` (categorical), then `lr` (log float), `seed` (int) and, with
    range tests, `lr_schedule` (categorical: cosine, or range for a variant's range test)."""

    def __init__(self, variants: list[str], design: Design):
        self.variants, self.design = list(variants), design
        self._chosen: dict[int, tuple[float, int, str]] = {}  # trial number -> its (lr, seed, schedule)

    def state(self, study: optuna.Study, exclude: int | None = None) -> dict[str, list]:
        """variant -> its trials in the order they were proposed, (lr, seed, stable?), stable None
        while a trial runs; range tests left out."""
        out = {v: [] for v in self.variants}
        for t in study.get_trials(deepcopy=False):  # in trial-number order: the order proposed
            v, lr = t.params.get("variant"), t.params.get("lr")
            if v not in out or lr is None or t.number == exclude or t.params.get("lr_schedule") == RANGE:
                continue
            seed = int(t.params.get("seed", self.design.seed))
            if t.state == optuna.trial.TrialState.COMPLETE:
                # stable_lr > 0: outcome.is_stable's verdict, as the study stored it.
                out[v].append((lr, seed, t.values[0] > 0))
            elif t.state == optuna.trial.TrialState.RUNNING:
                out[v].append((lr, seed, None))
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
        for v, trials in self.state(study, exclude).items():
            r = ranges.get(v)
            if self.design.range_test and r is None:
                out[v] = (self.design.hi, self.design.seed, RANGE)  # the ramp ends at the range's top
            elif r == RUNNING:
                out[v] = WAIT
            else:
                nxt = next_trial(trials, self.design, r)
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
        variant = min(choices, key=lambda v: (len(state[v]), self.variants.index(v)))
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

    def __init__(
        self,
        variants: list[str],
        design: Design,
        storage=None,
        study_name: str | None = None,
        arms: dict[str, dict] | None = None,
    ):
        self.arms = arms
        self.bracket_sampler = BracketSampler(variants, design)
        space = {
            "variant": optuna.distributions.CategoricalDistribution(list(variants)),
            "lr": optuna.distributions.FloatDistribution(design.lo, design.hi, log=True),
            "seed": optuna.distributions.IntDistribution(design.seed, design.seed + max(design.seeds, 0)),
        }
        if design.range_test:
            space["lr_schedule"] = optuna.distributions.CategoricalDistribution(["cosine", RANGE])
        super().__init__(
            space=space,
            metric=STABLE_LR,
            mode="max",
            sampler=self.bracket_sampler,
            storage=storage,
            study_name=study_name,
        )

    def suggest(self, trial_id: str):
        study = self._ot_study
        if self.bracket_sampler.finished(study):
            return Searcher.FINISHED
        if not self.bracket_sampler.can_propose(study):
            return None  # every open variant waits on trials in flight; Tune asks again later
        config = super().suggest(trial_id)
        if self.arms and isinstance(config, dict):
            # The arm label becomes the trial's variant, its size (a field of its own) and the
            # size's TrialConfig fields.
            label = config.pop("variant")
            config.update(self.arms[label], **{SIZE: split_arm(label)[1]})
        return config


class GridSearch(Searcher):
    """The `sweep` strategy's grid, in a fixed order, as a searcher (so that PopulationSearch can
    put a grid row's members in one trial): `configs`, then FINISHED."""

    def __init__(self, configs: list[dict]):
        super().__init__()
        self.configs, self.next = list(configs), 0

    def suggest(self, trial_id: str):
        if self.next >= len(self.configs):
            return Searcher.FINISHED
        self.next += 1
        return dict(self.configs[self.next - 1])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class PopulationSearch(Searcher):
    """Puts the members another searcher proposes into populations, one Tune trial each.

    The inner searcher proposes members exactly as it proposed trials before (each gets a member
    id of its own and is completed with that member's final result), so Optuna's study, the
    bracket and the seed repeats see members. Members whose configs differ only in
    `member_fields` go into one trial, at most `size` of them. With `rounds` (a searcher that
    proposes a round and then waits, like the max_lr bracket or a grid), everything it proposes
    before it waits is taken and grouped; without (Optuna's samplers, which never wait), a
    population ends at the first member that would not fit, which starts the next one. At most
    `budget` members are proposed in all.
    """

    def __init__(self, inner: Searcher, size: int, budget: int, member_fields=MEMBER_FIELDS, rounds: bool = True):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner, self.size, self.budget = inner, int(size), int(budget)
        self.member_fields, self.rounds = tuple(member_fields), rounds
        self.proposed = 0
        self.held: list[tuple[str, dict]] = []  # (the inner searcher's id, config), waiting for a trial
        # trial id -> {member id: the inner searcher's id}. A member is named after the trial it
        # trains in ("<trial id>-<i>"); the inner searcher knows it by the id it was proposed under.
        self.members: dict[str, dict[str, str]] = {}
        self.exhausted = False

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def _key(self, config: dict) -> str:
        return shared_key(config, self.member_fields)

    def _pull(self, trial_id: str) -> None:
        """Take members from the inner searcher into `held`, as many as this trial may need."""
        while not self.exhausted and self.proposed < self.budget:
            kinds = {self._key(c) for _, c in self.held}
            first = self._key(self.held[0][1]) if self.held else None
            if first is not None and sum(self._key(c) == first for _, c in self.held) >= self.size:
                return  # the first kind's trial is full
            if not self.rounds and len(kinds) > 1:
                return  # a member of another kind ends the population
            mid = f"p{self.proposed}"
            config = self.inner.suggest(mid)
            if config is None:
                return  # the inner searcher waits on members in flight
            if config == Searcher.FINISHED:
                self.exhausted = True
                return
            self.proposed += 1
            self.held.append((mid, config))

    def suggest(self, trial_id: str):
        self._pull(trial_id)
        if not self.held:
            return Searcher.FINISHED if self.exhausted or self.proposed >= self.budget else None
        kind = self._key(self.held[0][1])
        chosen = [(mid, c) for mid, c in self.held if self._key(c) == kind][: self.size]
        taken = {mid for mid, _ in chosen}
        self.held = [(mid, c) for mid, c in self.held if mid not in taken]
        named = {f"{trial_id}-{i}": (inner_id, c) for i, (inner_id, c) in enumerate(chosen)}
        self.members[trial_id] = {mid: inner_id for mid, (inner_id, _) in named.items()}
        return population_config({mid: c for mid, (_, c) in named.items()}, self.member_fields)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # a member's objective depends on how it ends: the inner searcher sees final results only

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        finals = reports_of(result or {})
        for mid, inner_id in self.members.pop(trial_id, {}).items():
            final = finals.get(mid)
            if final is None or (error and not ended(final)):
                self.inner.on_trial_complete(inner_id, None, error=True)  # says nothing of its config
            else:
                self.inner.on_trial_complete(inner_id, final)

    def save(self, checkpoint_path: str) -> None:
        """One file, the inner searcher's state inside it: Tune renames the file it asked for,
        and would leave a second one behind."""
        with tempfile.TemporaryDirectory(prefix="tunestab-searcher-") as tmp:
            self.inner.save(os.path.join(tmp, "inner"))
            with open(os.path.join(tmp, "inner"), "rb") as f:
                inner = f.read()
        own = {k: v for k, v in self.__dict__.items() if k != "inner"}
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"inner": inner, "own": own}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        with tempfile.TemporaryDirectory(prefix="tunestab-searcher-") as tmp:
            with open(os.path.join(tmp, "inner"), "wb") as f:
                f.write(state["inner"])
            self.inner.restore(os.path.join(tmp, "inner"))
        self.__dict__.update(state["own"])
