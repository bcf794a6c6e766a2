"""The same search under two or more commits, alternated, in one run: what a change to the search
costs or saves in wall time and in the CPU all its processes use.

    python bench/commits_ab.py 524ef59 HEAD                       # docs/results/stops.yaml, 2 rounds
    python bench/commits_ab.py --space docs/results/legacy/default.yaml --rounds 1 A B C

Each commit is cloned from this repository into a temporary folder, and `bench/search_overhead.py`
(of that commit) runs the space there, with that clone first on PYTHONPATH so that Ray's workers
import its code, in rounds A B A B ...: the machine's drift over the run falls on every commit
alike. Per run it prints the search's wall time and the CPU seconds per trial of all the
processes the search started (search_overhead's CpuSampler); at the end each commit's medians
and their ratio to the first commit's. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WALL = re.compile(r"search wall time ([\d.]+) s")
CPU = re.compile(r"^\| all processes \| \d+ \| [\d.]+ \| ([\d.]+) \|$", re.M)


def clone(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", "--shared", str(REPO), str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "-q", rev], check=True)
    return into


def run_once(code: Path, space: Path, storage: Path) -> tuple[float, float]:
    """(wall s, CPU s a trial) of one search_overhead run of `space` with `code`."""
    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(
        [sys.executable, "bench/search_overhead.py", "--space", str(space), "--storage", str(storage)],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
    )
    text = out.stdout + out.stderr
    wall, cpu = WALL.search(text), CPU.search(text)
    if out.returncode != 0 or not wall or not cpu:
        raise SystemExit(f"commit at {code}: search_overhead failed (exit {out.returncode}):\n{text[-3000:]}")
    return float(wall.group(1)), float(cpu.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("revs", nargs="+", help="commits to compare (the first is the reference)")
    ap.add_argument("--space", default="docs/results/stops.yaml", help="search space (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each commit, alternated (default: %(default)s)")
    args = ap.parse_args()
    if len(args.revs) < 2:
        ap.error("give two commits or more")
    space = Path(args.space).resolve()
    if not space.is_file():
        ap.error(f"--space {args.space}: no such file")
    names = [
        subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", r], check=True, capture_output=True, text=True
        ).stdout.strip()
        for r in args.revs
    ]

    work = Path(tempfile.mkdtemp(prefix="commits_ab-"))
    try:
        codes = [clone(rev, work / f"code{i}") for i, rev in enumerate(args.revs)]
        runs: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(codes))}
        print(f"space {args.space}; {args.rounds} round(s) of {', '.join(names)}")
        print("| round | commit | wall s | CPU s a trial |\n|---|---|---|---|", flush=True)
        for r in range(args.rounds):
            for i, code in enumerate(codes):
                wall, cpu = run_once(code, space, work / f"runs{i}-{r}")
                runs[i].append((wall, cpu))
                print(f"| {r + 1} | {names[i]} | {wall:.1f} | {cpu:.2f} |", flush=True)
        ref_wall = statistics.median(w for w, _ in runs[0])
        ref_cpu = statistics.median(c for _, c in runs[0])
        print(
            "\n| commit | median wall s | median CPU s a trial | wall / first's | CPU / first's |\n|---|---|---|---|---|"
        )
        for i, name in enumerate(names):
            wall = statistics.median(w for w, _ in runs[i])
            cpu = statistics.median(c for _, c in runs[i])
            print(f"| {name} | {wall:.1f} | {cpu:.2f} | {wall / ref_wall:.3f} | {cpu / ref_cpu:.3f} |")
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
