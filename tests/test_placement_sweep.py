"""The search removes the placement groups of this job whose creator actor is dead, and nothing
else (tunestab/placement_sweep.py)."""

import sys
import time
from pathlib import Path

import pytest

from tunestab import placement_sweep
from tunestab.placement_sweep import Group, PlacementGroupSweep, held_by_actors, orphans

JOB = "01000000"


def group(gid, state="CREATED", job=JOB, creator_actor="aa", dead=True, detached=False):
    return Group(gid, state, job, creator_actor, dead, detached, ({"CPU": 1.0},))


def test_only_held_groups_of_this_job_whose_creator_actor_died_are_orphans():
    groups = [
        group("orphan"),
        group("pending-orphan", state="PENDING"),
        group("alive", dead=False),
        group("removed", state="REMOVED"),
        group("detached", detached=True),
        group("by-the-driver", creator_actor="", dead=False),  # Tune's own trial groups
        group("other-job", job="02000000"),
    ]
    assert orphans(groups, JOB) == {"orphan", "pending-orphan"}


def test_actor_made_groups_still_held_are_what_the_last_sweep_waits_for():
    groups = [
        group("orphan"),
        group("alive", dead=False),
        group("removed", state="REMOVED"),
        group("tune", creator_actor=""),
    ]
    assert held_by_actors(groups, JOB) == {"orphan", "alive"}


def test_an_orphan_is_removed_on_first_sighting_with_one_line_and_a_live_group_is_kept(capsys):
    table = [group("g1"), group("live", dead=False)]
    removed = []
    sweep = PlacementGroupSweep(interval_s=0.0)
    sweep.read, sweep.remove, sweep.job = (lambda: list(table)), removed.append, (lambda: JOB)
    left = sweep.sweep()
    assert removed == ["g1"] and [g.id for g in left] == ["live"]
    table[:] = [g for g in table if g.id != "g1"] + [group("g2")]
    sweep.sweep()
    assert removed == ["g1", "g2"] and sweep.removed == ["g1", "g2"]
    out = capsys.readouterr().out
    assert out.count("tunestab: removed placement group") == 2 and "g1 (CPU 1)" in out


def test_the_soak_counts_what_the_sweep_removed_and_its_no_sweep_removes_nothing(monkeypatch):
    """bench/soak.py reports the groups the search's sweep removed; with --no-sweep nothing is."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import soak

    monkeypatch.setattr(PlacementGroupSweep, "sweep", PlacementGroupSweep.sweep)  # undone after the test
    table = [group("g1"), group("live", dead=False)]
    counted = soak.patch_sweep(off=False)
    sweep = PlacementGroupSweep()

    def remove(gid):
        table[:] = [g for g in table if g.id != gid]

    sweep.read, sweep.remove, sweep.job = (lambda: list(table)), remove, (lambda: JOB)
    assert [g.id for g in sweep.sweep()] == ["live"]
    table.append(group("g2"))
    sweep.sweep()
    sweep.sweep()
    assert counted == ["g1", "g2"]

    off = soak.patch_sweep(off=True)
    assert sweep.sweep() == [] and off == []


def test_the_last_sweep_waits_for_ending_train_runs_and_removes_what_they_leave():
    """At the end of the search a Train controller may still be ending: the final sweep polls
    until its group is freed or orphaned (then removed), within `settle_s`."""
    table = [group("ending", dead=False)]
    reads = []

    def read():
        reads.append(1)
        if len(reads) == 3:  # the controller dies without freeing its group
            table[:] = [group("ending")]
        return list(table)

    removed = []
    sweep = PlacementGroupSweep(settle_s=30.0)
    sweep.read, sweep.job = read, (lambda: JOB)
    sweep.remove = lambda gid: (removed.append(gid), table.clear())
    sweep.on_experiment_end([])
    assert removed == ["ending"] and len(reads) == 3

    # A group whose controller never ends is left after settle_s (the job's end frees it).
    table[:] = [group("stuck", dead=False)]
    sweep = PlacementGroupSweep(settle_s=0.5)
    sweep.read, sweep.remove, sweep.job = (lambda: list(table)), removed.append, (lambda: JOB)
    start = time.monotonic()
    sweep.on_experiment_end([])
    assert 0.5 <= time.monotonic() - start < 5 and removed == ["ending"]


def test_the_sweep_runs_once_an_interval_from_tunes_loop(monkeypatch):
    # time.monotonic() counts from boot: on a machine up for 10 s the first step still sweeps
    # (CI once ran minutes after a restart, and a sweep that waited for its first interval failed).
    clock = [10.0]
    monkeypatch.setattr(placement_sweep.time, "monotonic", lambda: clock[0])
    reads = []
    sweep = PlacementGroupSweep(interval_s=3600.0)
    sweep.read, sweep.remove, sweep.job = (lambda: reads.append(1) or []), (lambda gid: None), (lambda: JOB)
    for i in range(5):
        sweep.on_step_begin(i, [])
        clock[0] += 60.0
    assert len(reads) == 1
    clock[0] = 10.0 + 3600.0
    sweep.on_step_begin(5, [])
    assert len(reads) == 2


@pytest.mark.slow
def test_on_a_real_cluster_it_removes_a_dead_actors_group_and_keeps_the_others():
    """An actor creates a group and is killed without removing it: the group stays CREATED,
    holding its CPU, as a Train worker group does when its controller dies. The sweep removes it;
    a live actor's group, a detached group and the driver's own group stay."""
    import ray
    import ray.cloudpickle
    from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
    from ray.util.state import list_placement_groups

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self, detached: bool) -> str:
            pg = placement_group([{"CPU": 1}], lifetime="detached" if detached else None)
            ray.get(pg.ready(), timeout=60)
            return pg.id.hex()

    ray.init(address="local", num_cpus=4, include_dashboard=True)  # its own cluster, whatever else runs here
    try:
        doomed, living, detacher = Creator.remote(), Creator.remote(), Creator.remote()
        leaked = ray.get(doomed.make.remote(False))
        kept = ray.get(living.make.remote(False))
        detached = ray.get(detacher.make.remote(True))
        ours = placement_group([{"CPU": 1}])
        ray.get(ours.ready(), timeout=60)
        ray.kill(doomed)
        ray.kill(detacher)
        time.sleep(2)  # the GCS hears of the deaths

        sweep = PlacementGroupSweep()
        left = {g.id for g in sweep.sweep()}
        assert sweep.removed == [leaked] and leaked not in left and {kept, detached, ours.id.hex()} <= left

        states = {g.placement_group_id: g.state for g in list_placement_groups(limit=1000)}
        assert states[leaked] == "REMOVED"
        assert states[kept] == states[detached] == states[ours.id.hex()] == "CREATED"
        # Its CPU is free again (the resource view follows within a second or two): three groups of
        # 1 CPU still hold three of the four.
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU") != 1.0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU") == 1.0
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(detached))))  # detached: ours to free
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_trial_that_tune_stops_mid_run_frees_its_workers_cpu_for_the_next_trial(tmp_path, capfd):
    """The case Train's own PlacementGroupCleaner covered, which trials start without
    (ray_trial.trainer_class): Tune stops a trial while its Train run is going, its driver dies,
    and the Train controller dies with it without freeing its worker group. On a 1-CPU cluster
    the next trial's worker needs that CPU; the sweep frees it, and the next trial trains to the
    end. Without a sweep the second trial never starts (its controller waits for the CPU and
    retries), and the time budget ends the run with it unfinished."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from tunestab.cluster import RAY_TRAIN_ENV
    from tunestab.ray_trial import trial_driver

    class StopTheFirstTrial(FIFOScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            return TrialScheduler.STOP if trial.config["members"].get("first") else TrialScheduler.CONTINUE

    tiny = {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32, "batch_size": 4, "warmup_steps": 5}
    base = {
        **tiny,
        "eval_batches": 2,
        "lr": 0.01,
        "steps": 30,
        "report_every": 10,
        "eval_every": 30,
        "checkpoint_every": 0,
        "data_cache": str(tmp_path / "cache"),
        "runner": {"workers": 1, "storage": str(tmp_path / "train")},
    }
    ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env={"env_vars": RAY_TRAIN_ENV})
    try:
        tuner = tune.Tuner(
            tune.with_resources(trial_driver, tune.PlacementGroupFactory([{"node:__internal_head__": 0.001}])),
            param_space={**base, "members": tune.grid_search([{"first": {"seed": 0}}, {"second": {"seed": 1}}])},
            tune_config=tune.TuneConfig(scheduler=StopTheFirstTrial(), max_concurrent_trials=1, time_budget_s=240),
            run_config=tune.RunConfig(
                storage_path=str(tmp_path / "results"), name="freed", callbacks=[PlacementGroupSweep()], verbose=0
            ),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    steps = {next(iter(r.config["members"])): r.metrics["members"] for r in grid}
    assert steps["first"]["first"]["step"] == 10
    assert steps["second"]["second"]["step"] == 30 and steps["second"]["second"]["stop_reason"] == "completed"
    console = "".join(capfd.readouterr())
    assert console.count("tunestab: removed placement group") == 1, console[-3000:]
    assert "(CPU 1)" in console
