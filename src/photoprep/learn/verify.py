"""`photoprep verify`: does the committed model still give the committed metrics?

Checks, from the repository root:

1. the test split's fingerprint: ``data/splits/test.parquet`` (recomputed), ``reports/splits.json``,
   the model's metadata and ``metrics/eval.json`` must all name the same split;
2. re-evaluation: the committed model on the committed test split, on the CPU, must give
   every figure of ``metrics/eval.json`` within the tolerance;
3. with ``retrain``: training again on the CPU (into a temporary folder) from the model's own
   params must give the same metrics, and, when the model was trained on the CPU and the
   tolerance is zero, bit-identical weights.

The tolerance defaults to zero where the committed figures came from the CPU (CPU runs are
bit-reproducible for one torch version and CPU kind; the retraining uses the thread count the
model was trained with) and to a small one where they came from CUDA. It prints which checks it
ran and why each is exact or how tolerant, every figure compared (committed and now), and the
differences as a diff; the exit code is 0 when everything matches, 1 when something differs,
2 when a file needed for the check is missing or unreadable.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from photoprep.core import params
from photoprep.core.errors import UserError
from photoprep.core.io import read_json
from photoprep.core.layout import PATHS, Layout
from photoprep.core.params import TrainParams
from photoprep.learn import evaluate, models, train
from photoprep.learn.checkpoint import load_model, read_model_file
from photoprep.learn.data import SplitData, check_classes, load_data, load_split, read_splits_report

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


def _short(fp: str | None) -> str:
    return (fp or "<none>")[:16]


def _read_json(path: Path) -> Any:
    if not path.exists():
        raise UserError(f"{path} not found (run `dvc repro`, or `dvc pull`, first)")
    return read_json(path)


def _eval_device(paths: Layout) -> str:
    if not paths.perf_metrics.exists():
        return "cpu"
    device = str(read_json(paths.perf_metrics).get("evaluate", {}).get("device", "cpu"))
    return "cuda" if device.startswith("cuda") else "cpu"


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
    committed = _read_json(paths.eval_metrics)
    splits = _read_json(paths.splits_report)
    model, meta = load_model(paths.model)
    failures: list[str] = []

    # 1. one test split everywhere
    if not splits.get("fingerprints", {}).get("test"):
        raise UserError(f"{PATHS.splits_report} has no test fingerprint")
    test = _load_test_unchecked(paths, meta)
    names = {
        f"{PATHS.split_table('test')}": test.fingerprint,
        f"{PATHS.splits_report}": splits["fingerprints"]["test"],
        f"{PATHS.model} metadata": (meta.get("fingerprints") or {}).get("test"),
        f"{PATHS.eval_metrics}": committed.get("test_fingerprint"),
    }
    if len(set(names.values())) != 1:
        failures.append("test split fingerprints differ:")
        failures += [f"    {name}: {_short(fp)}" for name, fp in names.items()]

    checks = [
        f"1. one test split everywhere: {_short(test.fingerprint)} in {', '.join(names)}",
    ]

    # 2. the committed model, evaluated again on the CPU
    eval_tol = tolerance
    committed_on = _eval_device(paths)
    if eval_tol is None:
        eval_tol = 0.0 if committed_on == "cpu" else CUDA_EVAL_TOLERANCE
    why = (
        "exact: the committed figures came from the CPU, whose math is deterministic"
        if committed_on == "cpu" and eval_tol == 0
        else f"tolerance {eval_tol:g}: the committed figures came from {committed_on}"
    )
    checks.append(f"2. the committed model re-evaluated on the CPU against {PATHS.eval_metrics} ({why})")
    cpu_eval = p.evaluate.model_copy(update={"device": "cpu"})
    now = evaluate.evaluate(model, meta, test, cpu_eval).metrics
    checks += [f"     {line}" for line in figure_lines(committed, now)]
    diff = compare_metrics(committed, now, eval_tol)
    if diff:
        failures.append(
            f"{PATHS.eval_metrics} differs from a re-evaluation of {PATHS.model} (tolerance {eval_tol:g}):"
        )
        failures += [f"    {line}" for line in diff]

    current = {k: v for k, v in p.train.recorded().items() if k != "resume"}
    trained_with = {k: v for k, v in meta["params"].items() if k != "resume"}
    changed = sorted(k for k in current.keys() | trained_with.keys() if current.get(k) != trained_with.get(k))
    if changed:
        failures.append(f"{PATHS.params}'s train section is not what {PATHS.model} was trained with:")
        failures += [
            f"    ~ train.{k}: model {trained_with.get(k)!r}, params.yaml {current.get(k)!r}" for k in changed
        ]

    # 3. train again on the CPU and compare
    if retrain:
        on_cpu = meta.get("trained_on") == "cpu"
        pinned = meta.get("cpu_math") or {}
        checks.append(
            "3. trained again on the CPU: "
            + (
                "exact weights and figures (the model was trained on the CPU"
                + (
                    ", CPU math pinned portably: the same bytes on any x86-64 CPU with AVX2)"
                    if pinned.get("portable")
                    else "; not pinned portably: exact on the machine that trained it only)"
                )
                if on_cpu and tolerance in (None, 0)
                else f"figures within {tolerance if tolerance is not None else CUDA_RETRAIN_TOLERANCE:g} "
                "(the model was trained on a GPU: another device's training lands on other weights; "
                "this tolerance is not yet backed by a measured seed-to-seed spread)"
            )
        )
        failures += _retrain(paths, meta, committed, p.evaluate, tolerance)

    for line in checks:
        print(f"photoprep verify: {line}")
    if failures:
        print("photoprep verify: FAILED")
        for line in failures:
            print(f"  {line}")
        return 1
    checked = len(flatten(committed))
    print(
        f"photoprep verify: ok: {checked} figures of {PATHS.eval_metrics} reproduced "
        f"(tolerance {eval_tol:g}), "
        f"test split {_short(test.fingerprint)}" + (", retrained on the CPU" if retrain else "")
    )
    return 0


def _retrain(
    paths: Layout, meta: dict[str, Any], committed: dict[str, Any], eval_params: Any, tolerance: float | None
) -> list[str]:
    on_cpu = meta.get("trained_on") == "cpu"
    tol = tolerance if tolerance is not None else (0.0 if on_cpu else CUDA_RETRAIN_TOLERANCE)
    changes: dict[str, Any] = {"device": "cpu", "resume": False}
    init_from = meta["params"].get("init_from")
    if init_from and not Path(init_from).is_absolute():
        changes["init_from"] = str(paths.root / init_from)  # the stage ran from the repository root
    p = TrainParams.model_validate(meta["params"] | changes)
    if p.nproc > 1:  # DDP: another trajectory than one process's, even with the same effective batch
        return [
            f"--retrain: {paths.model} was trained by {p.nproc} DDP ranks; "
            "retraining runs one process, which gives other weights: not checked"
        ]
    data = load_data(p, paths)
    print(f"photoprep verify: retraining {p.model} on the CPU ({p.epochs} epochs at most)...")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(int(meta.get("cpu_threads") or threads))
        with tempfile.TemporaryDirectory(prefix="photoprep-verify-") as tmp:
            result = train.fit(data, p, checkpoint_dir=Path(tmp) / "checkpoints")
    finally:
        torch.set_num_threads(threads)
    model, fresh_meta = _as_model(result)
    test = _load_test_unchecked(paths, fresh_meta)
    now = evaluate.evaluate(model, fresh_meta, test, eval_params.model_copy(update={"device": "cpu"})).metrics
    failures = []
    diff = compare_metrics(committed, now, tol)
    if diff:
        failures.append(f"retraining on the CPU gives other metrics (tolerance {tol:g}):")
        failures += [f"    {line}" for line in diff]
    if on_cpu and tol == 0:
        state, _ = read_model_file(paths.model)
        fresh = result.state_dict
        differ = sorted(k for k in state if k not in fresh or not torch.equal(state[k], fresh[k]))
        if differ:
            failures.append(
                f"retraining on the CPU gives other weights: {len(differ)} of {len(state)} tensors differ"
            )
            failures += [f"    ~ {k}" for k in differ[:10]]
    return failures


def _load_test_unchecked(paths: Layout, meta: dict[str, Any]) -> SplitData:
    """The test split with its recomputed fingerprint, compared by the caller, not here."""
    classes = check_classes(meta["classes"], read_splits_report(paths.splits_report), PATHS)
    return load_split("test", meta["input"], classes, paths)


def _as_model(result: train.TrainResult) -> tuple[torch.nn.Module, dict[str, Any]]:
    model = models.build_model(**result.meta["architecture"])
    model.load_state_dict(result.state_dict)
    return model.eval(), result.meta
