"""The benchmarks run: `bench/gpu_check.py` is the one command for a GPU, so its code path is
kept working here, at a toy shape on the CPU."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_the_gpu_check_runs_every_part_at_a_tiny_shape_on_the_cpu():
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--tiny"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    parts = {row[0].strip("| ") for row in rows}
    assert parts == {"a", "b", "c", "d", "e"}
    assert sum(row[0] == "| a" for row in rows) == 8  # every variant trained
    assert all(row[2] in ("ok", "-") for row in rows)
    resumed = next(row for row in rows if row[0] == "| d")
    assert "largest relative difference 0.0e+00" in resumed[3]


def test_collect_runs_tops_up_each_variant_where_its_seeds_disagree_or_else_either_side_of_its_boundary():
    sys.path.insert(0, str(BENCH))
    try:
        import collect_runs
    finally:
        sys.path.remove(str(BENCH))

    def run(variant, lr, seed, diverged):
        return {"settings": {"variant": variant, "lr": lr, "seed": seed, "steps": 600}, "diverged": diverged}

    runs = [run("a", lr, seed, lr > 0.3 or (lr == 0.2 and seed == 1)) for lr in (0.1, 0.2, 0.4) for seed in (0, 1, 2)]
    runs += [run("b", lr, seed, lr > 0.15) for lr in (0.05, 0.1, 0.2, 0.4) for seed in (0, 1, 2)]
    runs += [run("c", lr, seed, False) for lr in (0.1, 0.2) for seed in (0, 2)]  # never diverged: no boundary
    assert collect_runs.boundary_lrs(runs) == {"a": [0.2], "b": [0.1, 0.2], "c": []}
    todo = collect_runs.boundary_top_up(runs, 5)
    assert sorted((s["variant"], s["lr"], s["seed"]) for s in todo) == [
        ("a", 0.2, 3), ("a", 0.2, 4), ("b", 0.1, 3), ("b", 0.1, 4), ("b", 0.2, 3), ("b", 0.2, 4)]
    assert all(s["steps"] == 600 for s in todo)  # the rest of each run's settings kept
    assert not [s for s in collect_runs.boundary_top_up(runs + [run("a", 0.2, s, False) for s in (3, 4)], 5)
                if s["variant"] == "a"]
