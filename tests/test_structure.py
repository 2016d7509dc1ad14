"""The codebase's own rules, checked: dvc.yaml agrees with the layout module and with the code
each stage imports, imports point down between rooms, and no module reaches into another's
private names."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml
from imports import PACKAGE, ROOT, closure, imported_modules, module_name

from photoprep.core.layout import SPLITS, Layout

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
STAGE_SCRIPTS = sorted((ROOT / "stages").glob("[a-z]*.py"))
PIPELINE_ROOTS = ("data", "reports", "plots", "metrics", "models", "dvclive", "pipeline")


def _entries(items: list) -> list[str]:
    out = []
    for item in items or []:
        out.extend(item.keys() if isinstance(item, dict) else [item])
    return [str(x) for x in out]


def _stage_paths() -> dict[str, dict[str, list[str]]]:
    """Per stage (``download`` for the foreach): its deps and its outs (outs, metrics, plots)."""
    stages = {}
    for name, stage in DVC["stages"].items():
        body = stage.get("do", stage)
        outs = _entries(body.get("outs")) + _entries(body.get("metrics")) + _entries(body.get("plots"))
        stages[name] = {"deps": _entries(body.get("deps")), "outs": outs, "cmd": body["cmd"]}
    return stages


def _top_level_plots() -> list[str]:
    out = []
    for item in DVC.get("plots", []):
        key, spec = next(iter(item.items())) if isinstance(item, dict) else (item, None)
        if isinstance(spec, dict) and isinstance(spec.get("y"), dict):
            out.extend(spec["y"].keys())
        else:
            out.append(key)
    return out


def _layout_paths(source: str = "${item}") -> set[str]:
    """Every path the layout names, with per-source paths for ``source`` and every split."""
    layout = Layout()
    paths: set[str] = set()
    for name, member in inspect.getmembers(Layout):
        if name.startswith("_") or name == "root":
            continue
        if isinstance(member, property):
            paths.add(getattr(layout, name).as_posix())
        elif callable(member):
            params = list(inspect.signature(member).parameters)[1:]
            arg = params[0] if params else ""
            values = {"source": [source], "split": SPLITS, "stage": ["dedup", "validate", "bucket"]}[arg]
            paths.update(getattr(layout, name)(v).as_posix() for v in values)
    return paths


def _covered(path: str, declared: set[str]) -> bool:
    """``path`` is declared itself or lies in a declared folder."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)


def test_every_pipeline_path_in_dvc_yaml_is_named_by_the_layout():
    layout = _layout_paths()
    in_dvc = {p for s in _stage_paths().values() for p in s["deps"] + s["outs"]}
    in_dvc |= set(_entries(DVC.get("metrics"))) | set(_top_level_plots())
    pipeline = {p for p in in_dvc if p.split("/")[0] in PIPELINE_ROOTS}
    not_named = sorted(p for p in pipeline if not _covered(p, layout) and p not in layout)
    # dvclive/ is written by dvclive under layout.live_dir; its files are declared at top level.
    not_named = [p for p in not_named if not p.startswith(Layout().live_dir.as_posix() + "/")]
    assert not_named == [], f"dvc.yaml names paths that photoprep.core.layout does not: {not_named}"


def test_every_layout_path_is_declared_in_dvc_yaml():
    declared = {p for s in _stage_paths().values() for p in s["deps"] + s["outs"]}
    declared |= {Layout().params.as_posix(), Layout().live_dir.as_posix()}
    declared.add(Layout().dedup_input.as_posix())  # the dedup stage's scratch, gone when it ends
    missing = sorted(p for p in _layout_paths() if not _covered(p, declared))
    assert missing == [], f"photoprep.core.layout names paths that no stage of dvc.yaml declares: {missing}"


_PATH_LITERAL = re.compile(r"""["'](?:{})/""".format("|".join(PIPELINE_ROOTS)))


@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda p: p.stem)
def test_stage_scripts_take_their_paths_from_the_layout(script: Path):
    assert not _PATH_LITERAL.search(script.read_text(encoding="utf-8")), f"{script.name} spells out a path"


CORE = (
    "src/photoprep/core"  # the core modules: one unit, declared as a folder by every stage that imports one
)


def _code_deps(declared: list[str]) -> list[str]:
    return [d.rstrip("/") for d in declared if d.startswith("src/")]


def undeclared(script: Path, declared: list[str]) -> list[str]:
    """The files of `script`'s import closure that no dep covers (a file, or a folder above it)."""
    needed = sorted(p.relative_to(ROOT).as_posix() for p in closure(script))
    return [p for p in needed if not _covered(p, set(_code_deps(declared)))]


def unneeded(script: Path, declared: list[str]) -> list[str]:
    """Code deps that `script` does not import: a file outside its closure, a folder with no module
    of the closure, or a folder (other than `CORE`) holding a module outside it. A folder dep is
    exact only when the stage imports every module in it."""
    needed = {p.relative_to(ROOT).as_posix() for p in closure(script)}
    out = []
    for dep in _code_deps(declared):
        folder = ROOT / dep
        if not folder.is_dir():
            out += [] if dep in needed else [dep]
            continue
        inside = {p.relative_to(ROOT).as_posix() for p in folder.rglob("*.py")}
        if not inside & needed or (dep != CORE and not inside <= needed):
            out.append(dep)
    return out


@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda p: p.stem)
def test_dvc_yaml_declares_exactly_the_code_a_stage_imports(script: Path):
    stages = _stage_paths()
    (name,) = [n for n, s in stages.items() if f"stages/{script.name}" in s["cmd"]]
    declared = stages[name]["deps"]
    assert f"stages/{script.name}" in declared
    missing = undeclared(script, declared)
    assert missing == [], f"dvc.yaml: stage {name} imports but does not declare {missing}"
    extra = unneeded(script, declared)
    assert extra == [], f"dvc.yaml: stage {name} declares code it does not import: {extra}"


def test_the_deps_check_fails_on_an_undeclared_import(tmp_path):
    """Not vacuous: a stage that imports a module its deps do not name fails the check, and so does
    one whose import brings in modules the deps miss; a dep on code it does not import fails too."""
    script = tmp_path / "stage.py"
    script.write_text("from photoprep.images import validate\n", encoding="utf-8")
    needed = sorted(p.relative_to(ROOT).as_posix() for p in closure(script))
    assert "src/photoprep/images/validate.py" in needed and len(needed) > 3
    declared = [p for p in needed if p != "src/photoprep/images/validate.py"]
    assert undeclared(script, declared) == ["src/photoprep/images/validate.py"]
    assert undeclared(script, needed) == [] and unneeded(script, needed) == []
    assert unneeded(script, [*needed, "src/photoprep/images/dedup.py"]) == ["src/photoprep/images/dedup.py"]
    assert unneeded(script, [*needed, "src/photoprep/images"]) == ["src/photoprep/images"]
    script.write_text("from photoprep.images import validate, dedup\n", encoding="utf-8")
    missing = undeclared(script, [*needed, "src/photoprep/images/dedup.py"])
    assert "src/photoprep/images/keep.py" in missing and "src/photoprep/images/hamming.py" in missing


# Rooms from the bottom up: a module may import its own room and any room below it.
ROOMS = ["core", "ingest", "images", "dataset", "learn", "review", "entry"]
ENTRY = {"photoprep.cli", "photoprep.demo"}


def _room(module: str) -> str:
    if module in ENTRY:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ROOMS else "core"


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_imports_point_down(path: Path):
    me = module_name(path)
    upward = sorted(
        other for other in imported_modules(path) if ROOMS.index(_room(other)) > ROOMS.index(_room(me))
    )
    assert upward == [], f"{me} ({_room(me)}) imports from a room above it: {upward}"


def test_the_library_never_imports_dvc():
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not any(n == "dvc" or n.startswith("dvc.") for n in names), path


def _private_uses(path: Path) -> list[str]:
    """``from photoprep.x import _y`` and ``x._y`` where ``x`` names a photoprep module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("photoprep"):
            for alias in node.names:
                if alias.name.startswith("_") and alias.name != "__version__":
                    found.append(f"from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(
                a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("photoprep")
            )
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


CALLERS = sorted([*SOURCES, *STAGE_SCRIPTS, *(ROOT / "bench").glob("*.py"), *(ROOT / "tests").glob("*.py")])


@pytest.mark.parametrize("path", CALLERS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_module_reaches_into_another_modules_private_names(path: Path):
    assert _private_uses(path) == []


def test_the_private_name_check_sees_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from photoprep.images import decode\nfrom photoprep.core.io import _x\ndecode._probe(1)\n"
    )
    assert _private_uses(bad) == ["from photoprep.core.io import _x", "decode._probe"]


_LONG = 400


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_a_long_module_says_why_at_its_top(path: Path):
    text = path.read_text(encoding="utf-8")
    if text.count("\n") <= _LONG:
        return
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert "Why one module" in doc, (
        f"{path.name} has {text.count(chr(10))} lines and no 'Why one module' note"
    )


_MAX_MODULE, _MAX_FUNCTION, _MAX_PARAMETERS = 600, 80, 8


def _too_long_or_wide(source: str, module: str) -> list[str]:
    """Functions of `module`'s `source` over `_MAX_FUNCTION` lines or with more than
    `_MAX_PARAMETERS` parameters (self and cls aside), as 'name (N lines, P parameters)'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            a = node.args
            names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + [
                x.arg for x in (a.vararg, a.kwarg) if x is not None
            ]
            params = len([n for n in names if n not in ("self", "cls")])
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > _MAX_FUNCTION or params > _MAX_PARAMETERS:
                found.append(f"{node.name} ({lines} lines, {params} parameters)")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_modules_and_functions_stay_small(path: Path):
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") <= _MAX_MODULE, f"{path.name} has {text.count(chr(10))} lines: split it by job"
    assert _too_long_or_wide(text, path.relative_to(PACKAGE).as_posix()) == []


def test_the_size_check_sees_a_long_and_a_wide_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    text = f"def long():\n{body}\n\n\ndef wide(a, b, c, d, e, f, g, h, i):\n    return a\n"
    assert _too_long_or_wide(text, "images/example.py") == [
        "long (86 lines, 0 parameters)",
        "wide (2 lines, 9 parameters)",
    ]
