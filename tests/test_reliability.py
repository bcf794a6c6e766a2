"""Reliability (docs/reliability.md): a Train worker killed mid-trial, a hundred TEV stops in a row,
and an MLflow server that goes away mid-search and comes back. Each runs a real search: a Ray
cluster on this machine, real Train workers, a real `mlflow server`."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from conftest import MlflowServer, descendants, process_title

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/soak.py's storm and watch

from tunestab import checkpoint, loop, replay, search, session, tracking
from tunestab import run_dir as run_dir_mod
from tunestab.config import TrialConfig

TRIAL = {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32, "batch_size": 4, "warmup_steps": 5, "eval_batches": 2}


def write_space(tmp_path, space: dict) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def start_search(tmp_path, space: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tunestab.search", "--space", space, *args],
        stdout=open(tmp_path / "search.log", "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def wait_for(what: str, check, proc, tmp_path, timeout_s: float = 300):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, f"search ended before {what}:\n" + (tmp_path / "search.log").read_text()[-3000:]
        found = check()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def finish(proc, tmp_path, timeout_s: float = 600) -> str:
    try:
        proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "search.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_a_killed_train_worker_restarts_from_its_checkpoint_and_the_trial_completes(tmp_path):
    """A population of two (two seeds, one trial): after a SIGKILL of its worker, each member
    continues from the checkpoint and reports what it reports never interrupted, and the console
    shows what happened."""
    trial = {**TRIAL, "lr": 0.01, "steps": 400, "report_every": 20, "eval_every": 400, "checkpoint_every": 100}
    space = write_space(
        tmp_path,
        {
            "name": "kill",
            "strategy": "sweep",
            "variants": ["baseline"],
            "trial": trial,
            "params": {"seed": {"grid": [0, 1]}},
            "scheduler": {"type": "none"},
            "resources": {"max_failures": 1},
        },
    )
    storage = tmp_path / "results"
    proc = start_search(tmp_path, space, "--storage", str(storage))
    try:
        # Registered, not just uploaded: a worker uploads its checkpoint folder before Ray Train's
        # controller takes the report that names it, and a restart only sees registered ones.
        wait_for(
            "a registered checkpoint",
            lambda: list(storage.glob("kill-*/train/*/checkpoint_manager_snapshot.json")),
            proc,
            tmp_path,
        )
        workers = wait_for(
            "the Train worker",
            lambda: [p for p in descendants(proc.pid) if "ray::RayTrainWorker" in process_title(p)],
            proc,
            tmp_path,
        )
        for pid in workers:
            os.kill(pid, signal.SIGKILL)  # nothing the worker can catch or clean up after
        killed_at = time.time()
    except BaseException:
        proc.kill()
        raise
    console = finish(proc, tmp_path)
    # A real failure still prints Ray's own account of it, in full: a worker that died, and the
    # Train controller's error with its traceback.
    assert "A worker died or was killed" in console and "ray.exceptions.ActorDiedError" in console, console[-4000:]

    run_dir = next(storage.glob("kill-*"))
    (trial_dir,) = (run_dir / "tune").glob("kill/trial_driver_*")  # both seeds: one trial
    results = replay.reports(trial_dir)
    # The restarted worker group continued from a checkpoint (step 100, 200 or 300), not from 0.
    assert results[-1]["resumed_from"] in (100, 200, 300), [r["resumed_from"] for r in results]
    assert any(r["timestamp"] >= killed_at - 1 for r in results if r["resumed_from"] > 0)
    members = {
        config["seed"]: reports
        for config, reports in replay.member_reports(
            SimpleNamespace(path=str(trial_dir), **trial_of(trial_dir))
        ).values()
    }
    assert sorted(members) == [0, 1]
    # ... and each member followed, report for report, its run that was never interrupted. A
    # 1-CPU Train worker computes on one thread; so does the reference, and then CPU results are
    # bitwise equal.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed, reports in members.items():
            assert reports[-1]["stop_reason"] == "completed" and reports[-1]["step"] == 400
            uninterrupted = session.LocalSession(out=io.StringIO())
            loop.run(TrialConfig(**{**trial, "variant": "baseline", "seed": seed}), uninterrupted)
            after_restart = {r["step"]: r["loss"] for r in reports}  # the last report of each step
            assert after_restart == {r["step"]: r["loss"] for r in uninterrupted.reports}
            assert reports[-1]["val_loss"] == uninterrupted.reports[-1]["val_loss"]
    finally:
        torch.set_num_threads(threads)
    table = pd.read_csv(run_dir / "trials.csv")
    assert list(table.stop_reason) == ["completed", "completed"]


def trial_of(trial_dir: Path) -> dict:
    """A trial's id and config as Tune recorded them (its last result)."""
    last = replay.reports(trial_dir)[-1]
    return {"trial_id": last["trial_id"], "config": last["config"]}


@pytest.mark.slow
def test_a_hundred_tev_stops_in_a_row_leave_no_actor_or_placement_group_behind(tmp_path):
    import ray
    from soak import PendingWatch, settle, stop_storm_space

    # A rule every trial meets at its first report: each of the 100 trials is stopped by the
    # scheduler at step 10, which is what ends its Train run (controller, workers, group). One
    # member a trial (`population: 1`): 100 Train runs start and end, as a search of 100
    # populations would. bench/soak.py runs the same storm at any length, under load.
    space = write_space(tmp_path, {**stop_storm_space(100), "name": "stops"})
    storage = tmp_path / "results"
    watch = PendingWatch()
    watch.start()
    try:
        assert search.main(["--space", space, "--storage", str(storage)]) == 0
        watch.stop = True
        watch.join()
        # Nothing of any trial is left: no trial driver, Train controller or worker, and every
        # placement group was removed. The last trial's processes get a few seconds to exit; a
        # leak stays past them. A leaked group's bundles say whose it was: Tune's trial group
        # holds `node:__internal_head__`, Train's `CPU`.
        actors, groups, waited = settle(20.0)
        print(
            f"100 stops: the last trial's actors {'were gone' if not actors and not groups else 'were still there'} {waited:.1f} s after the search"
        )
    finally:
        ray.shutdown()

    assert (actors, groups) == ([], []), (actors, groups)
    table = pd.read_csv(next(storage.glob("stops-*")) / "trials.csv")
    assert len(table) == 100 and set(table.stop_reason) == {"tev"} and set(table.step) == {10}
    # No trial waited on resources that were free (the Train V2 deadlock: a leaked group held the
    # CPU every pending trial needed). How long the trials took to start is the machine's business.
    starts = sorted(
        min(r["timestamp"] for r in replay.reports(p))
        for p in next(storage.glob("stops-*")).glob("tune/stops/trial_driver_*")
    )
    print(
        f"100 stops: first reports {starts[-1] - starts[0]:.0f} s apart in all; {watch.polls} polls; "
        f"longest a placement group was pending with room for it: {watch.longest:.0f} s"
    )
    assert watch.polls > 10 and watch.longest < 30, watch.stuck


def test_tracking_skips_mlflow_while_it_is_down_and_records_what_it_missed(tmp_path, monkeypatch, capsys):
    class Refusing:
        calls = 0

        def __getattr__(self, name):
            def fail(*args, **kwargs):
                Refusing.calls += 1
                raise ConnectionError("connection refused (test)")

            return fail

    marker = tmp_path / run_dir_mod.INCOMPLETE_FILE
    t = tracking.MLflowTracking("http://127.0.0.1:9", "exp", "parent", incomplete=str(marker))
    t._client = Refusing()
    config = {"variant": "baseline", "members": {"t1-0": {"lr": 0.01}, "t1-1": {"lr": 0.1}}}

    def result(step):
        return {"step": step, "members": {m: {"step": step, "loss": 3.0} for m in config["members"]}}

    trial = SimpleNamespace(trial_id="t1", config=config, last_result=result(20))
    t.on_trial_start(0, [], trial)
    for step in (10, 20):
        t.on_trial_result(0, [], trial, result(step))
    t.on_trial_complete(0, [], trial)
    # One failed call, then nothing until the retry interval: the search never waits on it.
    assert Refusing.calls == 1
    assert "open the run of member t1-0: ConnectionError" in marker.read_text()
    out = capsys.readouterr().out
    assert out.count("WARNING: MLflow") == 1 and f"python -m tunestab.replay {tmp_path}" in out
    # After the interval a health check decides: still down, so still no call.
    monkeypatch.setattr(tracking, "RETRY_AFTER_S", 0.0)
    t.on_trial_result(0, [], trial, result(30))
    assert Refusing.calls == 1


@pytest.mark.slow
def test_mlflow_going_away_mid_search_loses_nothing_and_replay_fills_it_in(tmp_path):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path).start()
    space = write_space(
        tmp_path,
        {
            "name": "outage",
            "strategy": "max_lr",
            "variants": ["baseline", "qk_norm"],
            "trial": {**TRIAL, "steps": 200, "report_every": 10, "eval_every": 200, "checkpoint_every": 100},
            "params": {"lr": {"loguniform": [1e-3, 30.0]}},
            "max_lr": {"ratio": 1.25, "slots": 1, "max_trials": 2, "seeds": 0},
            "resources": {"max_concurrent": 2},
        },
    )
    storage = tmp_path / "results"
    # No HTTP retries: the outage is seen at once (the default, 3 tries, only makes it later).
    proc = start_search(
        tmp_path,
        space,
        "--storage",
        str(storage),
        "--tracking-uri",
        server.uri,
        env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    client = MlflowClient(server.uri)

    def logging_started():
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return any(r.data.metrics.get("step", 0) >= 20 for r in runs)

    try:
        wait_for("the first trial's reports in MLflow", logging_started, proc, tmp_path)
    except BaseException:
        proc.kill()
        raise
    server.stop()
    out = finish(proc, tmp_path)  # the search finishes with the server gone
    run_dir = next(storage.glob("outage-*"))
    assert "WARNING: MLflow" in out and f"python -m tunestab.replay {run_dir}" in out
    assert (run_dir / run_dir_mod.INCOMPLETE_FILE).exists()
    trials = pd.read_csv(run_dir / "trials.csv")
    assert len(trials) == 4  # Ray's own results kept every trial

    server.start()
    try:
        done = replay.main([str(run_dir)])
        again = replay.replay(run_dir, server.uri)
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        histories = {
            r.data.tags["member_id"]: [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
            for r in children
        }
        artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    finally:
        server.stop()
    assert done == 0 and again == {"trials": 0, "steps": 0, "ended": 0, "parent": False}
    assert not (run_dir / run_dir_mod.INCOMPLETE_FILE).exists()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and "summary.md" in artifacts
    assert sorted(histories) == sorted(trials.trial_id) and all(r.info.status == "FINISHED" for r in children)
    # Every report Tune kept of every member is in MLflow exactly once.
    kept = 0
    for path in run_dir.glob("tune/outage/trial_driver_*"):
        for mid, (_, reports) in replay.member_reports(SimpleNamespace(path=str(path), **trial_of(path))).items():
            assert histories[mid] == [r["step"] for r in reports]
            kept += 1
    assert kept == 4
    for _, row in pd.read_csv(run_dir / "summary.csv").dropna(subset=["max_stable_lr"]).iterrows():
        assert parents[0].data.metrics[f"max_stable_lr/{row.variant}"] == row.max_stable_lr
    assert json.loads((run_dir / run_dir_mod.STATE_FILE).read_text())["finished"] is True
    assert Path(run_dir / (run_dir_mod.INCOMPLETE_FILE + ".replayed")).exists()


GOOD = {
    "name": "bad",
    "strategy": "max_lr",
    "variants": ["baseline", "mlra"],
    "trial": {**TRIAL, "steps": 20, "report_every": 10, "eval_every": 20},
    "params": {"lr": {"loguniform": [1e-3, 1.0]}},
}


@pytest.mark.parametrize(
    "text, key",
    [
        ("name: bad\nstrategy: [max_lr\n", "not valid YAML (line"),  # malformed
        ("name: !!python/object/apply:os.system ['touch {marker}']\n", "not valid YAML"),  # builds an object
        (yaml.safe_dump({**GOOD, "trail": {}}), "trail: unknown key"),  # a typo
        (yaml.safe_dump({**GOOD, "trial": {**GOOD["trial"], "n_layer": "twelve"}}), "trial.n_layer"),  # wrong type
        (
            yaml.safe_dump({**GOOD, "params": {"lr": {"loguniform": [1.0, 1e-3]}}}),
            "params.lr.loguniform: low must be below high",
        ),
        (yaml.safe_dump({**GOOD, "strategy": "sweep", "params": {"lr": {"grid": []}}}), "params.lr.grid"),  # empty
        (yaml.safe_dump({**GOOD, "strategy": "tune", "params": {"mlra_rank": {"int": [0, 999]}}}), "params.mlra_rank"),
        (
            yaml.safe_dump(
                {**GOOD, "strategy": "tune", "variants": ["softcap"], "params": {"softcap": {"uniform": [-1, 5]}}}
            ),
            "params.softcap",
        ),
        (yaml.safe_dump({**GOOD, "trial": {**GOOD["trial"], "data": "/no/such/corpus.jsonl"}}), "trial.data:"),
        (
            yaml.safe_dump({**GOOD, "tracking_uri": "mysql://nobody:secret@127.0.0.1:9/x"}),
            "tracking_uri: tracking database mysql://nobody:***@",
        ),
        (yaml.safe_dump({**GOOD, "storage": "/proc/cannot/write/here"}), "storage: cannot write"),
        (yaml.safe_dump({**GOOD, "resources": {"max_failures": -1}}), "resources.max_failures: must be >= 0"),
    ],
)
def test_bad_input_is_one_screen_naming_its_key_and_nothing_starts(tmp_path, capsys, text, key):
    import ray

    marker = tmp_path / "pwned"
    path = tmp_path / "space.yaml"
    path.write_text(text.replace("{marker}", str(marker)))
    args = ["--space", str(path)] + ([] if "storage:" in text else ["--storage", str(tmp_path / "s")])
    assert search.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and "Traceback" not in err
    assert len(err.splitlines()) <= 25 and "secret" not in err  # one screen, no password
    assert not ray.is_initialized() and not marker.exists() and not list(tmp_path.glob("s/bad-*"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "step_000010"
    folder.mkdir()
    torch.save({"model": Payload()}, folder / checkpoint.CHECKPOINT_FILE)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_checkpoint([str(folder)])
    assert "unreadable" in str(e.value) and not marker.exists()  # weights_only=True: nothing ran
