"""What every part agrees a reported metric is, with no heavy imports: the worker, the
scheduler, the analysis and MLflow all read these (docs/design.md, "Metric names").

No reported metric is ever NaN or infinite. A value that became non-finite is reported as
FINITE_CAP, and a diverged trial's loss as its loss at initialisation.
"""

from __future__ import annotations

import math

# The finite stand-in for a NaN/inf measurement.
FINITE_CAP = 1e30


def finite(x: float) -> float:
    return x if math.isfinite(x) else FINITE_CAP


def is_sentinel(x) -> bool:
    """NaN/inf, or the finite stand-in a worker reports in their place."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and (not math.isfinite(x) or abs(x) >= FINITE_CAP)
