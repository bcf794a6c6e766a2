"""The search frees the placement groups of Train runs whose controller died.

A trial's Train run reserves its workers' CPUs or GPUs with a placement group that its
`TrainController` creates, and frees it when the controller shuts down: at the end of every
trial, a TEV stop included (a stopped population returns from its loop like a completed one).
Ray's GCS itself frees a group only once both its creator actor and its creator job are dead, and
the job is the search, alive until it returns. So when a controller dies instead of shutting down
(its trial's actor killed, a node lost), its group outlives the trial and holds its resources for
the rest of the search: the next trial waits for them, and on a small cluster the search stalls
(docs/reliability.md).

Ray Train V2 covers that with a detached `PlacementGroupCleaner` actor per Train run, one more
Python process per trial that imports Ray Train (about 2.6 CPU-s a trial on 2 cores,
docs/overhead.md). The search starts its Train runs without it (ray_trial.trainer_class) and
sweeps instead, once for the whole search: `PlacementGroupSweep` is a Tune callback that every
`interval_s` reads Ray's placement-group table and removes each group of this job that is still
held (not REMOVED, not detached) although the actor that created it is dead. A dead actor does
not come back, so one sighting is enough. Tune's own trial groups are created by the search
itself, not by an actor, and are never touched. Each removal prints one line: it only happens
when a trial's Train run ended abnormally.

Ray's public State API does not say which actor created a group or whether it is dead; the GCS
table does (`PlacementGroupTableData.creator_actor_id`, `creator_actor_dead`). It is read
through the accessor that `ray.util.placement_group_table()` uses (`ray._private.state`), and
parsed here, because that function keeps neither field. tests/test_placement_sweep.py checks
both against a real cluster, so a Ray upgrade that moves them fails there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ray.tune.callback import Callback

# A sweep every second, as often as Train's own cleaner checked: a group is freed within about a
# second of its controller's death. Reading the table is one GCS call: 0.2 ms empty, 5.6 ms once
# 300 groups were made and removed (Ray keeps removed ones in it; measured 2026-12-07, 2 cores).
INTERVAL_S = 1.0
# After the last trial, how long the final sweep waits for the Train runs still ending to free
# their groups or die.
SETTLE_S = 5.0


@dataclass(frozen=True)
class Group:
    """One row of Ray's placement-group table, the fields a sweep decides by."""

    id: str  # hex
    state: str  # PENDING, PREPARED, CREATED, REMOVED or RESCHEDULING
    job: str  # the creator job's id, hex
    creator_actor: str  # hex; empty when a driver, not an actor, created the group
    creator_actor_dead: bool
    detached: bool
    bundles: tuple[dict, ...]


def orphans(groups: Iterable[Group], job: str) -> set[str]:
    """The groups of `job` held by no live creator: not removed, not detached, made by an actor
    that is dead."""
    return {
        g.id
        for g in groups
        if g.job == job and not g.detached and g.state != "REMOVED" and g.creator_actor and g.creator_actor_dead
    }


def held_by_actors(groups: Iterable[Group], job: str) -> set[str]:
    """The groups of `job` still held that an actor created, dead or alive: Train worker groups."""
    return {g.id for g in groups if g.job == job and not g.detached and g.state != "REMOVED" and g.creator_actor}


def total(bundles: Iterable[dict]) -> dict[str, float]:
    """What a group's bundles hold in all: resource -> amount."""
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            need[key] = need.get(key, 0.0) + value
    return need


def describe(bundles: Iterable[dict]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(total(bundles).items())) or "no resources"


def read_table() -> list[Group]:
    """Ray's placement-group table for the connected cluster (see the module doc)."""
    import ray
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData

    rows = [
        PlacementGroupTableData.FromString(raw) for raw in state._connect_and_get_accessor().get_placement_group_table()
    ]
    return [
        Group(
            id=r.placement_group_id.hex(),
            state=PlacementGroupTableData.PlacementGroupState.Name(r.state),
            job=r.creator_job_id.hex(),
            # Ray's nil id (all 0xff) when a driver, not an actor, created the group.
            creator_actor="" if ray.ActorID(r.creator_actor_id).is_nil() else r.creator_actor_id.hex(),
            creator_actor_dead=r.creator_actor_dead,
            detached=r.is_detached,
            bundles=tuple(dict(b.unit_resources) for b in r.bundles),
        )
        for r in rows
    ]


def remove(group_id: str) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup

    ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def current_job() -> str:
    import ray

    return ray.get_runtime_context().get_job_id()


class PlacementGroupSweep(Callback):
    """A Tune callback: removes this job's orphaned placement groups (module doc) once an
    interval, and prints one line for each."""

    def __init__(self, interval_s: float = INTERVAL_S, settle_s: float = SETTLE_S):
        self.interval_s, self.settle_s = interval_s, settle_s
        self.removed: list[str] = []  # every group this search removed, for the soak and the tests
        # time.monotonic() of the last sweep. Not 0.0: monotonic counts from the machine's boot,
        # so on a machine up for less than an interval the first sweep would wait (seen in CI
        # minutes after a restart).
        self._last = -math.inf
        # Where the table comes from and how a group is removed: Ray's by default, replaced in
        # the unit tests.
        self.read: Callable[[], list[Group]] = read_table
        self.remove: Callable[[str], None] = remove
        self.job: Callable[[], str] = current_job

    def sweep(self) -> list[Group]:
        """One sweep: remove every orphan; returns the table it read."""
        groups = self.read()
        gone = sorted(orphans(groups, self.job()))
        by_id = {g.id: g for g in groups}
        for gid in gone:
            self.remove(gid)
            print(
                f"tunestab: removed placement group {gid} ({describe(by_id[gid].bundles)}): the Train "
                "controller that held it ended without freeing it",
                flush=True,
            )
        self.removed += gone
        return [g for g in groups if g.id not in gone]

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            self.sweep()

    def on_experiment_end(self, trials: list, **info) -> None:
        # The last trials' Train runs may still be ending: sweep until none holds a group or
        # `settle_s` has passed.
        deadline = time.monotonic() + self.settle_s
        while held_by_actors(self.sweep(), self.job()) and time.monotonic() < deadline:
            time.sleep(0.2)
