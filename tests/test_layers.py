"""The driver's shape, kept: strategy-specific code lives in tunestab/strategies/ alone, imports run
one way (the worker never imports the driver; pure design code imports no Ray, Optuna or MLflow),
checking a space and `--dry-run` load no torch, and a new strategy is one module plus one line."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import edge_results

PKG = Path(__file__).resolve().parent.parent / "tunestab"

# What a Ray Train worker runs, and what it may import of the package.
WORKER = {
    "config",
    "model",
    "data",
    "probes",
    "checkpoint",
    "session",
    "compute",
    "loop",
    "vectorised",  # the loop's second engine
    "ray_trial",
    "train",
    "metrics",
    "outcome",
    "cluster",
    "members",  # a trial's config and reports as its members': pure, shared with the driver
    "quiet_exit",  # Ray runs it in every worker process of the job
    "stop_board",  # the one channel from the driver's scheduler to a population's worker
}
# Pure design code: decisions and tables a reader can run without a cluster or a tracking store.
PURE = [
    "tunestab.outcome",
    "tunestab.members",
    "tunestab.bracket",
    "tunestab.boundary",
    "tunestab.scaling",
    "tunestab.tables",
    "tunestab.plots",
    "tunestab.tev_rule",
    "tunestab.sections",
    "tunestab.run_dir",
    "tunestab.spec",
    "tunestab.strategies",
]


def modules() -> dict[str, ast.Module]:
    return {
        str(p.relative_to(PKG.parent).with_suffix("")).replace("/", "."): ast.parse(p.read_text())
        for p in PKG.rglob("*.py")
    }


def strategy_branches(tree: ast.Module) -> list[int]:
    """Lines that compare a `strategy` (a name or an attribute) with a strategy's name."""

    def names_strategy(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "strategy") or (
            isinstance(node, ast.Attribute) and node.attr == "strategy"
        )

    def is_literal(node) -> bool:
        return isinstance(node, ast.Constant) or (
            isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(isinstance(e, ast.Constant) for e in node.elts)
        )

    return [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Compare)
        and any(names_strategy(x) for x in [n.left, *n.comparators])
        and any(is_literal(x) for x in [n.left, *n.comparators])
    ]


def test_no_strategy_branch_outside_the_strategy_modules():
    found = {
        name: lines
        for name, tree in modules().items()
        if not name.startswith("tunestab.strategies") and (lines := strategy_branches(tree))
    }
    assert found == {}
    # The count is real: the strategies' own modules are where such code would go, and a branch
    # planted in a module is found.
    assert strategy_branches(ast.parse("if space.strategy == 'scale':\n    pass\n")) == [1]
    assert strategy_branches(ast.parse("x = strategy in ('max_lr', 'scale')\n")) == [1]


def imported(tree: ast.Module, name: str) -> set[str]:
    """The tunestab modules a module imports (at any depth of its code), by their short name."""
    package = name.rsplit(".", 1)[0] if name.count(".") > 1 else "tunestab"
    out = set()
    # Imports for annotations alone (`if TYPE_CHECKING:`) do not run.
    typing_only = {
        id(x)
        for n in ast.walk(tree)
        if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"
        for x in ast.walk(n)
    }
    for n in ast.walk(tree):
        if id(n) in typing_only:
            continue
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            if base == "tunestab":
                out |= {a.name for a in n.names}
            elif base.startswith("tunestab."):
                out.add(base.split(".")[1])
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".")[1] for a in n.names if a.name.startswith("tunestab.")}
    return out


def test_the_worker_imports_no_driver_module():
    trees = modules()
    wrong = {m: sorted(imported(trees[f"tunestab.{m}"], f"tunestab.{m}") - WORKER) for m in WORKER}
    assert {m: w for m, w in wrong.items() if w} == {}
    planted = ast.parse(
        "from .search import main\nfrom . import tracking\nimport tunestab.report\n"
        "if TYPE_CHECKING:\n    from .spec import Space\n"
    )
    assert imported(planted, "tunestab.loop") == {"search", "tracking", "report"}


def loaded_after(code: str, heavy=("torch", "ray", "optuna", "mlflow", "matplotlib")) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return eval(done.stdout.strip().splitlines()[-1])


def test_pure_design_code_imports_no_ray_optuna_or_mlflow():
    assert loaded_after("; ".join(f"import {m}" for m in PURE), ("ray", "optuna", "mlflow")) == []


def test_a_dry_run_loads_no_torch_and_no_ray(tmp_path):
    assert (
        loaded_after(f"from tunestab import search; assert search.main(['--dry-run', '--storage', '{tmp_path}']) == 0")
        == []
    )


def test_a_fifth_strategy_is_one_module_and_one_registry_line(monkeypatch, tmp_path):
    """A toy strategy (every variant at a fixed list of LRs, the default grid searcher): its class
    is all it writes, its registration the one line. The space checker, the command's Tune wiring
    (its members grouped into populations, a variant's LRs one trial) and the report then take it
    like the others."""
    from tunestab import report, search, spec, strategies
    from tunestab.strategies.base import Strategy

    class FixedLRs(Strategy):
        name = "fixed_lrs"

        def check(self, draft, sections, problems):
            if draft.param("lr") is None or draft.param("lr").kind != "grid":
                problems.append("params.lr: the fixed_lrs strategy needs `lr: {grid: [...]}`")

    monkeypatch.setitem(strategies.STRATEGIES, "fixed_lrs", FixedLRs())  # the registry line
    raw = {
        "name": "toy",
        "strategy": "fixed_lrs",
        "variants": ["baseline", "qk_norm"],
        "params": {"lr": {"grid": [0.01, 0.1, 1.0]}},
    }
    space = spec.parse(raw)
    with pytest.raises(spec.SpecError, match="fixed_lrs strategy needs"):
        spec.parse({**raw, "params": {"lr": {"loguniform": [0.01, 1.0]}}})
    searcher, populations = search.searcher(space, tmp_path), []
    while (config := searcher.suggest(f"t{len(populations)}")) not in (None, "FINISHED"):
        populations.append((config["variant"], [m["lr"] for m in config["members"].values()]))
    assert populations == [("baseline", [0.01, 0.1, 1.0]), ("qk_norm", [0.01, 0.1, 1.0])]
    grid = edge_results({v: (0.01, 0.1, 1.0) for v in ("baseline", "qk_norm")}, {"baseline": 0.05, "qk_norm": 0.5})
    out = report.build(space, grid)
    s = out.files["summary.csv"].set_index("variant")
    assert s.loc["baseline", "largest_stable_lr"] == 0.01 and s.loc["qk_norm", "smallest_divergent_lr"] == 1.0
