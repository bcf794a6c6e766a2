"""The TEV stopping rule: when a trial's Token Embedding Variability says it is going unstable.

Pure Python with no heavy imports, so that a search-space file (tunestab/spec.py) can check its
`scheduler.rule` section without importing Ray or torch. The Tune scheduler that applies it is
tunestab/scheduler.py; bench/scheduler_eval.py replays it, and its rivals, on labelled runs.

A rule watches one TEV signal of each report (tunestab/loop.py's reports):

| signal | value | why it might lead the loss |
|---|---|---|
| `dispersion` | σ_TEV/μ_TEV at the report | some rows blow up while the rest do not |
| `dispersion_max` | the largest σ_TEV/μ_TEV of any step since the last report | the same, without waiting for a report |
| `growth` | the steepest one-step growth of μ_TEV since the last report | the embedding's spread jumps |
| `row_max` | the largest TEV_i / μ_TEV since the last report | one token's row runs away first |
| `update` | the embedding's largest one-step RMS move per unit LR since the last report | Adam moves each entry by about the LR; far more is unusual |
| `peer` | σ_TEV/μ_TEV over the median of the same variant's trials at lower LRs, at the same step | a trial against what its LR's neighbours look like |

and stops a trial when the value reaches `threshold`, or, with `rise` > 0, when it reaches `rise`
times its own value `lookback` reports earlier (and is at least `rise_floor`), for `patience`
reports in a row, never before `min_step` (by default the end of the trial's warm-up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .outcome import dispersion_of

SIGNALS = ("dispersion", "dispersion_max", "growth", "row_max", "update", "peer")
# The report key each per-report signal reads (dispersion and peer are computed from two).
REPORT_KEYS = {
    "dispersion_max": "tev_dispersion_max",
    "growth": "tev_growth_max",
    "row_max": "tev_row_max",
    "update": "embed_update_max",
}


@dataclass(frozen=True)
class TEVRule:
    """When a trial's TEV says it is going unstable. Defaults: docs/scheduler.md."""

    signal: str = "peer"
    """Which TEV signal the rule watches (the table in tunestab/tev_rule.py). The default is the
    rule bench/scheduler_eval.py found best on held-out runs (docs/scheduler.md)."""
    threshold: float = 1.75
    """Stop when the signal reaches this (inf: only the rise test)."""
    rise: float = 0.0
    """... or when it reaches this multiple of its own value `lookback` reports earlier (0: off)."""
    rise_floor: float = 0.875
    """The rise test counts only once the signal is at least this (tiny values early in a run
    double from one report to the next without meaning anything); with `rise` 0 it is unused."""
    lookback: int = 1
    """How many reports back the rise test compares with."""
    min_step: int | None = None
    """No verdict before this step (None: the trial's warm-up, `warmup_steps`): at
    initialisation every row has the same spread (σ_TEV ≈ 0), and while the LR warms up the
    signals climb in every run. The loss rules it was compared with wait as long."""
    patience: int = 1
    """Consecutive reports that must meet a test before the trial is stopped."""

    def problems(self) -> list[str]:
        out = []
        if self.signal not in SIGNALS:
            out.append(f"signal: expected one of {', '.join(SIGNALS)}, got {self.signal!r}")
        if not self.threshold > 0:
            out.append(f"threshold: must be > 0, got {self.threshold}")
        if self.rise < 0 or 0 < self.rise <= 1:
            out.append(f"rise: must be > 1 (or 0 for off), got {self.rise}")
        if self.rise_floor < 0:
            out.append(f"rise_floor: must be >= 0, got {self.rise_floor}")
        for name in ("lookback", "patience"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.min_step is not None and self.min_step < 0:
            out.append(f"min_step: must be >= 0, got {self.min_step}")
        if math.isinf(self.threshold) and not self.rise:
            out.append("threshold: with rise 0 an infinite threshold never stops anything")
        return out

    def test(self, values: list[float]) -> str | None:
        """Which test the latest value (last of `values`, one per report) meets, if any."""
        now = values[-1]
        if now >= self.threshold:
            return f"{self.signal}={now:.3g} >= {self.threshold:g}"
        if self.rise and len(values) > self.lookback and now >= self.rise_floor:
            before = values[-1 - self.lookback]
            if now >= self.rise * before:
                return f"{self.signal} rose to {now:.3g} >= {self.rise:g} x {before:.3g}"
        return None


def signal_of(rule: TEVRule, report: dict) -> float | None:
    """The rule's signal in one report (None where the report does not carry it). `peer` needs
    other trials and is computed by its caller from `dispersion` values."""
    if rule.signal in ("dispersion", "peer"):
        return dispersion_of(report)
    value = report.get(REPORT_KEYS[rule.signal])
    return float(value) if value is not None else None
