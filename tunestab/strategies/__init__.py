"""The search strategies, one module each, behind `Strategy` (tunestab/strategies/base.py).

Adding a strategy is its module and one line in STRATEGIES; a strategy with a YAML section of its
own declares it (`section`, `section_type`) and reads it in `parse_section`.
"""

from __future__ import annotations

from .base import Strategy
from .max_lr import MaxLR
from .scale import ScaleStrategy
from .sweep import Sweep
from .tune import TuneStrategy

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (MaxLR(), TuneStrategy(), Sweep(), ScaleStrategy())}


def of(space) -> Strategy:
    """The strategy a (checked) space names."""
    return STRATEGIES[space.strategy]
