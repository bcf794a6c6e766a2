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
