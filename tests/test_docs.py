"""The docs cite tests and modules by path; this keeps those citations true.

docs/reliability.md and docs/gpu.md back each claim with a `tests/test_x.py::test_name`, and
tests move between files as modules are split or renamed; a citation that points nowhere makes
the claim look tested when nobody can find the test. This reads the Markdown and the test files'
syntax trees only: no Ray, no torch.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `tests/test_x.py::test_y`, `test_x.py::test_y[param]`, `…::test_y` (same file as the one
# before it on the line), `test_x.py::test_prefix…` / `...` / `*` (some test starts with it).
CITATION = re.compile(r"(?:(?<![\w./])(?:tests/)?(test_\w+\.py)|…|\.\.\.)::(test_\w*)(?:\[[^\]]*\])?(…|\.\.\.|\*)?")
MODULE = re.compile(r"(?<![\w./])tunestab/[\w/]+\.py")


def _tests_in(name: str) -> set[str] | None:
    path = ROOT / "tests" / name
    if not path.is_file():
        return None
    tree = ast.parse(path.read_text(), filename=str(path))
    defs = (n for n in tree.body if isinstance(n, ast.ClassDef) for n in n.body)
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    return {n.name for n in [*tree.body, *defs] if isinstance(n, funcs) and n.name.startswith("test_")}


def _lines(docs):
    for doc in docs:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            yield f"{doc.relative_to(ROOT)}:{number}", line


def test_every_test_and_module_the_docs_cite_exists():
    broken = []
    for where, line in _lines([ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]):
        file = None
        for m in CITATION.finditer(line):
            file, (name, prefix) = m[1] or file, m.group(2, 3)
            tests = _tests_in(file) if file else None
            if tests is None:
                broken.append(f"{where}: {m[0]} (no such file tests/{file or '?'})")
            elif not (any(t.startswith(name) for t in tests) if prefix else name in tests):
                broken.append(f"{where}: {m[0]} (not in tests/{file})")
    for where, line in _lines([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]):
        broken += [f"{where}: {m[0]} (no such file)" for m in MODULE.finditer(line) if not (ROOT / m[0]).is_file()]
    assert not broken, "broken citations in the docs:\n" + "\n".join(broken)
