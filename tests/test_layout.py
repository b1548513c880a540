"""The codebase's shape rules: imports at the top, small modules and folders, long functions explained.

(The layer order itself is import-linter's contract in pyproject.toml, run by CI as ``lint-imports``.)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diag", "train")
MAX_MODULE_LINES = 400
MAX_MODULES_PER_FOLDER = 12
MAX_FUNCTION_LINES = 60
#: Modules that are data tables (class names and prompt templates), exempt from the size rule.
DATA_TABLES = {"train/datasets/templates.py", "train/datasets/templates.py"}
#: What a docstring says when a function is long on purpose.
LONG_REASON = "Long because"


def _modules():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_project_imports_sit_at_module_top():
    """An import of diag or train inside a function must say why (it defers a heavy optional dependency)."""
    offenders = []
    for path in _modules():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if id(node) in top or not any(n.split(".")[0] in PACKAGES for n in names):
                continue
            text = " ".join(lines[node.lineno - 1:node.end_lineno])
            if "heavy" not in text and "defer" not in text:
                offenders.append(f"{_rel(path)}:{node.lineno}")
    assert not offenders, f"project imports inside functions without a reason: {offenders}"


def test_modules_and_folders_stay_small():
    big = [f"{_rel(p)} ({n} lines)" for p in _modules()
           if _rel(p) not in DATA_TABLES and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
    folders = {p.parent for p in _modules()}
    crowded = [f"{_rel(d)} ({n})" for d in folders
               if (n := len([m for m in d.glob("*.py") if m.name != "__init__.py"])) > MAX_MODULES_PER_FOLDER]
    assert not crowded, f"folders with more than {MAX_MODULES_PER_FOLDER} modules: {crowded}"


def test_long_functions_say_why():
    unexplained = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    unexplained.append(f"{_rel(path)}:{node.name} ({length} lines)")
    assert not unexplained, f"functions over {MAX_FUNCTION_LINES} lines without '{LONG_REASON} …' in the docstring: " \
                            f"{unexplained}"


def test_the_product_never_speaks_of_the_tracker():
    """No 'issue 10' in code, scripts, notebooks or the README: name the thing instead."""
    import re

    pattern = re.compile(r"\bissues?[ -]#?\d+", re.IGNORECASE)
    places = [*_modules(), *sorted((ROOT / "scripts").glob("*")), *sorted((ROOT / "analysis_notebooks").glob("*")),
              ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*"))]
    hits = [f"{_rel(p)}: {m.group(0)}" for p in places if p.is_file()
            for m in pattern.finditer(p.read_text(errors="replace"))]
    assert not hits, f"tracker references: {hits}"
