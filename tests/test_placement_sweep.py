"""The search removes placement groups whose creator actor is dead and that Ray Train did not
free, after two sightings, and nothing else (tunestab/placement_sweep.py)."""

import sys
import time

import pytest

from tunestab.placement_sweep import Group, PlacementGroupSweep, orphans

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


def test_a_group_is_removed_on_its_second_sighting_and_only_then(capsys):
    table = [group("g1"), group("live", dead=False)]
    removed = []
    sweep = PlacementGroupSweep(interval_s=0.0)
    sweep.read, sweep.remove, sweep.job = (lambda: list(table)), removed.append, (lambda: JOB)
    assert sweep.sweep() == [] and removed == []  # first sighting: Train's cleaner may be on it
    table.append(group("g2"))
    assert sweep.sweep() == ["g1"] and removed == ["g1"]
    table[:] = [g for g in table if g.id != "g1"]
    # g2 was freed by Train between sweeps: nothing to do, and no stale suspect is kept.
    table[:] = [g for g in table if g.id != "g2"]
    assert sweep.sweep() == [] and sweep.suspects == set()
    out = capsys.readouterr().out
    assert out.count("tunestab: removed placement group") == 1 and "g1 (CPU 1)" in out
    assert sweep.removed == ["g1"]


def test_the_sweep_runs_once_an_interval_from_tunes_loop():
    reads = []
    sweep = PlacementGroupSweep(interval_s=3600.0)
    sweep.read, sweep.remove, sweep.job = (lambda: reads.append(1) or []), (lambda gid: None), (lambda: JOB)
    for i in range(5):
        sweep.on_step_begin(i, [])
    assert len(reads) == 1


@pytest.mark.slow
def test_on_a_real_cluster_it_removes_a_dead_actors_group_and_keeps_the_others():
    """An actor creates a group and is killed without removing it: the group stays CREATED,
    holding its CPU, as a leaked Train worker group would. The sweep removes it on its second
    sighting; a live actor's group, a detached group and the driver's own group stay."""
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
        assert sweep.sweep() == []
        assert sweep.suspects == {leaked}
        assert sweep.sweep() == [leaked]

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
