"""MLflow as the system of record: one experiment per search space, one parent run per search,
one child run per member of every trial's population (docs/design.md, "MLflow layout"): a member
is what users compare, as a lone trial was before populations (tunestab/members.py).

`MLflowTracking` is a Ray Tune callback on the driver. It talks to MLflow through `MlflowClient`
(no global active run, so members that run side by side never mix their metrics). Its state maps
member ids to run ids and is saved with Tune's experiment checkpoint, so `--resume` continues the
same runs instead of opening new ones; a run opened after the last experiment checkpoint is found
again by its `member_id` tag, and steps a resumed trial replays are not logged twice. Ray's
`MLflowLoggerCallback` keeps no such state across a restore and cannot tag a parent run, hence
this small class.
"""

from __future__ import annotations

import math
import os
import time

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune.callback import Callback

from .members import MEMBER_ID, MEMBERS, ended, is_fresh, member_configs
from .mlflow_view import SEARCH_TAG
from .outcome import LR, OUTCOME, SIZE, STOP_REASON, StopReason, answer_metrics, arm_label, metric_name, outcome
from .tracking_store import TrackingError, check_reachable

PARENT_TAG = "mlflow.parentRunId"
# Result keys that are bookkeeping of Tune's, not measurements worth a chart.
SKIP_METRICS = {
    "training_iteration",
    "time_this_iter_s",
    "time_total_s",
    "timestamp",
    "pid",
    "done",
    "time_since_restore",
    "iterations_since_restore",
    "config",
    "checkpoint_dir_name",
}
TAGS = ("variant", "stop_reason", "tev_stop_reason")


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def numeric(result: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in result.items()
        if k not in SKIP_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


# How long the search waits before asking a tracking server that went away whether it is back.
RETRY_AFTER_S = 60.0


class MLflowTracking(Callback):
    """Parent run per search, child run per trial, metrics at each report's training step.

    MLflow is the system of record but not a dependency of training: when the tracking store
    fails, the search goes on (Tune's own result files keep every report), this callback writes
    `incomplete` and stops calling MLflow until a health check says it is back, and
    `python -m tunestab.replay` later logs what is missing.
    """

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, incomplete: str | None = None):
        self.tracking_uri, self.experiment, self.parent_run_id = tracking_uri, experiment, parent_run_id
        self.incomplete = incomplete  # the marker file to write when something is not logged
        self.runs: dict[str, str] = {}  # member id -> MLflow run id
        self.finished: set[str] = set()  # members whose run has ended
        # MLflow run id -> last training step logged. Not saved with Tune's state: a killed driver
        # may have logged more after the last experiment checkpoint, so MLflow itself is asked.
        self.logged: dict[str, int] = {}
        self._client, self._experiment_id = None, None
        self._down_since = None  # time.monotonic() of the last failure while the store is down

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self):
        return {**self.__dict__, "_client": None, "logged": {}, "_down_since": None}

    def _safely(self, what: str, fn) -> None:
        """Run fn, one MLflow action; if the store is down, skip it and remember to replay."""
        if self._down_since is not None:
            if time.monotonic() - self._down_since < RETRY_AFTER_S:
                return
            if not self._reachable():
                self._down_since = time.monotonic()
                return
            self._down_since = None
            print(f"tunestab: MLflow at {self.tracking_uri} is back; logging again", flush=True)
        try:
            fn()
        except Exception as e:  # MlflowException, requests' and sqlite's errors: all mean "not logged"
            self._down_since = time.monotonic()
            self.logged.clear()  # ask MLflow again what it has once it is back
            if self.incomplete:
                with open(self.incomplete, "a") as f:
                    f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {what}: {type(e).__name__}: {e}\n")
            print(
                f"tunestab: WARNING: MLflow at {self.tracking_uri} failed ({what}: {type(e).__name__}: "
                f"{str(e)[:200]}). Training goes on and Tune's result files keep every report; "
                f"MLflow is retried every {RETRY_AFTER_S:.0f} s, and `python -m tunestab.replay "
                f"{os.path.dirname(self.incomplete or '.')}` logs what it missed.",
                flush=True,
            )

    def _reachable(self) -> bool:
        try:
            check_reachable(self.tracking_uri, timeout_s=2.0)
            return True
        except TrackingError:
            return False

    def get_state(self) -> dict:
        return {"runs": dict(self.runs), "finished": sorted(self.finished)}

    def set_state(self, state: dict) -> None:
        self.runs.update(state.get("runs", {}))
        self.finished.update(state.get("finished", []))

    def last_logged_step(self, run_id: str) -> int:
        if run_id not in self.logged:
            self.logged[run_id] = int(self.client.get_run(run_id).data.metrics.get("step", -1))
        return self.logged[run_id]

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self.client.get_run(self.parent_run_id).info.experiment_id
        return self._experiment_id

    def existing_run(self, member_id: str) -> str | None:
        """The child run of this member, when an earlier (killed) driver opened it after Tune's
        last experiment checkpoint: a resumed search continues it instead of opening a second."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{MEMBER_ID} = '{member_id}' and tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
        )
        if not found:
            return None
        return found[0].info.run_id

    def run_for(self, member_id: str, trial_id: str, config: dict) -> str:
        """The member's child run, opened with its params and tags when it has none yet."""
        if member_id not in self.runs:
            run_id = self.existing_run(member_id)
            if run_id is None:
                tags = {
                    PARENT_TAG: self.parent_run_id,
                    SEARCH_TAG: self.parent_run_id,
                    "tune_trial_id": trial_id,
                    MEMBER_ID: member_id,
                    "variant": str(config.get("variant", "")),
                }
                # A scale strategy's member carries its size: tagged and named with it, so that the
                # UI tells w32's members from w96's without reading d_model.
                size = config.get(SIZE)
                if size is not None:
                    tags[SIZE] = size
                name = arm_label(config.get("variant", "trial"), size)
                run = self.client.create_run(self.experiment_id, run_name=f"{name}-{member_id}", tags=tags)
                run_id = run.info.run_id
                self.logged[run_id] = -1
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in flat_params(config).items()])
            self.runs[member_id] = run_id
        return self.runs[member_id]

    def log_result(self, run_id: str, result: dict) -> None:
        step = int(result.get("step", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(k), v, now, step) for k, v in numeric(result).items()]
        for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[i : i + 900])
        self.logged[run_id] = max(step, self.logged.get(run_id, -1))

    def finish(self, run_id: str, last: dict, status: str, config: dict) -> None:
        """End a member's run: its outcome tags, then the answer metrics the view plots
        (outcome.answer_metrics), at its last step."""
        tags = {k: str(last[k]) for k in TAGS if k in last}
        tags["diverged"] = str(int(last.get("diverged", 0)))
        tags["stop_step"] = str(last.get("step", 0))
        if status == "FAILED":
            tags[STOP_REASON] = StopReason.ERROR.value
        # stable | diverged | stopped_by_tev | error: what a TEV-stopped member's diverged=0 hides
        ended = {**last, STOP_REASON: tags.get(STOP_REASON)}
        tags[OUTCOME] = outcome(ended).value
        arm = arm_label(str(config.get("variant", "")), config.get(SIZE))
        answer = answer_metrics(arm, float(config.get(LR) or 0.0), ended)
        step, now = int(last.get("step", 0)), int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, step) for k, v in answer.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        self.client.set_terminated(run_id, status)

    def end_member(self, member_id: str, trial, last: dict | None, status: str) -> None:
        if member_id in self.finished:
            return
        config = member_configs(trial.config).get(member_id, {})
        self.finish(self.run_for(member_id, trial.trial_id, config), last or {}, status, config)
        self.finished.add(member_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        for mid, config in member_configs(trial.config).items():
            self._safely(f"open the run of member {mid}", lambda: self.run_for(mid, trial.trial_id, config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        configs = member_configs(trial.config)
        for mid, report in (result.get(MEMBERS) or {}).items():
            if not is_fresh(report, result):
                continue  # carried from an earlier report: logged then

            def log(mid=mid, report=report):
                run_id = self.run_for(mid, trial.trial_id, configs.get(mid, {}))
                # A resumed trial replays steps MLflow already has.
                if int(report.get("step", 0)) > self.last_logged_step(run_id):
                    self.log_result(run_id, report)
                if ended(report):
                    self.end_member(mid, trial, report, "FINISHED")

            self._safely(f"log step {report.get('step')} of member {mid}", log)

    def _end_all(self, trial, status: str) -> None:
        finals = (trial.last_result or {}).get(MEMBERS) or {}
        for mid in member_configs(trial.config):
            last = finals.get(mid)
            # A member that had ended before an error ended as it did; the others failed with the trial.
            why = "FINISHED" if status == "FINISHED" or ended(last) else status
            self._safely(
                f"finish member {mid}", lambda mid=mid, last=last, why=why: self.end_member(mid, trial, last, why)
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end_all(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end_all(trial, "FAILED")


def start_parent(tracking_uri: str, experiment: str, run_name: str, tags: dict, artifacts: str | None = None) -> str:
    """Create (or find) the experiment and open the search's parent run; returns its id."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifacts)
    run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    client.set_tag(run_id, SEARCH_TAG, run_id)
    return run_id
