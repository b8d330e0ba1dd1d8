"""Every third-party module the packages import is a declared dependency (pyproject.toml), so a fresh
install has it; test and optional modules are declared in their extras."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN = {"app", "db", "oxnet", "tests"}


def _imports(folder: Path) -> dict[str, str]:
    """Top-level module -> a file importing it, for every absolute import under ``folder``."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _declared(*groups: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [s for g in groups for s in project["optional-dependencies"][g]]
    return {re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def _undeclared(folders, declared):
    distributions = packages_distributions()
    missing = {}
    for folder in folders:
        for module, where in _imports(ROOT / folder).items():
            if module in OWN or module in sys.stdlib_module_names or module == "__future__":
                continue
            names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            if not names & declared:
                missing[module] = where
    return missing


def test_the_packages_import_only_declared_dependencies():
    assert _undeclared(["app", "db", "oxnet"], _declared("dicom", "ssl")) == {}


def test_the_tests_and_scripts_import_only_declared_dependencies():
    assert _undeclared(["tests", "scripts"], _declared("dev", "dicom")) == {}
