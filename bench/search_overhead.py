"""How much of a search's wall time is its trials' own training? (issue 17)

    python bench/search_overhead.py                      # docs/results/legacy/default.yaml: 12 trials, 2 at a time
    python bench/search_overhead.py --space default

Runs one search through the product (`tunestab.search.main`, in this process, so that the Ray
session is still up afterwards to be asked what it started) and prints, all from that one run:
- wall: the search's wall time, from the command's start to its printed table (Ray's start-up,
  every trial, the report);
- own: the sum over trials of `loop_s` at their last report (data, model, steps, evaluations and
  checkpoints inside the Train worker: what the trials cost without Ray), divided by the number
  of trials run at once;
- per trial, Tune's time to the trial's first report against the loop's own time then: what
  starting the trial's TorchTrainer cost;
- the actors Ray started, per class: how many, and the mean seconds to start their process and to
  run their constructor (Ray's task events);
- alone: every trial's every member run again after the search, one at a time in this process
  without Ray (`tunestab.loop.run`, the same configuration and seed, to the step it reached, on as
  many torch threads as its worker had CPUs), divided by the number of trials run at once. `loop_s` inside
  the search is inflated by whatever else ran on the cores meanwhile (other trials' start-up);
  this is what the trials cost on their own;
- the CPU seconds every process used while the search ran, summed by what the process is (Ray
  names its actor processes `ray::<class>`), per trial, and the machine's CPU use: on a machine
  the search keeps busy, wall >= CPU used / cores, so `CPU used / trials alone` bounds from below
  the ratio any scheduling of these trials could reach on this many cores;
- last line: `overhead ratio X` = wall / alone. Goal (issue 17): X <= 1.5 on the default space,
  today's default.yaml at e9022ee kept as docs/results/legacy/default.yaml.

    python bench/search_overhead.py --run-dir RUN_DIR    # the figures of a search already run (its
                                                          # wall time from Tune's start; no actor table)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tunestab import run_dir as rd  # noqa: E402
from tunestab import search  # noqa: E402
from tunestab import spec as spec_mod  # noqa: E402
from tunestab.replay import reports  # noqa: E402

DEFAULT_SPACE = "docs/results/legacy/default.yaml"


def trial_results(run_dir: Path) -> list[list[dict]]:
    """Every trial's reports, in order, from Tune's own result files (as replay reads them)."""
    return [rows for path in sorted((run_dir / "tune").glob("*/*/result.json")) if (rows := reports(path.parent))]


def alone_seconds(rows: list[dict]) -> float:
    """One trial's models again, each alone, without Ray, one process: the seconds from entering
    the loop to its end, summed over the trial's population (tunestab/members.py)."""
    from tunestab.members import MEMBERS, member_configs

    config = dict(rows[-1]["config"])
    runner = config.pop("runner", {}) or {}
    if MEMBERS not in config:  # a trial of one model (a search from before populations)
        return lone_seconds(config, int(rows[-1]["step"]), runner)
    finals = rows[-1].get(MEMBERS) or {}
    return sum(
        lone_seconds(c, int(finals[mid]["step"]), runner) for mid, c in member_configs(config).items() if mid in finals
    )


def lone_seconds(config: dict, steps: int, runner: dict) -> float:
    """One model, alone, to the step it reached (a stopped one: as far as it went)."""
    import dataclasses
    import io

    import torch

    from tunestab.config import config_from
    from tunestab.loop import run
    from tunestab.outcome import SIZE
    from tunestab.session import LocalSession

    cfg = config_from({k: v for k, v in config.items() if k != SIZE}, "trial config")
    cfg = dataclasses.replace(
        cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps), eval_every=min(cfg.eval_every, steps)
    )
    torch.set_num_threads(max(1, int(runner.get("cpus_per_worker", 1))))
    with tempfile.TemporaryDirectory(prefix="tunestab-alone-") as tmp:
        began = time.perf_counter()
        run(cfg, LocalSession(checkpoint_dir=tmp, out=io.StringIO()))
        return time.perf_counter() - began


def actor_starts() -> dict[str, list[tuple[float, float]]]:
    """Actor class -> [(seconds from scheduling to its constructor running, constructor seconds)]
    for every actor the Ray session started, from Ray's task events."""
    import ray
    from ray.util.state import list_tasks

    tasks = list_tasks(
        address=ray.get_runtime_context().gcs_address,
        detail=True,
        limit=10_000,
        filters=[("type", "=", "ACTOR_CREATION_TASK")],
        raise_on_missing_output=False,
    )
    out = defaultdict(list)
    for t in tasks:
        at = {e["state"]: e["created_ms"] / 1000 for e in (t.events or [])}
        if {"RUNNING", "FINISHED"} <= at.keys():
            queued = at.get("PENDING_NODE_ASSIGNMENT", at["RUNNING"])
            out[t.name.removesuffix(".__init__").split(":")[-1]].append(
                (at["RUNNING"] - queued, at["FINISHED"] - at["RUNNING"])
            )
    return dict(out)


class CpuSampler(threading.Thread):
    """The CPU time (user + system, from /proc) of this process and every process it starts, and
    theirs (Ray's GCS, raylet, agents and workers), sampled every `every_s` seconds until stopped,
    keyed by process so that one that exits between samples keeps its last reading. A process
    that lives less than one interval is missed: Ray's are seconds long. Other work on the machine
    is not counted, but it shows in `busy()`."""

    def __init__(self, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.every_s, self.done = every_s, threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.before: dict[tuple[str, str], float] = {}  # CPU time already used when sampling began
        self.seen: dict[tuple[str, str], tuple[float, str]] = {}  # (pid, start time) -> (CPU s, title)
        self.parent: dict[tuple[str, str], str] = {}

    def sample(self, first: bool = False) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{pid}/cmdline") as f:
                    title = f.read().replace("\0", " ").strip()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            key, cpu = (pid, fields[19]), (int(fields[11]) + int(fields[12])) / self.tick
            self.parent[key] = fields[1]
            if first:
                self.before[key] = cpu
            # A Ray worker is titled `ray::IDLE` until it takes an actor: keep the actor's name.
            old = self.seen.get(key, (0.0, ""))[1]
            self.seen[key] = (cpu, title if title and not (old and title.startswith("ray::IDLE")) else old)

    @staticmethod
    def machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    def run(self) -> None:
        self.start_machine = self.machine()
        self.sample(first=True)
        while not self.done.wait(self.every_s):
            self.sample()
        self.sample()
        self.end_machine = self.machine()
        self.own = time.thread_time()  # the sampling itself, taken out of this process's share

    def stop(self) -> dict[str, tuple[int, float]]:
        """Stop sampling; what -> (processes, CPU seconds used since sampling began)."""
        self.done.set()
        self.join()
        ours = {str(os.getpid())}
        while True:  # this process's descendants, living or gone
            more = {pid for (pid, _), ppid in self.parent.items() if ppid in ours} - ours
            if not more:
                break
            ours |= more
        out: dict[str, list] = defaultdict(lambda: [0, 0.0])
        for key, (cpu, title) in self.seen.items():
            if key[0] not in ours:
                continue
            used = cpu - self.before.get(key, 0.0) - (self.own if key[0] == str(os.getpid()) else 0.0)
            if used <= 0:
                continue
            word = title.split()[0] if title else "?"
            what = word.split(".")[0] if word.startswith("ray::") else os.path.basename(word) or "?"
            if what.startswith("python"):  # the driver, Ray's agents: name the script or module
                what = " ".join(os.path.basename(w) for w in title.split()[:3])
            out[what][0] += 1
            out[what][1] += used
        return {k: (n, s) for k, (n, s) in out.items()}

    def busy(self) -> float:
        """The machine's CPU use while sampling, as a fraction of all its cores."""
        (all0, idle0), (all1, idle1) = self.start_machine, self.end_machine
        return 1 - (idle1 - idle0) / max(all1 - all0, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default=DEFAULT_SPACE, help="search space (default: %(default)s)")
    ap.add_argument("--storage", help="keep the results here (default: a temporary folder)")
    ap.add_argument("--max-concurrent", type=int, help="trials at once (default: the space's)")
    ap.add_argument("--run-dir", help="a search already run: its figures, without running it again")
    args = ap.parse_args()
    if args.run_dir:
        run_dir = Path(args.run_dir)
        space = spec_mod.load(str(run_dir / rd.SPACE_COPY))
    else:
        space = spec_mod.load(args.space)
    concurrency = args.max_concurrent or space.resources.max_concurrent
    if not concurrency:
        print(
            f"{space.source}: resources.max_concurrent is not set; give --max-concurrent N, the trials at once "
            f"(the ratio divides by it)",
            file=sys.stderr,
        )
        return 2
    actors = {}
    if not args.run_dir:
        storage = Path(args.storage or tempfile.mkdtemp(prefix="tunestab-overhead-"))
        argv = ["--space", args.space, "--storage", str(storage)]
        if args.max_concurrent:
            argv += ["--max-concurrent", str(args.max_concurrent)]
        cpu = CpuSampler()
        cpu.start()
        began = time.perf_counter()
        rc = search.main(argv)
        wall = time.perf_counter() - began
        used = cpu.stop()
        if rc != 0:
            print(f"the search failed (exit code {rc})", file=sys.stderr)
            return rc
        import ray

        try:
            actors = actor_starts()
        finally:
            ray.shutdown()
        run_dir = rd.newest(storage, space.name)
    trials = trial_results(run_dir)
    if args.run_dir:
        # Tune's start to the last report: without Ray's start-up and the final report, a little
        # less than the command's wall time.
        state = json.loads(next((run_dir / "tune").glob("*/experiment_state-*.json")).read_text())
        wall = max(rows[-1]["timestamp"] for rows in trials) - state["stats"]["start_time"]
    own = sum(rows[-1]["loop_s"] for rows in trials)
    first = [(rows[0]["time_total_s"], rows[0]["loop_s"]) for rows in trials]
    print(f"\nsearch {space.name!r}: {len(trials)} trials, {concurrency} at a time; results in {run_dir}")
    print("running each trial again alone, without Ray ...", flush=True)
    alone = sum(alone_seconds(rows) for rows in trials)

    if actors:
        print("\n| actor class | started | mean s to start its process | mean s in its constructor |")
        print("|---|---|---|---|")
        for name, times in sorted(actors.items(), key=lambda kv: -len(kv[1])):
            print(
                f"| {name} | {len(times)} | {statistics.mean(t for t, _ in times):.2f} | "
                f"{statistics.mean(c for _, c in times):.2f} |"
            )
    if not args.run_dir:
        cpu_total = sum(s for _, s in used.values())
        print("\n| process | count | CPU s | CPU s per trial |\n|---|---|---|---|")
        for name, (n, s) in sorted(used.items(), key=lambda kv: -kv[1][1]):
            if s >= 0.01 * cpu_total:
                print(f"| {name} | {n} | {s:.1f} | {s / len(trials):.2f} |")
        print(
            f"| all processes | {sum(n for n, _ in used.values())} | {cpu_total:.1f} | {cpu_total / len(trials):.2f} |"
        )
        cores = os.cpu_count() or 1
        print(
            f"\nCPU: the machine was {cpu.busy():.0%} busy over the search ({cores} cores); the search's processes "
            f"used {cpu_total:.1f} CPU s, the trials alone {alone:.1f}; so on {cores} cores no scheduling of these trials "
            f"gets the ratio below {cpu_total / cores / (alone / concurrency):.2f} (CPU used / {cores} against trials "
            f"alone / {concurrency})"
        )
    startup = [total - loop for total, loop in first]
    print(
        f"\nper trial: first report {statistics.mean(t for t, _ in first):.1f} s after Tune started the trial "
        f"(median {statistics.median(t for t, _ in first):.1f}), of which the loop's own "
        f"{statistics.mean(loop for _, loop in first):.1f} s; TorchTrainer start-up before the loop "
        f"{statistics.mean(startup):.1f} s (median {statistics.median(startup):.1f})"
    )
    print(
        f"per trial: the loop's own time {own / len(trials):.1f} s inside the search, {alone / len(trials):.1f} s "
        f"alone without Ray (means over {len(trials)} trials)"
    )
    print(
        f"\nsearch wall time {wall:.1f} s; trials' loop time inside the search {own:.1f} s / {concurrency} at a "
        f"time = {own / concurrency:.1f} s (ratio {wall / (own / concurrency):.2f})"
    )
    print(f"trials alone without Ray {alone:.1f} s / {concurrency} at a time = {alone / concurrency:.1f} s")
    print(f"overhead ratio {wall / (alone / concurrency):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
