"""The `photoprep` command: tools around the pipeline (the pipeline itself runs with `dvc repro`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from photoprep import params
from photoprep.params import UserError


def _check_params(args: argparse.Namespace) -> None:
    loaded = params.load(args.params)
    print(f"{args.params}: ok ({', '.join(loaded.sources)} enabled)")


def _export(args: argparse.Namespace) -> None:
    import json

    import numpy as np
    import pandas as pd

    from photoprep import export

    split_path = Path(args.data) / "splits" / f"{args.split}.parquet"
    if not split_path.exists():
        raise UserError(f"{split_path} not found (run `dvc repro` first)")
    table = pd.read_parquet(split_path)
    images = np.load(Path(args.data) / "processed" / "images.npy", mmap_mode="r")
    classes = json.loads(Path(args.splits_report).read_text(encoding="utf-8"))["classes"]
    out = export.export_split(table, images, Path(args.out), args.format, classes, overwrite=args.overwrite)
    print(f"wrote {len(table)} images of split '{args.split}' to {out}")


def _demo(args: argparse.Namespace) -> None:
    from photoprep import demo

    counts = demo.render_demo(Path(args.out), seed=args.seed)
    print(f"rendered the demo source into {args.out}: {counts}")


def _verify(args: argparse.Namespace) -> None:
    from photoprep import verify

    code = verify.verify(retrain=args.retrain, tolerance=args.tolerance)
    if code:
        sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="photoprep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("params", help="validate params.yaml")
    check.add_argument("--params", default="params.yaml")
    check.set_defaults(func=_check_params)

    exp = sub.add_parser("export", help="write a split for tools outside the pipeline (no pickles)")
    exp.add_argument("--split", default="train", choices=["train", "val", "test", "unlabeled"])
    exp.add_argument("--format", default="imagefolder", choices=["imagefolder", "npz"])
    exp.add_argument("--data", default="data", help="the pipeline's data folder")
    exp.add_argument("--splits-report", default="reports/splits.json")
    exp.add_argument("--overwrite", action="store_true")
    exp.add_argument("out")
    exp.set_defaults(func=_export)

    demo = sub.add_parser("demo", help="re-render the embedded demo source (deterministic)")
    demo.add_argument("out", nargs="?", default="pipeline/sources/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    ver = sub.add_parser(
        "verify", help="re-evaluate the committed model on the committed test split and compare metrics"
    )
    ver.add_argument("--retrain", action="store_true", help="also re-run training on the CPU and compare")
    ver.add_argument("--tolerance", type=float, default=None, help="largest metric difference (0 on CPU)")
    ver.set_defaults(func=_verify)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"photoprep: {exc}", file=sys.stderr)
        sys.exit(1)
