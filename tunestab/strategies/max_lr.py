"""`max_lr`: per variant, bracket the largest LR that does not diverge, then spend boundary seeds
around it and fit P(diverge | LR) (tunestab/bracket.py, tunestab/boundary.py)."""

from __future__ import annotations

import dataclasses

from ..bracket import Design
from ..outcome import RANGE_LR
from ..sections import section
from .base import Strategy


class MaxLR(Strategy):
    name = "max_lr"
    section = "max_lr"
    section_type = Design

    def parse_section(self, raw, draft, problems):
        design = section(raw, self.section, Design, problems, exclude=Design.FROM_SPACE)
        problems += design.problems()
        return design

    def check(self, draft, sections, problems):
        lr = draft.param("lr")
        if lr is None or lr.kind != "loguniform":
            problems.append(
                f"params.lr: the {draft.strategy} strategy needs `lr: {{loguniform: [low, high]}}`, "
                "the range it brackets"
            )
        if any(p.name != "lr" for p in draft.params):
            problems.append(
                f"params: the {draft.strategy} strategy searches lr alone; fix the others under `trial`"
                + self.other_params_hint
            )

    other_params_hint = ""

    def design(self, space) -> Design:
        """The space's max_lr section with its LR range and bracketing seed filled in."""
        lo, hi = space.param("lr").values
        return dataclasses.replace(space.max_lr, lo=lo, hi=hi, seed=space.trial_config(space.variants[0]).seed)

    def param_space(self, space):
        # variant, lr, seed (and lr_schedule) come from BracketSearch.
        if space.max_lr.range_test:
            return {"lr_range_start": space.param("lr").values[0]}  # a range test climbs the whole range
        return {}

    def searcher(self, space, storage):
        from ..searchers import BracketSearch

        arms = self.arms(space)
        return BracketSearch(
            list(arms),
            self.design(space),
            storage=storage,
            study_name=space.name,
            arms=arms if self.labels_arms else None,
        )

    labels_arms = False
    """Whether the searcher's variants are arm labels whose fields it puts in each config."""

    def num_trials(self, space):
        return self.design(space).max_trials_per_arm() * len(self.arms(space))

    def fits_boundary(self, space):
        return True  # check() made lr the one searched parameter

    def table_columns(self, space):
        if not space.max_lr.range_test:
            return {}
        # Which trials were range tests, and where each failed.
        return {"lr_schedule": lambda c, m: c.get("lr_schedule", "cosine"), RANGE_LR: lambda c, m: m.get(RANGE_LR)}
