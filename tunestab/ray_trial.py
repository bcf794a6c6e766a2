"""Ray Train: one trial as a TorchTrainer, and the Ray Tune trial driver that starts it.

Every worker of a trial runs `train_loop_per_worker`, which is the loop of tunestab/loop.py with
a RaySession (reports through `ray.train.report`, DDP across the trial's workers). A Tune trial
is `trial_driver`: a small function that builds the trial's TorchTrainer (Ray Train V2) for its
population (tunestab/members.py) and relays rank 0's reports to Tune.
"""

from __future__ import annotations

import logging
import time

from .cluster import RAY_TRAIN_ENV
from .config import TrialConfig, config_from
from .loop import run, run_population
from .members import member_configs
from .outcome import SIZE
from .session import RaySession

# Checkpoints Ray Train keeps per trial: the latest, and the one before it to fall back on when
# the latest cannot be read. All of them would fill a disk (GPT-2 small with AdamW state: 1.5 GB
# each).
KEEP_CHECKPOINTS = 2


def train_loop_per_worker(config: dict) -> None:
    """Entry point of every Ray Train worker: config = {"trial": TrialConfig fields} for one
    model reporting on its own, or {"members": {member id: TrialConfig fields}, "board": the
    search's stop board, "trial_id"} for a population; and "echo", "quiet": bool."""
    if config.get("quiet"):
        quiet_report_logs()
    session = RaySession(echo=config.get("echo", False), board=config.get("board"), trial_id=config.get("trial_id"))
    if "members" in config:
        run_population({mid: TrialConfig(**c) for mid, c in config["members"].items()}, session)
    else:
        run(TrialConfig(**config["trial"]), session)


def quiet_report_logs() -> None:
    """Ray Train V2 (2.60) logs every report with all its metrics at INFO from a logger named
    after its source file, so `LoggingConfig(log_level=...)`, which filters `ray.train.*`, misses
    it; in a search that is one screen-wide line per report per trial."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # moved in another Ray version: the logs are noisy, nothing breaks
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def run_with_ray(
    cfg: TrialConfig,
    workers: int,
    use_gpu: bool,
    storage: str | None,
    name: str | None,
    max_failures: int = 0,
    loop=train_loop_per_worker,
    extra: dict | None = None,
):
    """One trial through TorchTrainer on `workers` workers (Ray started locally if needed).

    A worker failure restarts the worker group up to `max_failures` times; `run` then resumes
    from the last checkpoint reported through Ray Train.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            runtime_env={"env_vars": RAY_TRAIN_ENV},
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    return torch_trainer(
        loop,
        {"trial": cfg.to_dict(), "echo": True, **(extra or {})},
        workers,
        gpus_per_worker=1.0 if use_gpu else 0.0,
        storage=storage,
        name=name,
        max_failures=max_failures,
    ).fit()


def torch_trainer(
    loop,
    loop_config: dict,
    workers: int,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    storage: str | None = None,
    name: str | None = None,
    max_failures: int = 0,
    callbacks=(),
    log_level: str = "INFO",
    accelerator_type: str = "",
):
    """The TorchTrainer of one trial: `workers` ranks (gloo on CPU, NCCL on GPUs), restarted from
    the last checkpoint up to `max_failures` times. `log_level` filters Ray Train's console logs
    (at INFO every worker prints each report with all its metrics). `accelerator_type` (Ray's
    name, e.g. H100) places the workers on nodes with that GPU."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    gpus = float(gpus_per_worker)
    return trainer_class()(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": float(cpus_per_worker), **({"GPU": gpus} if gpus else {})},
            accelerator_type=accelerator_type or None,
        ),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(
            storage_path=storage,
            name=name,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level=log_level),
        ),
    )


def trainer_class():
    """TorchTrainer without two helper actors that Ray Train V2 (2.60) starts for every run, each
    one more Python process per trial importing Ray Train (docs/overhead.md):

    - a DatasetsCallback's DatasetManager, started even when the trainer has no datasets. The
      loop reads its own token batches, so a trial without datasets drops that callback.
    - a PlacementGroupCleanerCallback's detached PlacementGroupCleaner, which frees the worker
      group's placement group if the controller dies instead of shutting down. A search frees
      such groups itself, once for all its trials (placement_sweep.PlacementGroupSweep, a Tune
      callback). Outside Tune (`run_with_ray`) the script is the group's job, and Ray frees the
      group when the script ends.

    The callback list is Ray's private API: if it changes, the filter finds nothing and the trial
    runs as before (tests/test_scheduler.py checks which actors trials start).
    """
    from ray.train.torch import TorchTrainer

    class TorchTrainerWithoutHelpers(TorchTrainer):
        def _create_default_callbacks(self):
            dropped = {"PlacementGroupCleanerCallback"} | (set() if self.datasets else {"DatasetsCallback"})
            return [c for c in super()._create_default_callbacks() if type(c).__name__ not in dropped]

    return TorchTrainerWithoutHelpers


def trial_driver(config: dict) -> None:
    """One Ray Tune trial: a small driver that runs the trial's TorchTrainer (Ray Train V2).

    `config` holds the population's shared TrialConfig fields, each member's own under `members`
    (tunestab/members.py), and `runner`: {"workers", "cpus_per_worker", "gpus_per_worker",
    "max_failures", "storage", "accelerator_type", "board"}. Rank 0's reports reach Tune through
    TuneReportCallback.

    The Train run lives at `<runner.storage>/<trial id>`, a path that outlives this process: Tune
    hands a function trial a staging directory under the Ray session (`get_trial_dir()`), which
    a new session after `--resume` does not have, so a restored trial would start from scratch
    instead of from its last checkpoint.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    runner = dict(config.get("runner") or {})
    trial_id = ray.tune.get_context().get_trial_id()
    # `size` names a scale strategy's model size; its fields are in the config already.
    members = {
        mid: config_from({k: v for k, v in c.items() if k != SIZE}, f"member {mid}").to_dict()
        for mid, c in member_configs(config).items()
    }
    torch_trainer(
        train_loop_per_worker,
        {"members": members, "quiet": True, "board": runner.get("board"), "trial_id": trial_id},
        int(runner.get("workers", 1)),
        cpus_per_worker=runner.get("cpus_per_worker", 1),
        gpus_per_worker=runner.get("gpus_per_worker", 0),
        storage=runner.get("storage") or ray.tune.get_context().get_trial_dir(),
        name=trial_id,
        max_failures=int(runner.get("max_failures", 0)),
        callbacks=[TuneReportCallback()],
        accelerator_type=runner.get("accelerator_type", ""),
        # Tune's progress table and MLflow show the metrics; one line per report per
        # trial in the console would bury them.
        log_level="WARNING",
    ).fit()
    reports_relayed()


# How long a trial's driver waits, after its Train run, for its last reports to reach Tune; and
# for how long both queues must have stayed empty to count as drained.
RELAY_TIMEOUT_S, RELAY_QUIET_S = 60.0, 0.5


def reports_relayed(timeout_s: float = RELAY_TIMEOUT_S, quiet_s: float = RELAY_QUIET_S) -> bool:
    """Return once every report of the finished Train run has reached Tune.

    A race in Ray 2.60 deadlocks the trial otherwise (seen in CI, 2026-12-07, with py-spy: the
    trial's actor blocked for good in `Queue.put`, `ray/train/_internal/session.py:410`).
    TuneReportCallback hands each report to Tune's session through a size-1 queue actor, and the
    session's main thread moves it into its own size-1 result queue. When the training function
    returns, Tune's function trainable reports a last, empty result into that result queue from
    the training thread (`function_trainable.py:255`). If the Train run's last report is still in
    the queue actor then, the main thread takes it and puts it into a result queue that is already
    full, and the only thread that would empty it is itself. So the training function returns
    only once the queue actor and the result queue have both stayed empty for `quiet_s`."""
    from ray.train._internal.session import get_session

    session = get_session()
    if session is None:  # not in a Tune trial: nothing to relay
        return True
    relay = getattr(session, "_inter_actor_queue", None)
    results = getattr(session, "result_queue", None)
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        try:
            empty = (relay is None or relay.empty()) and (results is None or results.empty())
        except Exception:  # the queue actor is gone: the trial is being torn down, nothing to relay
            return False
        if not empty:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return True
        time.sleep(0.05)
    return False
