"""The import closure of a stage script: which files of src/photoprep it can run.

Shared by the deps test and the layering test; reads source text with ``ast``, runs nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "photoprep"


def module_file(name: str) -> Path | None:
    """The file of a dotted photoprep module name (package -> its __init__.py), or None."""
    if name != "photoprep" and not name.startswith("photoprep."):
        return None
    base = ROOT / "src" / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def module_name(path: Path) -> str:
    rel = path.resolve().relative_to(ROOT / "src").with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the photoprep modules a file imports (at any depth of the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if module_file(name) is not None}


def closure(path: Path) -> set[Path]:
    """Every photoprep file ``path`` imports, directly or through others, with the packages'
    ``__init__.py`` files that importing them runs."""
    todo, seen = [path], set()
    while todo:
        current = todo.pop()
        for name in imported_modules(current):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                file = module_file(".".join(parts[:i]))
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen
