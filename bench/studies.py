"""The seeds' studies, reproduced on the demo: one table of test accuracy, epochs, parameters, time.

    python bench/studies.py [--epochs 5] [--rows mlp-features mlp-pixels ...] [--json]

Builds the demo pipeline up to ``split`` in a temporary folder (the stage scripts, no DVC), twice:
rendering A is the embedded demo (``pipeline/sources/demo``), rendering B the same digits drawn
again with other backgrounds and offsets (``demo.render_demo(seed=1)``). Then each row trains
on A's train split with the library's own ``train.fit`` (val picks the best epoch) and scores
the model on A's test split with ``evaluate.evaluate``, as the train and evaluate stages do.

Rows (every one ``--epochs`` epochs, the defaults of params.yaml otherwise):
    mlp-features     the mlp on the HOG + Cr/Cb features (the default input of the mlp)
    mlp-pixels       the mlp on the pixels (``train.input: images``): an ANN on raw images
    convnet          the default convnet (ReLU, dropout 0.2), from scratch: the baseline
    sigmoid          the convnet with sigmoid activations
    dropout-0        the convnet without dropout
    dropout-0.5      the convnet with dropout 0.5
    transfer-frozen  pretrained on rendering B, the first 2 blocks frozen for the first
                     ``epochs - 2`` epochs, then every layer fine-tuned for 2 epochs at lr/10
    transfer-all     pretrained on rendering B, every layer fine-tuned for ``epochs`` epochs
    timm-scratch     timm's ResNet-18 (``train.model: timm/resnet18``) from scratch
    timm-pretrained  the same from weights pretrained on renderings B, C and D (``photoprep pretrain``,
                     the stand-in for ImageNet): every layer fine-tuned
    timm-head-first  the same: the classifier alone for 2 epochs, then every layer with the
                     backbone at lr/10 (``train.head_epochs``, ``train.backbone_lr_scale``)
    timm-head-only   the same, only the classifier trained (every other layer group frozen)

The split is by a hash of (source, id) and both renderings share their ids, so B's train and
val images are drawings of A's train and val digits only: no test digit is seen in
pretraining (checked). The pretraining times are reported apart, not in the rows:
``--pretrain-epochs`` epochs of the timm model on B (``demo.pretrain_standin``, val picks the
epoch), the convnet's as its rows' ``--epochs``.

Wall time: seconds of ``train.fit`` on this machine, torch's CPU math pinned as the pipeline
pins it (``compute.cpu_math: portable``, 2 threads). ``vs_convnet``: the row's test accuracy minus the
baseline's, and its time over the baseline's, both from the same run. ``--json`` prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from photoprep import portable

portable.pin_cpu_math("portable", threads=2)  # before torch loads, as the stages do

import pandas as pd  # noqa: E402

from photoprep import demo  # noqa: E402
from photoprep.core import params  # noqa: E402
from photoprep.core.layout import Layout  # noqa: E402
from photoprep.learn import checkpoint, evaluate, optim, pretrained, train  # noqa: E402
from photoprep.learn.data import load_data  # noqa: E402

TIMM = "timm/resnet18"
REPO = Path(__file__).resolve().parents[1]
PREP_STAGES = (["download", "demo"], ["dedup"], ["validate"], ["bucket"], ["features"], ["split"])
ROWS = {
    "mlp-features": ("ANN (mlp) on the HOG + Cr/Cb features", {"model": "mlp"}),
    "mlp-pixels": ("ANN (mlp) on the pixels", {"model": "mlp", "input": "images"}),
    "convnet": ("ConvNet, ReLU, dropout 0.2, from scratch", {}),
    "sigmoid": ("ConvNet, sigmoid", {"activation": "sigmoid"}),
    "dropout-0": ("ConvNet, dropout 0", {"dropout": 0.0}),
    "dropout-0.5": ("ConvNet, dropout 0.5", {"dropout": 0.5}),
    "transfer-frozen": ("ConvNet from rendering B: 2 blocks frozen, then all fine-tuned", {}),
    "transfer-all": ("ConvNet from rendering B: all layers fine-tuned", {}),
    "timm-scratch": ("timm ResNet-18, from scratch", {"model": TIMM}),
    "timm-pretrained": ("timm ResNet-18 from renderings B-D: all layers fine-tuned", {"model": TIMM}),
    "timm-head-first": (
        "timm ResNet-18 from renderings B-D: head 2 epochs, then all at backbone lr/10",
        {"model": TIMM, "head_epochs": 2, "backbone_lr_scale": 0.1},
    ),
    "timm-head-only": ("timm ResNet-18 from renderings B-D: head only", {"model": TIMM, "freeze": 5}),
}
FINE_TUNE_EPOCHS = 2
FROZEN_BLOCKS = 2
STANDIN = "resnet18-b.safetensors"
# timm-head-only freezes 5 layer groups of the ResNet-18: its stem and four stages, all but the head.


def build_project(root: Path, seed: int) -> Layout:
    """The demo pipeline up to split in ``root``: rendering ``seed`` (0: the embedded demo)."""
    for name in ("stages", "pipeline"):
        shutil.copytree(REPO / name, root / name)
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    if seed:
        source = root / "pipeline" / "sources" / "demo"
        shutil.rmtree(source)
        demo.render_demo(source, seed=seed)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("PHOTOPREP_CACHE", None)
    for stage in PREP_STAGES:
        script = str(root / "stages" / f"{stage[0]}.py")
        subprocess.run(
            [sys.executable, script, *stage[1:]], cwd=root, env=env, check=True, capture_output=True
        )
    return Layout(root)


def test_ids_unseen(a: Layout, b: Layout) -> bool:
    """No image of A's test split has its id in B's train or val split."""
    test = pd.read_parquet(a.split_table("test"))
    seen = pd.concat([pd.read_parquet(b.split_table(s)) for s in ("train", "val")])
    return not set(zip(test["source"], test["id"], strict=True)) & set(
        zip(seen["source"], seen["id"], strict=True)
    )


def fit(layout: Layout, changes: dict[str, Any], out: Path) -> tuple[dict[str, Any], float]:
    """Train with the params of params.yaml plus ``changes`` on ``layout``; the model file goes
    to ``out``. Returns the model's metadata and the seconds of training."""
    p = params.load(REPO / "params.yaml").train.model_copy(update=changes)
    p = type(p).model_validate(p.model_dump())  # validated, as a params.yaml would be
    data = load_data(p, layout)
    start = None
    if p.pretrained:  # as the pretrained stage does, into the project's models/pretrained/
        pretrained.fetch(pretrained.resolve(p, layout), layout)
        start = pretrained.load_fetched(p, layout)
    started = time.perf_counter()
    result = train.fit(data, p, pretrained=start)
    seconds = time.perf_counter() - started
    checkpoint.save_model(result.state_dict, result.meta, out)
    return result.meta, seconds


def score(layout: Layout, model_path: Path) -> float:
    model, meta = checkpoint.load_model(model_path)
    test = evaluate.load_test(meta, layout)
    result = evaluate.evaluate(model, meta, test, params.load(REPO / "params.yaml").evaluate)
    return float(result.metrics["accuracy"])


def run_row(name: str, epochs: int, a: Layout, convnet_b: Path | None, work: Path) -> dict[str, Any]:
    label, changes = ROWS[name]
    base = {"epochs": epochs, "device": "cpu", **changes}
    model_path = work / f"{name}.pt"
    if name == "transfer-all":
        base |= {"init_from": str(convnet_b)}
    if name.startswith("timm-") and name != "timm-scratch":
        base |= {"pretrained": str(a.local_weights_dir / STANDIN)}
    if name == "transfer-frozen":
        frozen = base | {
            "epochs": epochs - FINE_TUNE_EPOCHS,
            "init_from": str(convnet_b),
            "freeze": FROZEN_BLOCKS,
        }
        meta1, s1 = fit(a, frozen, work / "frozen.pt")
        lr = optim.peak_lr(params.load(REPO / "params.yaml").train) / 10
        tune = base | {"epochs": FINE_TUNE_EPOCHS, "init_from": str(work / "frozen.pt"), "lr": lr}
        meta, s2 = fit(a, tune, model_path)
        epochs_run = f"{meta1['epochs_run']} + {meta['epochs_run']}"
        seconds = s1 + s2
    else:
        meta, seconds = fit(a, base, model_path)
        epochs_run = str(meta["epochs_run"])
    return {
        "row": name,
        "model": label,
        "test_accuracy": round(score(a, model_path), 4),
        "epochs": epochs_run,
        "parameters": int(meta["parameters"]),
        "train_seconds": round(seconds, 1),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| model | test accuracy | epochs | parameters | train time (s) | vs convnet (acc, time) |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        vs = r.get("vs_convnet") or {}
        rel = f"{vs['accuracy']:+.3f}, x{vs['time']:.2f}" if vs else ""
        lines.append(
            f"| {r['model']} | {r['test_accuracy']:.3f} | {r['epochs']} | {r['parameters']:,} | "
            f"{r['train_seconds']:.0f} | {rel} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5, help="epochs of every row (early stopping stays on)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--pretrain-epochs", type=int, default=20, help="timm model epochs on renderings B-D")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.epochs <= FINE_TUNE_EPOCHS and "transfer-frozen" in args.rows:
        ap.error(f"transfer-frozen needs --epochs > {FINE_TUNE_EPOCHS}")
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"epochs": args.epochs, "cpu": portable.describe()}
    with tempfile.TemporaryDirectory(prefix="photoprep-studies-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        a = build_project(work / "a", seed=0)
        out["prepare_seconds"] = round(time.perf_counter() - started, 1)
        convnet_b = None
        if any(r.startswith("transfer") for r in args.rows):
            b = build_project(work / "b", seed=1)
            out["test_digits_unseen_in_pretraining"] = test_ids_unseen(a, b)
            meta, seconds = fit(b, {"epochs": args.epochs, "device": "cpu"}, work / "pretrained.pt")
            convnet_b = work / "pretrained.pt"
            out["pretrain"] = {
                "rendering": "B (demo.render_demo seed=1)",
                "epochs": meta["epochs_run"],
                "train_seconds": round(seconds, 1),
                "test_accuracy_on_b": round(score(b, convnet_b), 4),
            }
        if any(r.startswith("timm-") and r != "timm-scratch" for r in args.rows):
            started = time.perf_counter()
            weights = a.local_weights_dir / STANDIN
            standin = demo.Standin(TIMM, epochs=args.pretrain_epochs)
            done = demo.pretrain_standin(standin, weights, paths=a)
            out["pretrain_timm"] = {
                "model": TIMM,
                "renderings": f"demo.render_demo seeds {list(standin.seeds)} (B, C, D)",
                "epochs": args.pretrain_epochs,
                "train_seconds": round(time.perf_counter() - started, 1),
                "val_accuracy_on_them": done["val_accuracy"],
            }
        for name in args.rows:
            rows.append(run_row(name, args.epochs, a, convnet_b, work))
            print(f"studies: {rows[-1]}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["row"] == "convnet"), None)
    for r in rows:
        if base is not None:
            r["vs_convnet"] = {
                "accuracy": round(r["test_accuracy"] - base["test_accuracy"], 4),
                "time": round(r["train_seconds"] / base["train_seconds"], 2)
                if base["train_seconds"]
                else None,
            }
    out["rows"] = rows
    if args.json:
        print(json.dumps(out))
        return
    print(markdown(rows))
    print()
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
