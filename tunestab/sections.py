"""Building a checked, frozen dataclass from one mapping of a search-space file, reporting every
unknown key and wrong type with its key: the helper that tunestab/spec.py and each strategy's own
section (tunestab/strategies/) share. Pure Python."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def section(raw: dict, key: str, cls, problems: list[str], convert=None, exclude=()):
    """Build a small dataclass from raw[key], reporting unknown keys and wrong types. `exclude`:
    fields of cls that are not keys of the file (filled in from elsewhere)."""
    value = raw.get(key, {})
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{key}: expected a mapping, got {type(value).__name__}")
        return cls()
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    kwargs = {}
    for k, v in value.items():
        if k not in known:
            problems.append(f"{key}.{k}: unknown key (known: {', '.join(known)})")
            continue
        default = getattr(cls(), k)
        if convert and k in convert:
            kwargs[k] = convert[k](v, f"{key}.{k}")
            continue
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, float):
            ok = number(v)
        else:
            ok = isinstance(v, str)
        if not ok:
            problems.append(f"{key}.{k}: expected {type(default).__name__}, got {v!r}")
            continue
        kwargs[k] = v
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


@dataclass(frozen=True)
class Draft:
    """What a strategy's section and checks may read of the file: the parts checked before them."""

    strategy: str | None
    variants: tuple[str, ...]
    trial: dict
    trial_ok: bool
    """The `trial` mapping made a valid TrialConfig."""
    params: tuple
    """The searched parameters (spec.Param), those that parsed."""

    def param(self, name: str):
        return next((p for p in self.params if p.name == name), None)
