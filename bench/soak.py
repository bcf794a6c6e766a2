"""Does a long unattended search leave anything behind? (issue 31)

    python bench/soak.py [--trials 300] [--stress 1] [--no-sweep]

Runs one search through the product (`tunestab.search.main`, in this process) of `--trials`
short trials that the TEV scheduler all stops at their first report (a rule every trial meets),
one member a trial, so that as many Train runs start and end in a row. While it runs, a thread
asks the State API once a second for placement groups PENDING while the cluster's free resources
could hold them (a stall, not a slow start). `--stress N` keeps N busy processes on the cores the
whole time: the leak seen once in CI came on a loaded machine.

Prints, from that one run:
- trials run, how they ended, and the wall time;
- the placement groups the search's sweep removed (tunestab/placement_sweep.py): each one a
  group Ray Train left behind, which before the sweep held its resources to the search's end;
- what was left 20 s after the search returned: trial actors alive and placement groups not
  REMOVED (Train's detached cleaner gets those seconds to exit);
- the longest any placement group waited with room for it.
`--no-sweep` runs the search without the sweep, to see what Ray alone leaves.
Exit status 1 when anything was left or a group waited over 30 s with room for it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tunestab import placement_sweep, search  # noqa: E402

# The 100-stop reliability test's trial: tiny, so that Ray's start and stop are the whole cost.
TRIAL = {
    "n_layer": 2,
    "n_head": 2,
    "d_model": 32,
    "seq_len": 32,
    "batch_size": 4,
    "warmup_steps": 5,
    "eval_batches": 2,
    "lr": 0.01,
    "steps": 1000,
    "report_every": 10,
    "eval_every": 1000,
    "checkpoint_every": 0,
}
# The processes a trial starts; none may outlive the search.
TRIAL_ACTORS = (
    "ImplicitFunc",
    "TrainController",
    "RayTrainWorker",
    "SynchronizationActor",
    "_QueueActor",
)


def stop_storm_space(trials: int) -> dict:
    """A sweep of `trials` seeds, each stopped by the TEV scheduler at its first report."""
    return {
        "name": "soak",
        "strategy": "sweep",
        "variants": ["baseline"],
        "trial": TRIAL,
        "params": {"seed": {"grid": list(range(trials))}},
        "scheduler": {"type": "tev", "rule": {"signal": "dispersion", "threshold": 1e-9, "min_step": 0}},
        "resources": {"population": 1},
    }


class PendingWatch(threading.Thread):
    """Polls the State API once a second while a search runs and records how long any placement
    group stayed PENDING while the cluster's free resources could hold it: a deadlock, not a slow
    start (a busy machine slows processes, not the logical resources Ray schedules by)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.polls, self.longest, self.stuck = False, 0, 0.0, {}

    def run(self):
        import ray
        from ray.util.state import list_placement_groups

        since: dict[str, float] = {}
        while not self.stop:
            time.sleep(1)
            if not ray.is_initialized():
                continue
            try:
                free = ray.available_resources()
                pending = list_placement_groups(
                    address=ray.get_runtime_context().gcs_address,
                    filters=[("state", "=", "PENDING")],
                    detail=True,
                    raise_on_missing_output=False,
                )
            except Exception:  # the cluster starting or stopping
                continue
            self.polls += 1
            now, waiting = time.time(), set()
            for g in pending:
                need = placement_sweep.total(b["unit_resources"] for b in g.bundles)
                if all(free.get(k, 0.0) >= v for k, v in need.items()):
                    waiting.add(g.placement_group_id)
                    since.setdefault(g.placement_group_id, now)
                    self.longest = max(self.longest, now - since[g.placement_group_id])
                    self.stuck[g.placement_group_id] = round(now - since[g.placement_group_id])
            since = {k: v for k, v in since.items() if k in waiting}


def left_behind() -> tuple[list[str], list[dict]]:
    """Trial actors alive, and placement groups not REMOVED (each with its bundles: Tune's trial
    group holds `node:__internal_head__`, a Train worker group `CPU`)."""
    import ray
    from ray.util.state import list_actors, list_placement_groups

    # This search's cluster, whatever other Ray instance runs on the machine.
    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10000, raise_on_missing_output=False)
    groups = list_placement_groups(address=address, limit=10000, detail=True, raise_on_missing_output=False)
    return (
        [a.class_name for a in actors if a.class_name in TRIAL_ACTORS],
        [{"id": g.placement_group_id, "state": g.state, "bundles": g.bundles} for g in groups if g.state != "REMOVED"],
    )


def settle(seconds: float = 20.0) -> tuple[list[str], list[dict], float]:
    """What is left once the last trial's cleaner has had `seconds` to exit."""
    returned = time.time()
    while (left := left_behind()) != ([], []) and time.time() - returned < seconds:
        time.sleep(1)
    return (*left, time.time() - returned)


def spin() -> None:
    while True:
        pass


def patch_sweep(off: bool) -> list[str]:
    """Patches the search's sweep (every PlacementGroupSweep) for this process: with `off`, a sweep
    that never removes anything; otherwise the real sweep, counted. Returns the list that collects
    the ids of the groups it removes."""
    removed: list[str] = []
    sweep = placement_sweep.PlacementGroupSweep.sweep
    if off:
        placement_sweep.PlacementGroupSweep.sweep = lambda self: []
        return removed

    def counted(self):
        # sweep() returns the table it read; what it removed is appended to self.removed.
        before = len(self.removed)
        table = sweep(self)
        removed.extend(self.removed[before:])
        return table

    placement_sweep.PlacementGroupSweep.sweep = counted
    return removed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--stress", type=int, default=0, help="busy processes kept on the cores meanwhile")
    ap.add_argument("--no-sweep", action="store_true", help="run without the search's placement-group sweep")
    args = ap.parse_args()

    import pandas as pd
    import ray

    removed = patch_sweep(args.no_sweep)

    stress = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.stress)]
    for p in stress:
        p.start()
    watch = PendingWatch()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            space = Path(tmp) / "soak.yaml"
            space.write_text(yaml.safe_dump(stop_storm_space(args.trials)))
            storage = Path(tmp) / "results"
            watch.start()
            started = time.time()
            status = search.main(["--space", str(space), "--storage", str(storage)])
            wall = time.time() - started
            watch.stop = True
            actors, groups, waited = settle()
            table = pd.read_csv(next(storage.glob("soak-*")) / "trials.csv")
    finally:
        for p in stress:
            p.kill()
        ray.shutdown()

    print(f"\nsoak: {len(table)} trials ({args.trials} asked), search exit {status}, {wall:.0f} s wall")
    print(f"  stop reasons: {table.stop_reason.value_counts().to_dict()}; steps {sorted(set(table.step))}")
    print(f"  sweep: {'off' if args.no_sweep else 'on'}; placement groups it removed: {len(removed)} {removed}")
    print(f"  left {waited:.0f} s after the search: trial actors {actors}; placement groups {groups}")
    print(f"  longest a placement group was pending with room for it: {watch.longest:.0f} s ({watch.polls} polls)")
    clean = status == 0 and not actors and not groups and watch.longest < 30 and len(table) == args.trials
    print(f"  {'clean' if clean else 'NOT CLEAN'}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
