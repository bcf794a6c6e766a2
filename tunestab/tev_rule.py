"""The TEV stopping rule: when a trial's Token Embedding Variability says it is going unstable.

Pure Python with no heavy imports, so that a search-space file (tunestab/spec.py) can check its
`scheduler.rule` section without importing Ray or torch. The Tune scheduler that applies it is
tunestab/scheduler.py; why the rule watches σ_TEV/μ_TEV is explained there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TEVRule:
    """When a trial's TEV says it is going unstable. Defaults: calibrated in docs/scheduler.md."""

    max_dispersion: float = 0.60
    """Stop when σ_TEV/μ_TEV reaches this: a spread across tokens no converging run reached."""
    dispersion_rise: float = 1.6
    """... or when σ_TEV/μ_TEV reaches this multiple of the trial's own ratio `lookback` reports
    earlier (a sudden change in one trial, whatever its level). 0 turns this test off."""
    rise_floor: float = 0.30
    """The rise test only counts once σ_TEV/μ_TEV is at least this (tiny ratios early in a run
    double from one report to the next without meaning anything)."""
    lookback: int = 1
    """How many reports back the rise test compares with."""
    min_step: int = 30
    """No verdict before this step: at initialisation every row has the same spread (σ_TEV ≈ 0),
    and while the LR warms up the ratio climbs from there in every run."""
    patience: int = 1
    """Consecutive reports that must meet a test before the trial is stopped."""

    def problems(self) -> list[str]:
        out = []
        if not self.max_dispersion > 0:
            out.append(f"max_dispersion: must be > 0, got {self.max_dispersion}")
        if self.dispersion_rise < 0 or 0 < self.dispersion_rise <= 1:
            out.append(f"dispersion_rise: must be > 1 (or 0 for off), got {self.dispersion_rise}")
        if self.rise_floor < 0:
            out.append(f"rise_floor: must be >= 0, got {self.rise_floor}")
        for name in ("lookback", "patience"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.min_step < 0:
            out.append(f"min_step: must be >= 0, got {self.min_step}")
        return out

    def test(self, ratios: list[float]) -> str | None:
        """Which test the latest ratio (last of `ratios`, one per report) meets, if any."""
        now = ratios[-1]
        if now >= self.max_dispersion:
            return f"dispersion σ/μ={now:.3g} >= {self.max_dispersion:g}"
        if self.dispersion_rise and len(ratios) > self.lookback and now >= self.rise_floor:
            before = ratios[-1 - self.lookback]
            if now >= self.dispersion_rise * before:
                return f"rise σ/μ={now:.3g} >= {self.dispersion_rise:g} x {before:.3g}"
        return None


def dispersion(mean: float, std: float) -> float:
    """σ_TEV/μ_TEV, what the rule watches (0 before the embedding has any spread)."""
    return float(std) / float(mean) if mean > 0 else 0.0
