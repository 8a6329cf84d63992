"""The project modules a module imports, transitively (also inside functions): what a DVC stage depends on."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import PROJECT_ROOT

PACKAGES = ("pipeline", "flows")


def _module_path(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    as_file = PROJECT_ROOT.joinpath(*parts).with_suffix(".py")
    if as_file.is_file():
        return as_file
    as_package = PROJECT_ROOT.joinpath(*parts, "__init__.py")
    return as_package if as_package.is_file() else None


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    package = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pipeline import data`
    return names


def project_closure(*modules: str) -> set[str]:
    """Repository-relative paths of ``modules`` and every project module they import, transitively."""
    seen: set[Path] = set()
    todo = [path for name in modules if (path := _module_path(name)) is not None]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        names = _imported_names(path)
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first (a package facade imports its parts).
        names |= {".".join(name.split(".")[:depth]) for name in names for depth in range(1, name.count(".") + 1)}
        todo.extend(p for name in names if (p := _module_path(name)) is not None)
    return {str(path.relative_to(PROJECT_ROOT)) for path in seen}
