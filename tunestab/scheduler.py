"""The TEV-proxy trial scheduler: stop trials that are going unstable from their Token Embedding
Variability (Chung et al. 2024), not from their loss.

TEV_i is the standard deviation of token i's embedding row; every step the loop summarises the
rows (tunestab/probes.py, tunestab/loop.py) and each report carries μ_TEV (`tev_mean`), σ_TEV
(`tev_std`) and the per-step extremes since the last report. Which of these signals the rule
watches, and its thresholds, are a `TEVRule` (tunestab/tev_rule.py). The rule never looks at the
loss or at how a trial ranks against others. The default rule, and how it compares with loss
rules tuned the same way on held-out runs: docs/scheduler.md (bench/scheduler_eval.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile

from ray.tune.callback import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from .config import TrialConfig
from .members import member_configs, reports_of
from .metrics import is_sentinel
from .outcome import STOP_REASON, TEV_STOP_REASON, TEV_STOP_STEP, StopReason
from .stop_board import post
from .tev_rule import TEVRule, signal_of


class TEVScheduler(FIFOScheduler):
    """Stops a trial when its TEV says it is going unstable. A Tune trial trains a population
    (tunestab/members.py): every member is a trial here, judged on its own reports under its
    member id, with its peers across the whole search; a stop is posted to the search's stop
    board (`board`, tunestab/stop_board.py) and the member's worker drops it at its next report.

    The rule (`TEVRule`, tunestab/tev_rule.py; its default and how it compares with loss-based
    rules on held-out runs: docs/scheduler.md) watches one TEV signal of each report and stops a
    trial when the signal reaches a threshold or rises steeply against its own history, from step
    `min_step` on (None: the trial config's `warmup_steps`), for `patience` reports in a row. The
    `peer` signal divides a trial's σ_TEV/μ_TEV by the median of the same variant's trials at
    lower LRs at the same step, from the trials this scheduler has seen.

    Trials run in FIFO order. On every result the scheduler appends (step, signal) to the
    trial's history and asks the rule; the first verdict is kept with its step and reason. A
    non-finite report (NaN/inf, or the 1e30 stand-in the worker puts in their place, or
    `stop_reason=nonfinite`) always stops the trial, in shadow mode too.

    Args:
        rule: the thresholds (`TEVRule`).
        shadow: only record when and why the rule would have stopped a trial (`tev_stop_step`,
            `tev_stop_reason`), and let it run on: for calibration, and for users who want to
            see the rule at work before trusting it.
        state_path: a JSON file the scheduler rewrites after each change and reads back at first
            use. Tune pickles the scheduler once, when the Tuner is built, and `Tuner.restore`
            brings back that pickle, so without this file a resumed search would forget every
            trial's history; `python -m tunestab.search` puts it beside the Tune results.
        time_attr: the result key that counts training steps.
        board: the name of the search's stop board (None: stops are recorded, and reach the
            results, but the workers train stopped members on).

    The verdict reaches Tune's results and MLflow through `TEVAnnotator` (`self.callback()`),
    which must come before any logger in `RunConfig.callbacks`: Tune hands schedulers a flattened
    copy of each result, so only a callback can write into the result that Tune keeps.
    """

    def __init__(
        self,
        rule: TEVRule | None = None,
        shadow: bool = False,
        state_path: str | None = None,
        time_attr: str = "step",
        board: str | None = None,
    ):
        super().__init__()
        self.rule = rule or TEVRule()
        problems = self.rule.problems()
        if problems:
            raise ValueError("TEVRule: " + "; ".join(problems))
        self.shadow, self.state_path, self.time_attr, self.board = shadow, state_path, time_attr, board
        # Keyed by member id (tunestab/members.py): each member is judged on its own.
        self.history: dict[str, list[list[float]]] = {}  # member -> [[step, signal], ...]
        self.trials: dict[str, list] = {}  # member -> [variant, lr]: the peers of `peer`
        self.verdicts: dict[str, dict] = {}  # member -> {"step", "reason", "stopped"}
        self.owner: dict[str, str] = {}  # stopped member -> its trial, to tell its worker again after a restart
        self._streak: dict[str, int] = {}
        self._loaded = False
        # Decide on each result as it arrives, not on a buffer of them: a stop should come early.
        self._supports_buffered_results = False

    # -- the decision -----------------------------------------------------------------------
    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        """Judge every member in the report (tunestab/members.py) on its own; post the members
        stopped to the search's stop board, which the trial's worker reads. The trial itself
        runs on: it ends when its last member has, so a stop never tears a trial down."""
        self._load_once()
        config = getattr(trial, "config", None) or {}
        reports = reports_of(result)
        if not reports:  # a trial of one model, reporting on its own: stopped as a whole
            decision = self.judge(trial.trial_id, config, result)
            self._save_state()
            return decision
        configs = member_configs(config)
        stops = [
            mid
            for mid, report in reports.items()
            if self.judge(mid, configs.get(mid, {}), report) == TrialScheduler.STOP
        ]
        if stops:
            for mid in stops:
                self.owner[mid] = trial.trial_id
            if self.board:
                post(self.board, trial.trial_id, stops)
        self._save_state()
        return TrialScheduler.CONTINUE

    def judge(self, tid: str, config: dict, result: dict) -> str:
        """STOP when this report of member `tid` (config: its own) ends it by the rule."""
        if self.time_attr not in result or (tid in self.verdicts and self.verdicts[tid]["stopped"]):
            return TrialScheduler.CONTINUE
        step = result[self.time_attr]
        mean, std = result.get("tev_mean"), result.get("tev_std")
        if config.get("lr_schedule") == "range":
            # An LR range test climbs until it fails, by design: it is not judged, and its TEV
            # (which climbs with it) is no peer of fixed-LR trials. Its reports keep TEV as usual.
            return TrialScheduler.CONTINUE
        self.trials.setdefault(tid, [config.get("variant"), config.get("lr")])
        hist = self.history.setdefault(tid, [])
        # A restored trial reports again from its checkpoint: keep the history up to there.
        while hist and hist[-1][0] >= step:
            hist.pop()
        nonfinite = (
            result.get(STOP_REASON) == StopReason.NONFINITE
            or is_sentinel(mean)
            or is_sentinel(std)
            or any(isinstance(v, float) and not math.isfinite(v) for v in result.values())
        )
        if nonfinite:
            self._record(tid, step, "nonfinite report", stopped=True)
            return TrialScheduler.STOP
        value = signal_of(self.rule, result)
        if value is None:  # a result without probes: nothing to judge
            return TrialScheduler.CONTINUE
        hist.append([step, value])
        decision = TrialScheduler.CONTINUE
        # None: the trial's warm-up, TrialConfig's default where its config does not set one.
        min_step = (
            self.rule.min_step
            if self.rule.min_step is not None
            else config.get("warmup_steps", TrialConfig.warmup_steps)
        )
        values = self._values(tid) if step >= min_step and tid not in self.verdicts else None
        if values:
            why = self.rule.test(values)
            self._streak[tid] = self._streak.get(tid, 0) + 1 if why else 0
            if why and self._streak[tid] >= self.rule.patience:
                self._record(tid, step, why, stopped=not self.shadow)
                if not self.shadow:
                    decision = TrialScheduler.STOP
        return decision

    def _values(self, tid: str) -> list[float] | None:
        """The trial's signal over its reports; for `peer`, each report's σ/μ over the median of
        its peers' at the same step, where there are peers (None until the latest report has)."""
        hist = self.history[tid]
        if self.rule.signal != "peer":
            return [v for _, v in hist]
        variant, lr = self.trials.get(tid, [None, None])
        if lr is None:
            return None
        peers = [
            dict(map(tuple, self.history[p]))
            for p, (v, other) in self.trials.items()
            if p != tid and v == variant and other is not None and other < lr and p in self.history
        ]
        values = []
        for step, value in hist:
            at = sorted(h[step] for h in peers if step in h)
            if at:
                median = at[len(at) // 2] if len(at) % 2 else (at[len(at) // 2 - 1] + at[len(at) // 2]) / 2
                values.append(value / median if median > 0 else 0.0)
            elif step == hist[-1][0]:
                return None
        return values or None

    def _record(self, tid: str, step: int, reason: str, stopped: bool) -> None:
        if tid not in self.verdicts:
            self.verdicts[tid] = {"step": int(step), "reason": reason, "stopped": stopped}

    def annotate(self, trial_id: str, result: dict) -> None:
        """Write the verdict (if any) into a result: `tev_stop_step`, `tev_stop_reason`, and
        `stop_reason = tev` when the scheduler stopped the trial by the rule."""
        verdict = self.verdicts.get(trial_id)
        if not verdict or result.get(self.time_attr, 0) < verdict["step"]:
            return
        result[TEV_STOP_STEP] = verdict["step"]
        result[TEV_STOP_REASON] = verdict["reason"]
        if verdict["stopped"] and result.get(STOP_REASON) in (None, StopReason.RUNNING):
            result[STOP_REASON] = StopReason.TEV.value

    def callback(self) -> "TEVAnnotator":
        return TEVAnnotator(self)

    # -- bookkeeping ------------------------------------------------------------------------
    def on_trial_remove(self, tune_controller, trial) -> None:
        for mid in member_configs(getattr(trial, "config", None) or {}):
            self._streak.pop(mid, None)

    def debug_string(self) -> str:
        stops = sum(v["stopped"] for v in self.verdicts.values())
        mode = "shadow" if self.shadow else "active"
        return f"Using TEVScheduler ({mode}): {len(self.verdicts)} flagged, {stops} stopped"

    def state(self) -> dict:
        return {
            "rule": dataclasses.asdict(self.rule),
            "shadow": self.shadow,
            "history": self.history,
            "trials": self.trials,
            "verdicts": self.verdicts,
            "streak": self._streak,
            "owner": self.owner,
        }

    def set_state(self, state: dict) -> None:
        self.rule = TEVRule(**state["rule"])
        self.shadow = state["shadow"]
        self.history, self.verdicts, self._streak = state["history"], state["verdicts"], state["streak"]
        self.trials = state.get("trials", {})
        self.owner = state.get("owner", {})

    def save(self, checkpoint_path: str) -> None:
        """Write the whole state as JSON, atomically (a kill mid-write leaves the old file)."""
        folder = os.path.dirname(os.path.abspath(checkpoint_path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tev-state-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.state(), f)
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.set_state(json.load(f))

    def _save_state(self) -> None:
        if self.state_path:
            self.save(self.state_path)

    def _load_once(self) -> None:
        if not self._loaded:
            self._loaded = True
            if self.state_path and os.path.exists(self.state_path):
                self.restore(self.state_path)
                # A resumed search has a new stop board: tell it every stop made before.
                if self.board:
                    for trial_id in set(self.owner.values()):
                        post(self.board, trial_id, [m for m, t in self.owner.items() if t == trial_id])

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def __getstate__(self):
        # Pickled by Tune when the Tuner is built; a fresh unpickle must read state_path again.
        return {**self.__dict__, "_loaded": False}


class TEVAnnotator(Callback):
    """Copies the scheduler's verdict into each result Tune keeps (and its loggers see)."""

    def __init__(self, scheduler: TEVScheduler):
        self.scheduler = scheduler

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.scheduler.annotate(trial.trial_id, result)
