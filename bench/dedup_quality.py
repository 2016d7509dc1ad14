"""Benchmark: how well dedup finds edited copies of real photographs, and which copy it keeps.

Run with ``python bench/dedup_quality.py`` (tables), ``--json`` (one JSON object), and
``--plot PATH`` (precision and recall against the threshold, one line per hash).

The photographs are the real ones that installed packages ship: scikit-image's `skimage.data`
(astronaut, coffee, chelsea, rocket, retina, the Hubble deep field, ...), scikit-learn's
`load_sample_images` (china, flower) and matplotlib's sample Grace Hopper portrait. Each is
saved as a camera would (JPEG quality 95 with Make, Model and DateTimeOriginal in EXIF): the
original. Its edited copies, saved as other tools would (no camera EXIF):

- reencode (JPEG quality 70), resize (half size), thumbnail (160 px on the longer side),
  crop (2 to 9 % off each side, each side within 1 % of the others), caption (a white band
  with text over the bottom 5 to 12 %), grey, brighten (x1.25), exif_rotate (the pixels
  turned, with an orientation tag that turns them back, camera EXIF kept, quality 90): the
  *edits* that dedup must find. The crop and band sizes are drawn per photograph from a
  generator seeded by its name, so they differ between photographs and not between runs;
- hflip, rot90, rot180: the *transforms*, found only with `dedup.transforms`;
- corner_crop (10 % off the left and the top only): a *limit*, reported, not counted in the
  recall: the hashes see the whole picture, and an off-centre crop moves all of it.

The keep rule is measured on copies that state as much as the original or more (`KEEP_COPIES`,
made from the camera original's file: an RGBA PNG and a 16-bit PNG of its pixels, a brightened
copy at quality 98, a brightened copy at quality 95 with the camera EXIF copied), and on lossless
originals (an 8-bit PNG without EXIF, for the photographs whose shipped file never went through
JPEG) with a 16-bit up-converted and a brightened PNG of them (`LOSSLESS_COPIES`), each group
with the edits above: the share of groups whose kept copy is the untouched original, for each
`dedup.keep`, and every group that kept another copy, with the criterion it won on.
``--keep-only`` prints just that.

Every image goes through the pipeline's own code (`probe.probe`, `provenance.provenance`,
`dedup.find_duplicates`). Figures per hash and threshold: recall (edited copies grouped with
their original), precision (pairs of images grouped together that show the same photograph) and
the number of groups that mix two photographs; then the keep rule, the verification step, and
transforms.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from photoprep.core.params import DedupParams
from photoprep.images import dedup, keep
from photoprep.images.probe import ProbeSpec, probe_many
from photoprep.images.provenance import ProvenanceSpec, provenance

EDITS = ("reencode", "resize", "thumbnail", "crop", "caption", "grey", "brighten", "exif_rotate")
LIMITS = ("corner_crop",)
TRANSFORM_EDITS = {"hflip": "hflip", "rot90": "rot90", "rot180": "rot180"}
HASHES = (("phash", 8), ("dhash", 8), ("whash", 8), ("phash", 16), ("dhash", 16), ("whash", 16))


def photographs() -> dict[str, np.ndarray]:
    """Real photographs shipped inside installed wheels, as uint8 RGB or grey arrays."""
    from matplotlib import cbook
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = [
        "astronaut",
        "brick",
        "camera",
        "cell",
        "chelsea",
        "clock",
        "coffee",
        "coins",
        "grass",
        "gravel",
        "hubble_deep_field",
        "immunohistochemistry",
        "microaneurysms",
        "moon",
        "page",
        "retina",
        "rocket",
        "stereo_motorcycle",  # its left view
        "text",
    ]
    photos: dict[str, np.ndarray] = {}
    for name in names:
        loaded = getattr(data, name)()
        photos[name.removeprefix("stereo_")] = loaded[0] if isinstance(loaded, tuple) else loaded
    samples = load_sample_images()
    for path, image in zip(samples.filenames, samples.images, strict=True):
        photos[Path(path).stem] = image
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos["grace_hopper"] = np.asarray(Image.open(handle).convert("RGB"))
    return {name: np.ascontiguousarray(pixels.astype(np.uint8)) for name, pixels in sorted(photos.items())}


def _camera_exif(orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Nikon", "D90"
    exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x9003] = "2024:05:01 10:00:00"
    return exif.tobytes()


def _jpeg(im: Image.Image, quality: int, exif: bytes | None = None) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality, **({"exif": exif} if exif else {}))
    return out.getvalue()


def _caption(im: Image.Image, share: float) -> Image.Image:
    captioned = im.convert("RGB")
    draw = ImageDraw.Draw(captioned)
    band = max(12, round(im.height * share))
    draw.rectangle((0, im.height - band, im.width, im.height), fill="white")
    draw.text(
        (6, im.height - band + 2), "Heritage Observatory, 1962", fill="black", font=ImageFont.load_default()
    )
    return captioned


def variants(pixels: np.ndarray, name: str) -> dict[str, bytes]:
    """The original (a camera JPEG) and every edited and transformed copy of one photograph."""
    im = Image.fromarray(pixels)
    w, h = im.size
    thumb = im.copy()
    thumb.thumbnail((160, 160), Image.Resampling.LANCZOS)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big"))
    share = rng.uniform(0.02, 0.09)
    left, top, right, bottom = (share + rng.uniform(-0.01, 0.01, size=4)).tolist()
    crop_box = (round(w * left), round(h * top), w - round(w * right), h - round(h * bottom))
    band = float(rng.uniform(0.05, 0.12))
    edits: dict[str, Callable[[], bytes]] = {
        "original": lambda: _jpeg(im, 95, _camera_exif()),
        "reencode": lambda: _jpeg(im, 70),
        "resize": lambda: _jpeg(im.resize((w // 2, h // 2), Image.Resampling.LANCZOS), 90),
        "thumbnail": lambda: _jpeg(thumb, 85),
        "crop": lambda: _jpeg(im.crop(crop_box), 90),
        "caption": lambda: _jpeg(_caption(im, band), 90),
        "grey": lambda: _jpeg(im.convert("L"), 90),
        "brighten": lambda: _jpeg(ImageEnhance.Brightness(im).enhance(1.25), 90),
        # Stored turned a quarter clockwise... tagged 8 (turn anticlockwise to view): upright again.
        "exif_rotate": lambda: _jpeg(im.transpose(Image.Transpose.ROTATE_270), 90, _camera_exif(8)),
        "hflip": lambda: _jpeg(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 90),
        "rot90": lambda: _jpeg(im.transpose(Image.Transpose.ROTATE_90), 90),
        "rot180": lambda: _jpeg(im.transpose(Image.Transpose.ROTATE_180), 90),
        "corner_crop": lambda: _jpeg(im.crop((w // 10, h // 10, w, h)), 90),
    }
    return {name: build() for name, build in edits.items()}


@dataclass
class Collection:
    """Every image of the benchmark: photo, edit, bytes."""

    rows: pd.DataFrame  # photo, edit, id
    payloads: list[bytes]


def collection() -> Collection:
    rows, payloads = [], []
    for photo, pixels in photographs().items():
        for edit, payload in variants(pixels, photo).items():
            rows.append({"photo": photo, "edit": edit, "id": f"{photo}/{edit}"})
            payloads.append(payload)
    return Collection(pd.DataFrame(rows), payloads)


def probed(images: Collection, p: DedupParams) -> pd.DataFrame:
    """The table find_duplicates reads, from the pipeline's probe of every payload."""
    records = probe_many(images.payloads, ProbeSpec.from_dedup(p))
    table = pd.concat([images.rows, pd.DataFrame(records)], axis=1)
    table["source"], table["status"] = "bench", "ok"
    table["sha256"] = [hashlib.sha256(p).hexdigest() for p in images.payloads]
    return table


def score(table: pd.DataFrame, params: DedupParams, evaluated: tuple[str, ...]) -> dict:
    """Recall of the evaluated edits, pair precision, mixed groups and the keep rule's hits."""
    result = dedup.find_duplicates(table[table["edit"].isin(("original", *evaluated))], params).table
    groups = result.groupby("group")
    mixed = int((groups["photo"].nunique() > 1).sum())
    together = same = 0
    for _, members in groups:
        k = len(members)
        together += k * (k - 1) // 2
        same += int(sum(c * (c - 1) // 2 for c in members["photo"].value_counts()))
    original_group = result[result["edit"] == "original"].set_index("photo")["group"]
    copies = result[result["edit"] != "original"]
    found = copies["group"].to_numpy() == original_group.loc[copies["photo"]].to_numpy()
    kept = result[(result["dup_of"] == "") & result["group"].isin(original_group)]
    with_copies = kept[kept["group"].map(groups.size()) > 1]
    return {
        "recall": round(float(found.mean()), 4),
        "precision": round(same / together, 4) if together else 1.0,
        "mixed_groups": mixed,
        "kept_original": round(float((with_copies["edit"] == "original").mean()), 4),
        "missed": sorted(copies.loc[~found, "id"]),
    }


def run(max_threshold: int = 40) -> dict:
    images = collection()
    figures: dict = {"photos": images.rows["photo"].nunique(), "images": len(images.rows), "hashes": []}
    tables = {}
    for hash_name, size in HASHES:
        table = probed(images, DedupParams(hash=hash_name, hash_size=size))
        tables[(hash_name, size)] = table
        bits = size * size
        for threshold in range(0, min(max_threshold, bits // 2) + 1, 1 if size == 8 else 4):
            s = score(table, DedupParams(hash=hash_name, hash_size=size, near_threshold=threshold), EDITS)
            figures["hashes"].append({"hash": hash_name, "size": size, "threshold": threshold, **s})
    figures["defaults"] = defaults(tables[("phash", 8)])
    figures["margins"] = margins(images)
    figures["keep"] = keep_rule()
    figures["verify"] = verification(tables[("phash", 8)])
    figures["transforms"] = transforms(images)
    return figures


def defaults(table: pd.DataFrame) -> dict:
    """At the default params: the score, the recall of each edit and of the limits."""
    p = DedupParams()
    s = score(table, p, EDITS)
    missed = {edit: sum(m.endswith(f"/{edit}") for m in s["missed"]) for edit in EDITS}
    n = table["photo"].nunique()
    limits = {edit: score(table, p, (edit,))["recall"] for edit in LIMITS}
    return {**s, "per_edit": {edit: round(1 - missed[edit] / n, 4) for edit in EDITS}, "limits": limits}


MARGINS = (0.0, 0.06, 0.1, 0.12)
CROPS = ((), (0.05,), (0.03, 0.06), (0.03, 0.06, 0.09))


def margins(images: Collection) -> list[dict]:
    """Recall and precision at the default hash and threshold for each margin and crop set
    (each probed on its own: the deepest trim sets the decode scale, so hashes depend on it)."""
    rows = []
    for margin in MARGINS:
        for crops in CROPS:
            p = DedupParams(margin=margin, crops=list(crops))
            s = score(probed(images, p), p, EDITS)
            rows.append(
                {
                    "margin": margin,
                    "crops": list(crops),
                    **{k: s[k] for k in ("recall", "precision", "mixed_groups")},
                }
            )
    return rows


def best_thresholds(figures: dict) -> list[dict]:
    """Per hash: the largest threshold with precision 1.0, and its recall."""
    out = []
    frame = pd.DataFrame(figures["hashes"])
    for (hash_name, size), rows in frame.groupby(["hash", "size"], sort=False):
        clean = rows[rows["precision"] == 1.0]
        best = clean.sort_values(["recall", "threshold"], ascending=[False, True]).iloc[0]
        out.append(
            {
                "hash": hash_name,
                "size": size,
                "threshold": int(best["threshold"]),
                "recall": float(best["recall"]),
                "first_mix_at": int(rows.loc[rows["precision"] < 1.0, "threshold"].min())
                if (rows["precision"] < 1.0).any()
                else None,
            }
        )
    return out


DEFAULT_THRESHOLD = DedupParams().near_threshold


KEEP_COPIES = ("png", "png16", "brighten_hq", "brighten_exif")
"""Copies made from the camera original's file that the keep rule must tell from it: an RGBA PNG
and a 16-bit PNG of its pixels (lossless files with a JPEG history), a brightened copy re-saved at
quality 98 (above the original's 95), and a brightened copy at quality 95 with the camera EXIF
copied (equal to the original on every fact a file states)."""
LOSSLESS_COPIES = ("png16", "brighten_png")
"""Copies of a lossless original (an 8-bit PNG, no EXIF): a 16-bit PNG up-converted from it, and a
brightened PNG (equal to the original on every fact a file states)."""


def _png(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def _png16(pixels: np.ndarray) -> bytes:
    """8-bit RGB up-converted to a 16-bit PNG (v * 257), as image tools do; OpenCV writes it."""
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(pixels[..., ::-1]).astype(np.uint16) * 257)
    assert ok
    return encoded.tobytes()


def keep_copies(original: bytes) -> dict[str, bytes]:
    """`KEEP_COPIES` of a camera original, made from its decoded pixels."""
    decoded = Image.open(io.BytesIO(original)).convert("RGB")
    brighter = ImageEnhance.Brightness(decoded).enhance(1.25)
    return {
        "png": _png(decoded.convert("RGBA")),
        "png16": _png16(np.asarray(decoded)),
        "brighten_hq": _jpeg(brighter, 98),
        "brighten_exif": _jpeg(brighter, 95, _camera_exif()),
    }


def keep_collections() -> dict[str, Collection]:
    """Per kind of original, every photograph's original, its edits and its keep copies:
    ``camera`` (a camera JPEG, `KEEP_COPIES`) and ``lossless`` (an 8-bit PNG, `LOSSLESS_COPIES`).

    A lossless original is a picture that never went through JPEG: photographs whose shipped
    file shows a JPEG history (a sample saved as JPEG once, then as PNG) take part as camera
    originals only; a PNG of them is what the keep rule ranks as the JPEG it came from."""
    kinds: dict[str, tuple[list, list]] = {"camera": ([], []), "lossless": ([], [])}
    for photo, pixels in photographs().items():
        edited = {e: b for e, b in variants(pixels, photo).items() if e in ("original", *EDITS)}
        rgb = Image.fromarray(pixels).convert("RGB")
        lossless = {
            "png16": _png16(np.asarray(rgb)),
            "brighten_png": _png(ImageEnhance.Brightness(rgb).enhance(1.25)),
        }
        members = {"camera": edited | keep_copies(edited["original"])}
        shipped = _png(Image.fromarray(pixels))
        if provenance(shipped)[0]["history"] == 0:
            members["lossless"] = edited | {"original": shipped} | lossless
        for kind, payloads in members.items():
            rows, blobs = kinds[kind]
            for edit, payload in payloads.items():
                rows.append({"photo": photo, "edit": edit, "id": f"{photo}/{edit}", "payload": len(blobs)})
                blobs.append(payload)
    return {kind: Collection(pd.DataFrame(rows), blobs) for kind, (rows, blobs) in kinds.items()}


def evidence_of(images: Collection, spec: ProvenanceSpec) -> keep.Evidence:
    """The keep rule's evidence for rows of `images`' table: each payload's provenance."""

    def evidence(rows: pd.DataFrame) -> pd.DataFrame:
        found = [provenance(images.payloads[i], spec) for i in rows["payload"]]
        facts = pd.DataFrame([facts for facts, _ in found], index=rows.index)
        return facts.assign(thumb=[thumb.tobytes() for _, thumb in found])

    return evidence


def keep_rule(threshold: int = DEFAULT_THRESHOLD) -> dict:
    """The share of groups whose kept copy is the untouched original, per kind of original and
    `dedup.keep`, and every group that kept another copy (which, and on what it won)."""
    out: dict = {"threshold": threshold, "kinds": {}}
    for kind, images in keep_collections().items():
        p = DedupParams(near_threshold=threshold)
        table = probed(images, p)
        figures = {}
        for rule in ("best", "largest", "first"):
            params = p.model_copy(update={"keep": rule})
            evidence = evidence_of(images, ProvenanceSpec(p.margin)) if rule == "best" else None
            result = dedup.find_duplicates(table, params, evidence=evidence).table
            kept = result[
                (result["dup_of"] == "") & result["group"].map(result["group"].value_counts()).gt(1)
            ]
            figures[rule] = {
                "groups": len(kept),
                "kept_original": int((kept["edit"] == "original").sum()),
                "missed": sorted(
                    f"{r.photo}: {r.edit} ({r.keep_reason})"
                    for r in kept.itertuples()
                    if r.edit != "original"
                ),
            }
        out["kinds"][kind] = figures
    best = [f["best"] for f in out["kinds"].values()]
    out["kept_original"] = round(
        sum(f["kept_original"] for f in best) / max(1, sum(f["groups"] for f in best)), 4
    )
    return out


def verification(table: pd.DataFrame) -> list[dict]:
    rows = []
    for threshold in (4, 8, 12, 16, 20, 24):
        for verify in (None, 48, 64, 80, 96):
            params = DedupParams(near_threshold=threshold, verify_threshold=verify)
            s = score(table, params, EDITS)
            rows.append(
                {
                    "threshold": threshold,
                    "verify_threshold": verify,
                    **{k: s[k] for k in ("recall", "precision", "mixed_groups")},
                }
            )
    return rows


def transforms(images: Collection, threshold: int = DEFAULT_THRESHOLD) -> list[dict]:
    table = probed(images, DedupParams(transforms=["hflip", "rot90", "rot180", "rot270"]))
    rows = []
    for enabled in ((), ("hflip", "rot90", "rot180", "rot270")):
        params = DedupParams(near_threshold=threshold, transforms=list(enabled))
        s = score(table, params, tuple(TRANSFORM_EDITS))
        result = dedup.find_duplicates(
            table[table["edit"].isin(("original", *TRANSFORM_EDITS))], params
        ).table
        reasons = result.loc[result["dup_reason"] != "", ["edit", "dup_reason"]].value_counts().to_dict()
        rows.append(
            {
                "transforms": list(enabled),
                "recall": s["recall"],
                "precision": s["precision"],
                "mixed_groups": s["mixed_groups"],
                "reasons": {f"{edit}->{reason}": int(n) for (edit, reason), n in sorted(reasons.items())},
            }
        )
    return rows


def plot(figures: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(figures["hashes"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (hash_name, size), rows in frame.groupby(["hash", "size"], sort=False):
        label = f"{hash_name} {size}"
        axes[0].plot(rows["threshold"] / size**2, rows["recall"], label=label)
        axes[1].plot(rows["threshold"] / size**2, rows["precision"], label=label)
    for ax, name in zip(axes, ("recall of edited copies", "pair precision"), strict=True):
        ax.set_xlabel("threshold / hash bits")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"dedup on {figures['photos']} real photographs, {figures['images']} images")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def print_keep(figures: dict) -> None:
    k = figures["keep"]
    print(
        f"\nkeep rule (phash 8, threshold {k['threshold']}): groups whose kept copy is the untouched original"
    )
    for kind, rules in k["kinds"].items():
        line = ", ".join(f"keep={r} {f['kept_original']}/{f['groups']}" for r, f in rules.items())
        print(f"  {kind} originals: {line}")
        for miss in rules["best"]["missed"]:
            print(f"    best kept another copy: {miss}")
    print(f"  keep=best over both: {k['kept_original']:.1%}")


def print_tables(figures: dict) -> None:
    print(f"{figures['photos']} photographs, {figures['images']} images (originals, edits, transforms)\n")
    print("largest threshold with precision 1.0 per hash:")
    print("| hash | size | threshold | recall | first threshold mixing photos |")
    print("|---|---|---|---|---|")
    for row in best_thresholds(figures):
        print(
            f"| {row['hash']} | {row['size']} | {row['threshold']} | {row['recall']:.3f} "
            f"| {row['first_mix_at']} |"
        )
    print("\nphash 8 by threshold:")
    print("| threshold | recall | precision | mixed groups | kept original | missed |")
    print("|---|---|---|---|---|---|")
    for row in figures["hashes"]:
        if row["hash"] == "phash" and row["size"] == 8 and row["threshold"] <= 24:
            missed = ", ".join(row["missed"][:4]) + (" ..." if len(row["missed"]) > 4 else "")
            print(
                f"| {row['threshold']} | {row['recall']:.3f} | {row['precision']:.3f} | "
                f"{row['mixed_groups']} | {row['kept_original']:.3f} | {missed} |"
            )
    d = figures["defaults"]
    print(
        f"\nat the defaults: recall {d['recall']:.3f}, precision {d['precision']:.3f}, "
        f"{d['mixed_groups']} mixed groups; recall per edit: "
        + ", ".join(f"{edit} {r:.2f}" for edit, r in d["per_edit"].items())
    )
    print("  limits (not in the recall): " + ", ".join(f"{e} {r:.2f}" for e, r in d["limits"].items()))
    print("\nmargin and crops (phash 8, threshold 4):")
    print("| margin | crops | recall | precision | mixed groups |")
    print("|---|---|---|---|---|")
    for row in figures["margins"]:
        print(
            f"| {row['margin']} | {row['crops'] or 'off'} | {row['recall']:.3f} | {row['precision']:.3f} "
            f"| {row['mixed_groups']} |"
        )
    print_keep(figures)
    print("\nverification by the 256-bit fine hash (phash 8):")
    print("| threshold | verify_threshold | recall | precision | mixed groups |")
    print("|---|---|---|---|---|")
    for row in figures["verify"]:
        print(
            f"| {row['threshold']} | {row['verify_threshold']} | {row['recall']:.3f} | "
            f"{row['precision']:.3f} | {row['mixed_groups']} |"
        )
    print(f"\nmirrors and rotations (phash 8, threshold {DEFAULT_THRESHOLD}):")
    for row in figures["transforms"]:
        print(
            f"  transforms={row['transforms'] or 'off'}: recall {row['recall']:.3f}, "
            f"precision {row['precision']:.3f}, {row['reasons']}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    parser.add_argument("--plot", help="write precision and recall against the threshold to this PNG")
    parser.add_argument("--keep-only", action="store_true", help="only the keep rule's figures")
    args = parser.parse_args(argv)
    if args.keep_only:
        figures = {"keep": keep_rule()}
        print(json.dumps(figures, indent=1) if args.json else "", end="")
        if not args.json:
            print_keep(figures)
        return
    figures = run()
    if args.plot:
        plot(figures, args.plot)
    if args.json:
        json.dump(figures, sys.stdout, indent=1)
        print()
    else:
        print_tables(figures)


if __name__ == "__main__":
    main()
