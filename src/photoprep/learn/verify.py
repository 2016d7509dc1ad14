"""`photoprep verify`: does the committed model still give the committed metrics?

The committed figures are those of ``git show HEAD:metrics/eval.json`` when the project is a git
repository that tracks them: after a local ``dvc repro`` the working tree holds that run's
figures, and comparing a model with its own figures would prove nothing. Two exceptions, each
said: a project outside git, or one whose ``params.yaml`` differs from HEAD's (an experiment, as
``dvc exp run -S ...`` leaves it, whose figures HEAD does not have), is checked against the
working tree's figures. Checks, from the repository root:

0. the machines: which CPU and which CPU-math settings made the committed model (its metadata,
   and ``reports/train_perf.json`` at HEAD) and which are in force now;
1. the test split's fingerprint: ``data/splits/test.parquet`` (recomputed), ``reports/splits.json``,
   the model's metadata and the committed ``metrics/eval.json`` must all name the same split;
2. re-evaluation: the model on the test split, on the CPU, must give every committed figure of
   ``metrics/eval.json`` within the tolerance, and the working tree's file must be the committed one;
3. with ``retrain``: training again on the CPU (into a temporary folder) from the model's own
   params must give the same metrics, and, when the model was trained on the CPU and the
   tolerance is zero, bit-identical weights.

The tolerance defaults to zero where the committed figures came from the CPU (with
``compute.cpu_math: portable`` the same bytes on any x86-64 CPU with AVX2: :mod:`photoprep.portable`) and
to a small one where they came from CUDA. It prints each check and why it is exact or how
tolerant, every figure compared (committed and now), and the differences as a diff; the exit
code is 0 when everything matches, 1 when something differs, 2 when a file needed for the check
is missing or unreadable.
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from photoprep import portable
from photoprep.core import params
from photoprep.core.errors import UserError
from photoprep.core.io import read_json
from photoprep.core.layout import PATHS, Layout
from photoprep.core.params import EvaluateParams, TrainParams
from photoprep.learn import evaluate, pretrained, train
from photoprep.learn.checkpoint import load_model, model_from, read_model_file
from photoprep.learn.data import SplitData, check_classes, load_data, load_split, read_splits_report

__all__ = ["at_head", "committed_json", "compare_metrics", "figure_lines", "flatten", "verify"]

CUDA_EVAL_TOLERANCE = 1e-4  # fp32 kernels differ between devices in the last bits
CUDA_RETRAIN_TOLERANCE = 0.02  # another device's training lands on other weights


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}``."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def compare_metrics(committed: dict[str, Any], now: dict[str, Any], tolerance: float) -> list[str]:
    """One diff line per figure that differs by more than ``tolerance`` (text must be equal)."""
    a, b = flatten(committed), flatten(now)
    lines = []
    for key in sorted(a.keys() | b.keys()):
        if key not in b:
            lines.append(f"- {key}: {a[key]!r} (committed; not produced now)")
        elif key not in a:
            lines.append(f"+ {key}: {b[key]!r} (produced now; not committed)")
        else:
            x, y = a[key], b[key]
            numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (x, y))
            if numbers:
                both_nan = math.isnan(x) and math.isnan(y)
                if not both_nan and not abs(x - y) <= tolerance:
                    gap = abs(x - y)
                    lines.append(f"~ {key}: committed {x!r}, now {y!r} (|diff| {gap:.6g} > {tolerance:g})")
            elif x != y:
                lines.append(f"~ {key}: committed {x!r}, now {y!r}")
    return lines


def figure_lines(committed: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Every figure compared, committed and now, one line each (same or different)."""
    a, b = flatten(committed), flatten(now)
    return [f"{key}: committed {a.get(key)!r}, now {b.get(key)!r}" for key in sorted(a.keys() | b.keys())]


def at_head(path: Path) -> str | None:
    """The text of ``path`` as git's HEAD holds it; None outside git or when HEAD has no such file."""
    path = Path(path)
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if top.returncode != 0:
            return None
        relative = path.resolve().relative_to(Path(top.stdout.strip()).resolve()).as_posix()
        shown = subprocess.run(
            ["git", "show", f"HEAD:{relative}"], cwd=path.parent, capture_output=True, text=True, timeout=30
        )
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return shown.stdout if shown.returncode == 0 else None


def committed_json(path: Path, params_path: Path | None = None) -> tuple[Any, str]:
    """The JSON file ``path`` as git's HEAD holds it, and where it came from (``HEAD``). The working
    tree's file, and why, outside git, when HEAD has no such file, or when ``params_path`` differs
    from HEAD's (an experiment)."""
    path = Path(path)
    text = at_head(path)
    why = "outside git, or not committed"
    if text is not None and params_path is not None:
        changed = _changed_params(params_path)
        if changed:
            text, why = None, f"params.yaml differs from HEAD's in {', '.join(changed[:4])}: an experiment"
    if text is not None:
        return json.loads(text), "HEAD"
    if not path.exists():
        raise UserError(f"{path} not found (run `dvc repro`, or `dvc pull`, first)")
    return read_json(path), f"the working tree ({why})"


def _changed_params(params_path: Path) -> list[str]:
    """The keys (``train.model``) whose values differ between ``params_path`` and HEAD's copy."""
    import yaml

    text = at_head(params_path)
    if text is None:
        return []
    head = flatten(yaml.safe_load(text) or {})
    now = flatten(yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {})
    return sorted(k for k in head.keys() | now.keys() if head.get(k) != now.get(k))


def _short(fp: str | None) -> str:
    return (fp or "<none>")[:16]


@dataclass
class _Check:
    """One numbered check: what it compared (printed) and what differed (failures)."""

    title: str
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _eval_device(paths: Layout) -> str:
    if not paths.perf_metrics.exists():
        return "cpu"
    device = str(read_json(paths.perf_metrics).get("evaluate", {}).get("device", "cpu"))
    return "cuda" if device.startswith("cuda") else "cpu"


def _mode(settings: dict[str, Any] | None) -> str | None:
    """The ``compute.cpu_math`` mode a model file's settings record (older files: ``portable``)."""
    if not settings:
        return None
    if "mode" in settings:
        return settings["mode"]
    return "portable" if settings.get("portable") else "native"


def _math_line(settings: dict[str, Any] | None) -> str:
    if not settings:
        return "not recorded"
    env = settings.get("env") or {}
    pins = ", ".join(f"{k}={v}" for k, v in sorted(env.items()) if v is not None)
    mode = _mode(settings)
    return f"{mode} ({portable.PROMISES.get(mode or '', '')}), {settings.get('threads')} threads: {pins}"


def _machines(paths: Layout, meta: dict[str, Any]) -> _Check:
    check = _Check("0. the machines")
    made_on = "not recorded"
    if paths.train_perf.exists():
        perf, _ = committed_json(paths.train_perf, paths.params)
        made_on = str(((perf or {}).get("cpu") or {}).get("cpu") or perf.get("device") or made_on)
    check.lines.append(f"committed model trained on {meta.get('trained_on')}: {made_on}")
    check.lines.append(f"  its CPU math: {_math_line(meta.get('cpu_math'))}")
    check.lines.append(f"now: {portable.cpu_model()}")
    check.lines.append(f"  CPU math in force: {_math_line(portable.settings())}")
    return check


def _one_split(
    test: SplitData, splits: dict[str, Any], meta: dict[str, Any], committed: dict[str, Any]
) -> _Check:
    names = {
        f"{PATHS.split_table('test')}": test.fingerprint,
        f"{PATHS.splits_report}": splits["fingerprints"]["test"],
        f"{PATHS.model} metadata": (meta.get("fingerprints") or {}).get("test"),
        f"{PATHS.eval_metrics}": committed.get("test_fingerprint"),
    }
    check = _Check(f"1. one test split everywhere: {_short(test.fingerprint)} in {', '.join(names)}")
    if len(set(names.values())) != 1:
        check.failures.append("test split fingerprints differ:")
        check.failures += [f"    {name}: {_short(fp)}" for name, fp in names.items()]
    return check


def _reevaluate(
    paths: Layout,
    committed: tuple[dict[str, Any], str],
    model: Any,
    meta: dict[str, Any],
    test: SplitData,
    p: EvaluateParams,
    tolerance: float | None,
) -> tuple[_Check, float]:
    figures, origin = committed
    committed_on = _eval_device(paths)
    tol = tolerance if tolerance is not None else (0.0 if committed_on == "cpu" else CUDA_EVAL_TOLERANCE)
    why = (
        "exact: the committed figures came from the CPU, whose math is deterministic"
        if committed_on == "cpu" and tol == 0
        else f"tolerance {tol:g}: the committed figures came from {committed_on}"
    )
    check = _Check(f"2. the model re-evaluated on the CPU against {PATHS.eval_metrics} at {origin} ({why})")
    now = evaluate.evaluate(model, meta, test, p.model_copy(update={"device": "cpu"})).metrics
    check.lines += figure_lines(figures, now)
    diff = compare_metrics(figures, now, tol)
    if diff:
        check.failures.append(
            f"{PATHS.eval_metrics} differs from a re-evaluation of {PATHS.model} (tolerance {tol:g}):"
        )
        check.failures += [f"    {line}" for line in diff]
    if origin == "HEAD" and paths.eval_metrics.exists():  # the working tree must hold the committed file
        local = read_json(paths.eval_metrics)
        if local != figures:
            check.failures.append(f"{PATHS.eval_metrics} in the working tree is not the committed one:")
            check.failures += [f"    {line}" for line in compare_metrics(figures, local, 0.0)]
    return check, tol


def _params_check(p: TrainParams, meta: dict[str, Any]) -> list[str]:
    current = {k: v for k, v in p.recorded().items() if k != "resume"}
    trained_with = {k: v for k, v in meta["params"].items() if k != "resume"}
    changed = sorted(k for k in current.keys() | trained_with.keys() if current.get(k) != trained_with.get(k))
    if not changed:
        return []
    return [f"{PATHS.params}'s train section is not what {PATHS.model} was trained with:"] + [
        f"    ~ train.{k}: model {trained_with.get(k)!r}, params.yaml {current.get(k)!r}" for k in changed
    ]


def verify(retrain: bool = False, tolerance: float | None = None, *, root: str | Path = ".") -> int:
    """Re-check the committed model and metrics; print a diff; return the exit code (0, 1 or 2)."""
    try:
        return _verify(Layout(Path(root)), retrain, tolerance)
    except UserError as exc:
        print(f"photoprep verify: {exc}")
        return 2


def _verify(paths: Layout, retrain: bool, tolerance: float | None) -> int:
    # Messages name the files as the layout does from the project root (PATHS), read from ``paths``.
    p = params.load(paths.params)
    committed = committed_json(paths.eval_metrics, paths.params)
    splits = read_splits_report(paths.splits_report)
    if not splits.get("fingerprints", {}).get("test"):
        raise UserError(f"{PATHS.splits_report} has no test fingerprint")
    model, meta = load_model(paths.model)
    test = _load_test_unchecked(paths, meta)
    checks = [_machines(paths, meta), _one_split(test, splits, meta, committed[0])]
    evaluated, tol = _reevaluate(paths, committed, model, meta, test, p.evaluate, tolerance)
    evaluated.failures += _params_check(p.train, meta)
    checks.append(evaluated)
    if retrain:
        checks.append(_retrain(paths, meta, committed[0], p.evaluate, tolerance))
    failures = [line for check in checks for line in check.failures]
    for check in checks:
        print(f"photoprep verify: {check.title}")
        for line in check.lines:
            print(f"photoprep verify:      {line}")
    if failures:
        print("photoprep verify: FAILED")
        for line in failures:
            print(f"  {line}")
        return 1
    print(
        f"photoprep verify: ok: {len(flatten(committed[0]))} figures of {PATHS.eval_metrics} "
        f"at {committed[1]} reproduced (tolerance {tol:g}), test split {_short(test.fingerprint)}"
        + (", retrained on the CPU" if retrain else "")
    )
    return 0


def _retrain(
    paths: Layout,
    meta: dict[str, Any],
    committed: dict[str, Any],
    eval_params: EvaluateParams,
    tolerance: float | None,
) -> _Check:
    on_cpu = meta.get("trained_on") == "cpu"
    tol = tolerance if tolerance is not None else (0.0 if on_cpu else CUDA_RETRAIN_TOLERANCE)
    mode = _mode(meta.get("cpu_math")) or "native"
    if on_cpu and tolerance in (None, 0):
        how = (
            f"exact weights and figures (the model was trained on the CPU, cpu_math {mode}: "
            f"{portable.PROMISES[mode]})"
        )
    else:
        how = (
            f"figures within {tol:g} (the model was trained on a GPU: another device's training lands on "
            "other weights; this tolerance is not yet backed by a measured seed-to-seed spread)"
        )
    check = _Check(f"3. trained again on the CPU: {how}")
    changes: dict[str, Any] = {"device": "cpu", "resume": False}
    init_from = meta["params"].get("init_from")
    if init_from and not Path(init_from).is_absolute():
        changes["init_from"] = str(paths.root / init_from)  # the stage ran from the repository root
    p = TrainParams.model_validate(meta["params"] | changes)
    if p.nproc > 1:  # DDP: another trajectory than one process's, even with the same effective batch
        check.failures.append(
            f"--retrain: {paths.model} was trained by {p.nproc} DDP ranks; "
            "retraining runs one process, which gives other weights: not checked"
        )
        return check
    data = load_data(p, paths)
    start = pretrained.load_fetched(p, paths)
    print(f"photoprep verify: retraining {p.model} on the CPU ({p.epochs} epochs at most)...")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(int(meta.get("cpu_threads") or threads))
        with tempfile.TemporaryDirectory(prefix="photoprep-verify-") as tmp:
            result = train.fit(data, p, checkpoint_dir=Path(tmp) / "checkpoints", pretrained=start)
    finally:
        torch.set_num_threads(threads)
    model = model_from(result.state_dict, result.meta)
    test = _load_test_unchecked(paths, result.meta)
    now = evaluate.evaluate(
        model, result.meta, test, eval_params.model_copy(update={"device": "cpu"})
    ).metrics
    diff = compare_metrics(committed, now, tol)
    if diff:
        check.failures.append(f"retraining on the CPU gives other metrics (tolerance {tol:g}):")
        check.failures += [f"    {line}" for line in diff]
    if on_cpu and tol == 0:
        state, _ = read_model_file(paths.model)
        fresh = result.state_dict
        differ = sorted(k for k in state if k not in fresh or not torch.equal(state[k], fresh[k]))
        if differ:
            check.failures.append(
                f"retraining on the CPU gives other weights: {len(differ)} of {len(state)} tensors differ"
            )
            check.failures += [f"    ~ {k}" for k in differ[:10]]
    return check


def _load_test_unchecked(paths: Layout, meta: dict[str, Any]) -> SplitData:
    """The test split with its recomputed fingerprint, compared by the caller, not here."""
    classes = check_classes(meta["classes"], read_splits_report(paths.splits_report), PATHS)
    return load_split("test", meta["input"], classes, paths)
