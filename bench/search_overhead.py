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
- last line: `overhead ratio X` = wall / own. Goal (issue 17): X <= 1.5 on the default space,
  today's default.yaml at e9022ee kept as docs/results/legacy/default.yaml.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tunestab import search  # noqa: E402
from tunestab import spec as spec_mod  # noqa: E402

DEFAULT_SPACE = "docs/results/legacy/default.yaml"


def trial_results(run_dir: Path) -> list[list[dict]]:
    """Every trial's reports, in order, from Tune's own result files."""
    out = []
    for path in sorted((run_dir / "tune").glob("*/*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out.append(rows)
    return out


def actor_starts() -> dict[str, list[tuple[float, float]]]:
    """Actor class -> [(seconds from scheduling to its constructor running, constructor seconds)]
    for every actor the Ray session started, from Ray's task events."""
    import ray
    from ray.util.state import list_tasks

    tasks = list_tasks(address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000,
                       filters=[("type", "=", "ACTOR_CREATION_TASK")], raise_on_missing_output=False)
    out = defaultdict(list)
    for t in tasks:
        at = {e["state"]: e["created_ms"] / 1000 for e in (t.events or [])}
        if {"RUNNING", "FINISHED"} <= at.keys():
            queued = at.get("PENDING_NODE_ASSIGNMENT", at["RUNNING"])
            out[t.name.removesuffix(".__init__").split(":")[-1]].append((at["RUNNING"] - queued,
                                                                       at["FINISHED"] - at["RUNNING"]))
    return dict(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default=DEFAULT_SPACE, help="search space (default: %(default)s)")
    ap.add_argument("--storage", help="keep the results here (default: a temporary folder)")
    ap.add_argument("--max-concurrent", type=int, help="trials at once (default: the space's)")
    args = ap.parse_args()
    space = spec_mod.load(args.space)
    concurrency = args.max_concurrent or space.resources.max_concurrent
    storage = Path(args.storage or tempfile.mkdtemp(prefix="tunestab-overhead-"))
    argv = ["--space", args.space, "--storage", str(storage)]
    if args.max_concurrent:
        argv += ["--max-concurrent", str(args.max_concurrent)]

    began = time.perf_counter()
    rc = search.main(argv)
    wall = time.perf_counter() - began
    if rc != 0:
        print(f"the search failed (exit code {rc})", file=sys.stderr)
        return rc
    import ray

    try:
        actors = actor_starts()
    finally:
        ray.shutdown()
    run_dir = search.newest_run_dir(storage, space.name)
    trials = trial_results(run_dir)
    own = sum(rows[-1]["loop_s"] for rows in trials)
    first = [(rows[0]["time_total_s"], rows[0]["loop_s"]) for rows in trials]

    print(f"\nsearch {space.name!r} from {args.space}: {len(trials)} trials, {concurrency} at a time; results in {run_dir}")
    print("\n| actor class | started | mean s to start its process | mean s in its constructor |")
    print("|---|---|---|---|")
    for name, times in sorted(actors.items(), key=lambda kv: -len(kv[1])):
        print(f"| {name} | {len(times)} | {statistics.mean(t for t, _ in times):.2f} | "
              f"{statistics.mean(c for _, c in times):.2f} |")
    startup = [total - loop for total, loop in first]
    print(f"\nper trial: first report {statistics.mean(t for t, _ in first):.1f} s after Tune started the trial "
          f"(median {statistics.median(t for t, _ in first):.1f}), of which the loop's own "
          f"{statistics.mean(loop for _, loop in first):.1f} s; TorchTrainer start-up before the loop "
          f"{statistics.mean(startup):.1f} s (median {statistics.median(startup):.1f})")
    print(f"per trial: the loop's own time {own / len(trials):.1f} s in all (mean over {len(trials)} trials)")
    print(f"\nsearch wall time {wall:.1f} s; trials' own time {own:.1f} s / {concurrency} at a time = "
          f"{own / concurrency:.1f} s")
    print(f"overhead ratio {wall / (own / concurrency):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
