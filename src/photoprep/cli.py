"""The `photoprep` command: tools around the pipeline (the pipeline itself runs with `dvc repro`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from photoprep.core import params
from photoprep.core.errors import UserError
from photoprep.core.layout import PATHS, Layout

ROOT_HELP = "the project folder, the one holding dvc.yaml (default: the current folder)"


def _check_params(args: argparse.Namespace) -> None:
    from photoprep.ingest import sources

    loaded = params.load(args.params)
    root = Layout(Path(args.params).resolve().parent).sources_dir
    for name in loaded.sources:
        sources.load_source(name, root)
    print(f"{args.params}: ok ({', '.join(loaded.sources)} enabled, each with a valid source.yaml)")


def _export(args: argparse.Namespace) -> None:
    import pandas as pd

    from photoprep.core.chunked import ChunkedArray
    from photoprep.core.io import read_json
    from photoprep.dataset import export

    paths = Layout(Path(args.root))
    split_path = paths.split_table(args.split)
    for needed in (split_path, paths.images_array, paths.splits_report):
        if not needed.exists():
            raise UserError(f"{needed} not found (run `dvc repro` first)")
    table = pd.read_parquet(split_path)
    images = ChunkedArray(paths.images_array)
    classes = read_json(paths.splits_report)["classes"]
    out = export.export_split(table, images, Path(args.out), args.format, classes, overwrite=args.overwrite)
    print(f"wrote {len(table)} images of split '{args.split}' to {out}")


def _review_export(args: argparse.Namespace) -> None:
    from photoprep.review import export as review

    done = review.export_review(
        args.by,
        Path(args.out),
        paths=Layout(Path(args.root)),
        min_confidence=args.min_confidence,
        mode=args.mode,
        splits=args.split or None,
        overwrite=args.overwrite,
    )
    skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in done.skipped.items() if n)
    print(
        f"wrote {done.files} images in {len(done.folders)} folders to {done.out} "
        f"({done.copied} copied, {done.linked} linked{'; skipped ' + skipped if skipped else ''})"
    )
    print(
        f"review them, then copy {done.out} to {PATHS.sources_dir}/<name>/ and add <name> to `sources` "
        "in params.yaml (see its source.yaml)"
    )


def _demo(args: argparse.Namespace) -> None:
    from photoprep import demo

    counts = demo.render_demo(Path(args.out), seed=args.seed)
    print(f"rendered the demo source into {args.out}: {counts}")


def _pretrain(args: argparse.Namespace) -> None:
    from photoprep import portable

    every = params.load(PATHS.params)
    portable.pin_cpu_math(every.compute.cpu_math, every.compute.threads)  # before torch loads, as the stages
    from photoprep import demo
    from photoprep.images.resize import PixelSpec

    if not args.model.startswith("timm/"):
        raise UserError(f"photoprep pretrain: {args.model}: name a timm/<architecture>")
    size = every.train.image_size
    spec = demo.Standin(
        model=args.model,
        epochs=args.epochs,
        image_size=size if isinstance(size, tuple) else every.bucket.size,
        pixels=PixelSpec.from_params(every),  # stored as the bucket stage stores the demo
        seeds=tuple(range(1, args.renderings + 1)),
    )
    out = Path(args.out)
    done = demo.pretrain_standin(spec, out)
    print(
        f"trained {args.model} on {args.renderings} other renderings of the demo ({done['images']} images "
        f"of the train and val digits, val accuracy {done['val_accuracy']}); wrote {out} "
        f"(sha256 {done['sha256'][:12]})"
    )
    print(f"start from it: dvc exp run -S train.model={args.model} -S train.pretrained={out}")


def _verify(args: argparse.Namespace) -> None:
    from photoprep import portable

    if PATHS.params.is_file():  # as the stages do: the CPU math pinned from compute.* before torch loads
        compute = params.load(PATHS.params).compute
        portable.pin_cpu_math(compute.cpu_math, compute.threads)
    from photoprep.learn import verify

    code = verify.verify(retrain=args.retrain, tolerance=args.tolerance)
    if code:
        sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="photoprep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("params", help="validate params.yaml")
    check.add_argument("--params", default=str(PATHS.params))
    check.set_defaults(func=_check_params)

    exp = sub.add_parser("export", help="write a split for tools outside the pipeline (no pickles)")
    exp.add_argument("--split", default="train", choices=["train", "val", "test", "unlabeled"])
    exp.add_argument("--format", default="imagefolder", choices=["imagefolder", "npz"])
    exp.add_argument("--root", default=".", help=ROOT_HELP)
    exp.add_argument("--overwrite", action="store_true")
    exp.add_argument("out")
    exp.set_defaults(func=_export)

    rev = sub.add_parser("review", help="review clusters or predictions as folders, and bring them back")
    rev_sub = rev.add_subparsers(dest="review_command", required=True)
    rexp = rev_sub.add_parser(
        "export",
        help="one folder per cluster or predicted class: a folder source once reviewed",
        description=f"Write the images one folder per DEC cluster ({PATHS.clusters_table}) or per predicted "
        f"class ({PATHS.predictions_table}), with a source.yaml and review.csv. Rename, move and delete "
        f"files, then add the folder under {PATHS.sources_dir}/ and to `sources`: its folders become labels.",
    )
    rexp.add_argument("--by", required=True, choices=["cluster", "prediction"])
    rexp.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help="only images whose DEC confidence or predicted probability is at least this",
    )
    rexp.add_argument(
        "--split",
        action="append",
        choices=["train", "val", "test", "unlabeled"],
        help="only images of this split (repeatable; default: every image in the table)",
    )
    rexp.add_argument(
        "--mode",
        default="copy",
        choices=["copy", "symlink"],
        help="symlink: link to local originals (folder and file sources) instead of copying",
    )
    rexp.add_argument("--root", default=".", help=ROOT_HELP)
    rexp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    rexp.add_argument("out")
    rexp.set_defaults(func=_review_export)

    demo = sub.add_parser("demo", help="re-render the embedded demo source (deterministic)")
    demo.add_argument("out", nargs="?", default=str(PATHS.source_dir("demo")))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    pre = sub.add_parser(
        "pretrain",
        help="stand-in pretrained weights for the offline demo: a timm model trained on another rendering",
        description="Train a timm backbone on another rendering of the demo's digits (the stand-in for "
        "ImageNet, drawn for the digits of the train and val splits only) and save its weights as "
        "safetensors, for train.pretrained. Run the pipeline first (the splits say which digits).",
    )
    pre.add_argument("model", help="timm/<architecture>, e.g. timm/resnet18")
    pre.add_argument("out", help=f"the weights file, under {PATHS.local_weights_dir}/ (.safetensors)")
    pre.add_argument("--epochs", type=int, default=20, help="epochs (val picks the best; no early stop)")
    pre.add_argument(
        "--renderings", type=int, default=3, help="other renderings of the digits to train on (seeds 1..N)"
    )
    pre.set_defaults(func=_pretrain)
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


if __name__ == "__main__":
    main()
