"""Ray Train: a trial's TorchTrainer with DDP across workers, restarts from checkpoints."""

import io

import pytest
from test_loop import tiny

from tunestab import ray_trial
from tunestab import session as session_mod
from tunestab.loop import run
from tunestab.session import LocalSession


@pytest.mark.slow
def test_two_ray_workers_follow_the_one_worker_loss_curve(tmp_path):
    # Same global batch (8 sequences): each of 2 DDP workers takes 4 of the 8 blocks a 1-worker
    # run takes, in 2 micro-batches of 2 (DDP all-reduces only after the second), and DDP averages
    # the gradients, so the curves differ only by float reduction order. The workers run the GPU
    # path's order, DDP wrapped first and compiled around (inductor on the CPU, gloo for NCCL);
    # the 1-worker run is eager.
    cfg = tiny(checkpoint_every=10, data_cache=str(tmp_path / "cache"))
    one = LocalSession(out=io.StringIO())
    run(cfg, one)
    cfg = tiny(checkpoint_every=10, data_cache=str(tmp_path / "cache"), micro_batch_size=2, compile=True)
    import ray

    try:
        result = ray_trial.run_with_ray(cfg, workers=2, use_gpu=False, storage=str(tmp_path / "ray"), name="ddp")
    finally:
        ray.shutdown()
    assert result.error is None
    # Train V2 builds metrics_dataframe from the checkpoints it kept: the last KEEP_CHECKPOINTS
    # of those at steps 10, 20 and 30 (the older one is deleted from storage).
    two = result.metrics_dataframe.set_index("step")["loss"]
    assert list(two.index) == [10, 20, 30][-ray_trial.KEEP_CHECKPOINTS :]
    one_loss = {r["step"]: r["loss"] for r in one.reports}
    for step in two.index:
        assert two[step] == pytest.approx(one_loss[step], rel=2e-3), step


@pytest.mark.slow
def test_a_restarted_ray_trial_resumes_from_its_last_checkpoint(tmp_path):
    import ray

    def crash_once_loop(config):
        import os

        from tunestab.config import TrialConfig as C
        from tunestab.loop import run as run_loop
        from tunestab.session import RaySession

        class CrashAfterStep20(RaySession):
            def report(self, metrics, checkpoint_dir):
                super().report(metrics, checkpoint_dir)
                if metrics["step"] == 20 and not os.path.exists(config["marker"]):
                    open(config["marker"], "w").close()
                    raise RuntimeError("injected worker failure")

        run_loop(C(**config["trial"]), CrashAfterStep20())

    cfg = tiny(checkpoint_every=10, data_cache=str(tmp_path / "cache"))
    uninterrupted = LocalSession(out=io.StringIO())
    run(cfg, uninterrupted)
    marker = tmp_path / "crashed"
    try:
        result = ray_trial.run_with_ray(
            cfg,
            workers=1,
            use_gpu=False,
            storage=str(tmp_path / "ray"),
            name="restart",
            max_failures=1,
            loop=crash_once_loop,
            extra={"marker": str(marker)},
        )
    finally:
        ray.shutdown()
    assert marker.exists() and result.error is None  # it crashed once, and recovered
    reports = result.metrics_dataframe.set_index("step")["loss"]
    # The kept checkpoints: 20 from the first worker group, 30 from the restarted one.
    assert list(reports.index) == [10, 20, 30][-ray_trial.KEEP_CHECKPOINTS :]
    assert reports[30] == pytest.approx(uninterrupted.reports[2]["loss"], rel=1e-5)


@pytest.mark.slow
def test_a_train_worker_imports_neither_mlflow_nor_optuna_nor_the_search(tmp_path):
    """A trial's worker loads tunestab.ray_trial (train_loop_per_worker) and what the loop needs:
    not the tracking, search or analysis modules, which would cost every trial their imports."""
    import ray

    def probe_loop(config):
        import sys
        import tempfile

        import ray.train

        from tunestab.ray_trial import train_loop_per_worker  # what a real worker unpickles

        assert callable(train_loop_per_worker)

        # (pandas is not among them: Ray Train's worker imports it itself, through Ray Data.)
        heavy = (
            "mlflow",
            "optuna",
            "matplotlib",
            "tunestab.search",
            "tunestab.tracking",
            "tunestab.analysis",
            "tunestab.bracket",
            "tunestab.replay",
        )
        with tempfile.TemporaryDirectory() as tmp:  # Train V2 keeps the metrics of checkpointed reports
            ray.train.report(
                {"step": 1, "loaded": " ".join(m for m in heavy if m in sys.modules)},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )

    try:
        result = ray_trial.run_with_ray(
            tiny(), workers=1, use_gpu=False, storage=str(tmp_path / "ray"), name="imports", loop=probe_loop
        )
    finally:
        ray.shutdown()
    assert result.error is None and result.metrics["step"] == 1
    assert result.metrics["loaded"] == ""


def test_a_ray_trial_falls_back_to_its_older_checkpoints_newest_first(tmp_path):
    from ray.train import Checkpoint

    run_dir = tmp_path / "trial"
    names = [
        "checkpoint_2026-11-23_08-10-21.259995",
        "checkpoint_2026-11-23_08-09-52.991071",
        "checkpoint_2026-11-23_08-11-05.000001",
    ]  # the last: a newer upload that never registered
    for n in names:
        (run_dir / n).mkdir(parents=True)
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    older = session_mod.older_checkpoints(Checkpoint(str(run_dir / names[0])))
    assert [c.path.rsplit("/", 1)[1] for c in older] == [names[1]]


RELAY_RACE = """
import sys
import ray
from ray import tune

def trial(config):
    # What a trial driver's Train run does through TuneReportCallback: each report goes into the
    # session's size-1 relay queue; the last one is still there when the training function ends.
    from ray.train._internal.session import get_session
    from tunestab.ray_trial import reports_relayed
    relay = get_session()._get_or_create_inter_actor_queue()
    for step in (1, 2, 3):
        relay.put({"step": step})
    if config["wait"]:
        reports_relayed()

ray.init(address="local", num_cpus=1, include_dashboard=False)
grid = tune.Tuner(
    trial, param_space={"wait": sys.argv[1] == "wait"},
    run_config=tune.RunConfig(verbose=0, storage_path=sys.argv[2]),
).fit()
print("last step", grid[0].metrics["step"])
"""


@pytest.mark.slow
def test_a_trial_whose_last_report_is_still_in_flight_when_its_train_run_ends_finishes(tmp_path):
    """Ray 2.60's race (tunestab/ray_trial.py, reports_relayed): without the wait the trial's
    actor blocks for good in Queue.put, so this run times out; with it, every report reaches Tune
    and the trial ends. (Run without the wait, 2 of 2 runs hung here, 2026-12-07.)"""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", RELAY_RACE, "wait", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "last step 3" in done.stdout
