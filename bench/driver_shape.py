"""The driver's shape at two revisions, side by side: lines per driver module and the longest
function, strategy branches outside tunestab/strategies/, and what `--dry-run` imports and how
long it takes (the median of 5 fresh processes each).

    python bench/driver_shape.py e4ceea3 HEAD

Each revision is checked out into a temporary git worktree and imported from there.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import test_layers  # noqa: E402  (the one definition of a strategy branch and of the worker)
from test_layers import strategy_branches  # noqa: E402

# The worker's modules (test_layers.WORKER), with the old name of ray_trial and the package file.
WORKER = test_layers.WORKER | {"trainer", "__init__"}
HEAVY = ("torch", "ray", "optuna", "mlflow", "pandas", "matplotlib")


def longest_function(tree: ast.Module) -> tuple[int, str]:
    fns = [
        (n.end_lineno - n.lineno + 1, n.name)
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    return max(fns, default=(0, "-"))


def shape(root: Path, storage: str) -> dict:
    modules = {str(p.relative_to(root / "tunestab").with_suffix("")): p for p in (root / "tunestab").rglob("*.py")}
    driver = {m: p for m, p in modules.items() if m.split("/")[-1] not in WORKER or "/" in m}
    lines = {m: len(p.read_text().splitlines()) for m, p in sorted(driver.items())}
    trees = {m: ast.parse(p.read_text()) for m, p in modules.items()}
    branches = sum(len(strategy_branches(t)) for m, t in trees.items() if not m.startswith("strategies"))
    longest = max((longest_function(t) + (m,) for m, t in trees.items() if m in driver))
    code = (
        "import sys, time; t = time.perf_counter(); from tunestab import search; "
        f"search.main(['--dry-run', '--storage', {storage!r}]); dt = time.perf_counter() - t; "
        f"print(dt, sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    runs = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        )
        last = out.stdout.strip().splitlines()[-1]
        seconds, loaded = last.split(" ", 1)
        runs.append(float(seconds))
    return {
        "lines": lines,
        "total": sum(lines.values()),
        "longest": longest,
        "branches": branches,
        "dry_run_s": statistics.median(runs),
        "dry_run_loads": loaded,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revisions", nargs=2)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rev in args.revisions:
            tree = Path(tmp) / rev
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True, capture_output=True
            )
            try:
                results[rev] = shape(tree, str(Path(tmp) / "storage"))
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)
    for rev, r in results.items():
        print(
            f"== {rev}: driver {r['total']} lines in {len(r['lines'])} modules; longest function "
            f"{r['longest'][1]} ({r['longest'][2]}.py) {r['longest'][0]} lines; strategy branches outside "
            f"tunestab/strategies/: {r['branches']}; --dry-run {r['dry_run_s']:.2f} s (median of 5), "
            f"loads {r['dry_run_loads']}"
        )
        print("   " + ", ".join(f"{m} {n}" for m, n in r["lines"].items()))


if __name__ == "__main__":
    main()
