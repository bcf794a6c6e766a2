"""What a trial's reports mean, decided in one place: the metric names every part reads, how a
trial ended, whether it was stable, and which trial it was.

The worker reports these names (tunestab/loop.py), the TEV scheduler and the Optuna searchers read
them, the tables and plots are built from them and MLflow logs them. Pure Python with no heavy
imports: the worker, the space checker and the tables all import it. The finite stand-in for NaN
is in tunestab/metrics.py, which the worker alone needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from .metrics import is_sentinel

# -- metric names (reported by workers, read by the driver, logged to MLflow) -----------------
STEP = "step"
LR = "lr"
LOSS = "loss"
VAL_LOSS = "val_loss"
LOSS_INIT = "loss_init"
"""The loss at initialisation, l0: a failed trial's objective and its validation loss."""
TEV_MEAN = "tev_mean"
TEV_STD = "tev_std"
TEV_DISPERSION = "tev_dispersion"
"""sigma_TEV / mu_TEV, reported by the worker with its two parts (`dispersion`)."""
ATTN_LOGIT_MAX = "attn_logit_max"
DIVERGED = "diverged"
STOP_REASON = "stop_reason"
RANGE_LR = "range_lr"
"""Where an LR range test's loss passed l0 (its last report)."""
TRIAL_ID = "trial_id"
# Written into a result by the driver, after the worker reported it:
TEV_STOP_STEP = "tev_stop_step"
TEV_STOP_REASON = "tev_stop_reason"
STABLE_LR = "stable_lr"
"""The `max_lr` searchers' objective: the trial's LR when it was stable, else 0."""
OBJECTIVE = "objective"
"""The `tune` searchers' objective: the final val_loss when stable, else l0."""
# Values a report carries for the search's own accounting, not as measurements of training:
# MLflow logs them under `bookkeeping/`, which its UI shows as a chart section of its own, after
# the science (stability, loss, per-layer probes) and the performance (tokens_per_s, mfu).
BOOKKEEPING = ("resumed_from", OBJECTIVE, STABLE_LR, "tokens", "loop_s", "active", "population")
BOOKKEEPING_SECTION = "bookkeeping"


def metric_name(key: str) -> str:
    """A report's key as MLflow logs it."""
    return f"{BOOKKEEPING_SECTION}/{key}" if key in BOOKKEEPING else key


class Named(str, Enum):
    """A str enum that compares, prints and serialises as its value."""

    def __str__(self) -> str:
        return self.value


class StopReason(Named):
    """How a trial ended (the `stop_reason` metric and MLflow tag)."""

    RUNNING = "running"
    COMPLETED = "completed"
    NONFINITE = "nonfinite"
    BLOWUP = "blowup"
    NO_PROGRESS = "no_progress"
    RANGE_END = "range_end"
    TEV = "tev"
    """Stopped by the TEV scheduler: predicted divergent."""
    ERROR = "error"
    """The trial failed (an exception, not a divergence): it says nothing about its LR."""


def is_stable(result: Mapping) -> bool:
    """Completed its budget without diverging. A TEV stop is not stable (predicted divergent),
    and neither is a final validation loss no better than the floor (`diverged` says so)."""
    return result.get(STOP_REASON) == StopReason.COMPLETED and not result.get(DIVERGED, 0)


OUTCOME = "outcome"
"""How a trial or member ended, in the words every table, plot and MLflow tag uses (`outcome`)."""


class Outcome(Named):
    """`stop_reason` read as a result: one value per way a run can count."""

    STABLE = "stable"
    """Completed its budget without diverging (`is_stable`)."""
    DIVERGED = "diverged"
    """The loss rule failed it: a non-finite loss, a blow-up, no progress past the floor (or a
    range test's end)."""
    STOPPED_BY_TEV = "stopped_by_tev"
    """Stopped by the TEV scheduler, predicted divergent; counts as a failure at its LR."""
    ERROR = "error"
    """An exception, not a divergence: says nothing about its LR."""
    RUNNING = "running"


def outcome(result: Mapping) -> Outcome:
    reason = result.get(STOP_REASON)
    if reason == StopReason.ERROR:
        return Outcome.ERROR
    if reason == StopReason.TEV:
        return Outcome.STOPPED_BY_TEV
    if is_stable(result):
        return Outcome.STABLE
    if reason in (None, StopReason.RUNNING) and not result.get(DIVERGED, 0):
        return Outcome.RUNNING
    return Outcome.DIVERGED


def objectives(result: Mapping, lr: float) -> dict[str, float]:
    """What the Optuna study sees of a result: `stable_lr` (max_lr, scale) and `objective`
    (tune). A range test's `stable_lr` is where it failed (tunestab/bracket.py)."""
    l0 = result.get(LOSS_INIT, result.get(LOSS, 0.0))
    if RANGE_LR in result:
        return {STABLE_LR: float(result[RANGE_LR]), OBJECTIVE: float(l0)}
    stable = is_stable(result)
    return {
        STABLE_LR: float(lr) if stable else 0.0,
        OBJECTIVE: float(result[VAL_LOSS]) if stable and VAL_LOSS in result else float(l0),
    }


# -- the answer, per run: what the search's MLflow view plots (tunestab/mlflow_view.py) ----------
# MLflow's scatter charts take metrics, on linear axes only (MLflow 3.17, checked in Chromium), and
# colour each run on its own. So each member's run logs, when it ends, its LR on a log scale and,
# under its arm's name, whether it failed and its val_loss: one chart per arm shows that arm alone.
ANSWER_SECTION = "answer"
LOG10_LR = f"{ANSWER_SECTION}/log10_lr"


def answer_keys(arm: str) -> tuple[str, str]:
    """The metrics an arm's charts plot against LOG10_LR: failed (1 diverged or stopped by the TEV
    scheduler, as the boundary fit counts it; 0 stable) and val_loss."""
    return f"{ANSWER_SECTION}/{metric_path(arm)} failed", f"{ANSWER_SECTION}/{metric_path(arm)} val_loss"


def answer_metrics(arm: str, lr: float, result: Mapping) -> dict[str, float]:
    """A member's answer metrics once it has ended. A run that erred says nothing about its LR
    and gets none; a run with no finite val_loss (a TEV stop, a non-finite loss) gets no val_loss."""
    if RANGE_LR in result:  # a range test's LR is where its sweep began, not what it was judged at
        return {}
    how = outcome(result)
    if how not in (Outcome.STABLE, Outcome.DIVERGED, Outcome.STOPPED_BY_TEV) or not lr > 0:
        return {}
    failed_key, val_loss_key = answer_keys(arm)
    out = {LOG10_LR: math.log10(lr), failed_key: float(how != Outcome.STABLE)}
    val_loss = result.get(VAL_LOSS)
    if val_loss is not None and not is_sentinel(val_loss):
        out[val_loss_key] = float(val_loss)
    return out


def dispersion(mean: float, std: float) -> float:
    """sigma_TEV / mu_TEV (0 before the embedding has any spread)."""
    return float(std) / float(mean) if mean > 0 else 0.0


def dispersion_of(result: Mapping) -> float | None:
    """A report's TEV dispersion: the worker's own, or from its parts in reports that predate it
    (the labelled runs bench/scheduler_eval.py replays). None without TEV."""
    if result.get(TEV_DISPERSION) is not None:
        return float(result[TEV_DISPERSION])
    if result.get(TEV_MEAN) is None or result.get(TEV_STD) is None:
        return None
    return dispersion(result[TEV_MEAN], result[TEV_STD])


# -- which trial it was -------------------------------------------------------------------------
SIZE = "size"
"""A trial config's model size, by its name in the `scale` strategy's space (absent elsewhere).
It travels in the Tune config beside the size's fields and is dropped before TrialConfig."""
ARM_SEP = "@"


@dataclass(frozen=True)
class TrialKey:
    """Who a trial is: its variant, its size (scale only), its LR and its seed."""

    variant: str
    size: str | None
    lr: float | None
    """None where the space fixes no LR (the trial takes TrialConfig's default)."""
    seed: int

    @classmethod
    def of(cls, config: Mapping, default_seed: int = 0) -> "TrialKey":
        lr = config.get(LR)
        return cls(
            str(config.get("variant")),
            config.get(SIZE),
            None if lr is None else float(lr),
            int(config.get("seed", default_seed)),
        )


def arm_label(variant: str, size: str | None) -> str:
    return variant if size is None else f"{variant}{ARM_SEP}{size}"


def split_arm(label: str) -> tuple[str, str | None]:
    """(variant, size) of an arm label; size None for a plain variant."""
    variant, _, size = label.partition(ARM_SEP)
    return variant, size or None


def metric_path(label: str) -> str:
    """An arm in an MLflow metric name, which takes no "@": `<variant>/<size>`."""
    return label.replace(ARM_SEP, "/")
