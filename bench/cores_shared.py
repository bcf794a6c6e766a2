"""How fast a member trains alone, two at once, and inside a search that ran: where a search's
time per member-step goes on a small machine.

    python bench/cores_shared.py --space rybakov_cpu --run-dir RUN_FOLDER

A search on 2 cores runs two Ray Train workers of one torch thread each. This times one member of
the space's trial (its first variant, one torch thread, the product's `train_step` on a fixed
batch, as bench/throughput.py does) in a fresh process alone, then as two such processes at once,
alternated for `--rounds` so that both see the same machine. With `--run-dir` (a search already
run) it also prints the loop's own seconds per member-step inside that search: every trial's
`loop_s` (Tune's result.json) summed, over the steps its members trained (trials.csv). That figure
holds everything a population's loop does besides the step (probes, evaluation, checkpoints,
switching between members) and the machine shared with Ray's processes; the ratios say how much of
the slowdown two processes sharing the cores explain, and how much is left.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def seconds_per_step(space: str, steps: int, warmup: int, start, out) -> None:
    """In a fresh process: build the space's first variant, step it `warmup` times, wait for the
    others at `start`, then time `steps` steps and put the seconds per step on `out`."""
    import torch
    from throughput import Stepper

    from tunestab import spec
    from tunestab.loop import model_config

    torch.set_num_threads(1)  # a Train worker with cpus_per_worker 1 (tunestab/session.py)
    s = spec.load(space)
    cfg = model_config(s.trial_config(s.variants[0]))  # the vocabulary of the space's tokenizer
    st = Stepper.build(s.variants[0], cfg, torch.device("cpu"))
    st.run(warmup)
    start.wait(600)  # a sibling that failed before it breaks the barrier instead of hanging this one
    out.put(st.run(steps) / steps)


def at_once(space: str, n: int, steps: int, warmup: int) -> list[float]:
    """Seconds per step of each of `n` processes timed together."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=seconds_per_step, args=(space, steps, warmup, start, out)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit("a timing process failed (its traceback is above)")
    return [out.get() for _ in procs]


def in_search(run_dir: Path) -> tuple[float, int, int]:
    """(loop seconds per member-step, member-steps, trials) of a search's run folder."""
    import pandas as pd

    from tunestab import run_dir as rd
    from tunestab.members import reports

    steps = int(pd.read_csv(run_dir / rd.TRIALS_CSV)["step"].sum())
    trials = [rows for path in (run_dir / rd.TUNE_DIR).glob("*/*/result.json") if (rows := reports(path.parent))]
    return sum(float(rows[-1]["loop_s"]) for rows in trials) / steps, steps, len(trials)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="rybakov_cpu", help="whose trial to time (default: %(default)s)")
    ap.add_argument("--run-dir", help="a run folder of that space's search, for its in-search figure")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per process per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    alone, pair = [], []
    for _ in range(args.rounds):
        alone += at_once(args.space, 1, args.steps, args.warmup)
        pair += at_once(args.space, 2, args.steps, args.warmup)
    a, p = statistics.median(alone), statistics.median(pair)
    print(f"space {args.space}; {args.rounds} rounds x {args.steps} steps; one torch thread a process; medians")
    print("| how | s a member-step | / alone |")
    print("|---|---|---|")
    print(f"| one process alone | {a:.4f} | 1.00 |")
    print(f"| two processes at once | {p:.4f} | {p / a:.2f} |")
    if args.run_dir:
        s, steps, trials = in_search(Path(args.run_dir))
        print(f"| inside the search ({steps} member-steps, {trials} trials: loop_s / steps) | {s:.4f} | {s / a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
