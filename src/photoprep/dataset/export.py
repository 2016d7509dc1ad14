"""Export one split as an image folder (PNG files) or as one ``.npz`` of arrays.

``imagefolder`` writes ``out/<class>/<source>__<name>.png`` (unlabelled images under
``out/_unlabeled/``) plus ``out/manifest.csv`` (file, source, id, sha256, label, row) and
``out/classes.json`` (class names in index order and their folders). No path part comes
straight from data: a source, id or class name is reduced to ``[A-Za-z0-9._-]`` (no leading
dot, no ``..``) and, for file names always and for class folders when anything was changed,
followed by a short hash of the original text, so two ids never share a file and no id can
climb out of ``out``.

``npz`` writes arrays ``images`` (uint8 N x H x W x 3), ``labels`` (int64 index into
``classes``, -1 unlabelled), ``classes``, ``ids``, ``sources`` (unicode) and ``rows`` (int64
index into the processed arrays). The file is the layout ``np.savez`` writes (stored zip of
``.npy`` members), but with a fixed member timestamp so that two exports are byte-identical;
nothing in it needs pickle, so ``np.load(..., allow_pickle=False)`` reads it.

Both formats are built next to the target and renamed into place at the end, so a failed
export leaves no half-written output. An existing non-empty target is a UserError unless
``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from photoprep.core.chunked import ChunkedArray
from photoprep.core.errors import UserError
from photoprep.core.io import atomic_path
from photoprep.dataset.split import clean_label

FORMATS = ("imagefolder", "npz")
UNLABELED_DIR = "_unlabeled"
MANIFEST = "manifest.csv"  # every imagefolder export writes it; --overwrite replaces only such folders

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DOTS = re.compile(r"\.{2,}")
_WINDOWS_RESERVED = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(10)),
    *(f"LPT{i}" for i in range(10)),
}
_NAME_MAX = 60
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------- names


def _short_hash(*parts: str, n: int = 16) -> str:
    return hashlib.sha1("\0".join(parts).encode("utf-8")).hexdigest()[:n]


def safe_component(text: str, max_len: int = _NAME_MAX) -> str:
    """``text`` reduced to one harmless path component: ``[A-Za-z0-9._-]``, no leading dot, no ``..``."""
    s = _UNSAFE.sub("_", str(text))
    s = _DOTS.sub(".", s).strip(".-_ ")[:max_len].rstrip(".-_ ")
    return s or "x"


def file_name(source: str, id_: str) -> str:
    """``<source>__<id>-<hash>.png``: readable, unique per key (the hash is of the exact key)."""
    return f"{safe_component(source, 40)}__{safe_component(id_)}-{_short_hash(str(source), str(id_))}.png"


def class_folders(classes: list[str]) -> dict[str, str]:
    """Folder name of each class: the name itself when harmless, else a cleaned name plus a hash.

    Names that would collide on a case-insensitive file system, or with ``_unlabeled``, get the
    hash too, so every class has its own folder everywhere.
    """
    folders: dict[str, str] = {}
    for c in classes:
        s = safe_component(c)
        if s != c or s.upper().split(".")[0] in _WINDOWS_RESERVED:
            s = f"{s}-{_short_hash(c, n=8)}"
        folders[c] = s
    seen: dict[str, list[str]] = {}
    for c, s in folders.items():
        seen.setdefault(s.casefold(), []).append(c)
    for key, names in seen.items():
        if len(names) > 1 or key == UNLABELED_DIR:
            for c in names:
                folders[c] = f"{safe_component(c)}-{_short_hash(c, n=8)}"
    if len({s.casefold() for s in folders.values()}) != len(folders):  # pragma: no cover - sha1 prefix clash
        raise UserError("export: two class names map to the same folder; rename one of them")
    return folders


# --------------------------------------------------------------------------- checks


def _check_inputs(
    split_table: pd.DataFrame, images: np.ndarray | ChunkedArray, classes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Rows (int64) and label indices (int64, -1 unlabelled) of the table, validated."""
    for col in ("source", "id", "label", "row"):
        if col not in split_table.columns:
            raise UserError(f"export: the split table lacks column {col!r}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise UserError(f"export: images must be uint8 N x H x W x 3 (got {images.dtype} {images.shape})")
    if len(set(classes)) != len(classes):
        raise UserError("export: class names must be unique")
    rows = split_table["row"].to_numpy(dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
        raise UserError(f"export: row indices must be in [0, {len(images)}) (got {rows.min()}..{rows.max()})")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.empty(len(split_table), dtype=np.int64)
    for k, lab in enumerate(split_table["label"]):
        name = clean_label(lab)
        if name is None:
            labels[k] = -1
        elif name in index:
            labels[k] = index[name]
        else:
            raise UserError(f"export: label {lab!r} is not one of the classes {classes[:10]}")
    return rows, labels


# Inside an export target any of these means a repository or a DVC project, never an export.
PROTECTED = (".git", "dvc.yaml", ".dvc")


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _refuse_unsafe(target: Path, who: str) -> None:
    """Refuse a target that is, or holds, something an export must never replace: the current
    directory, the project (a folder with dvc.yaml), a .git, data/ or models/, or a path under a file."""
    resolved = target.resolve()
    for parent in resolved.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{who}: {target} lies under {parent}, which is a file, not a folder")
    cwd = Path.cwd().resolve()
    if _is_within(cwd, resolved):
        raise UserError(f"{who}: {target} is or holds the current directory; choose a new folder")
    if resolved.is_dir():
        for dirpath, dirnames, filenames in os.walk(resolved):
            for name in PROTECTED:
                if name in dirnames or name in filenames:
                    found = Path(dirpath) / name
                    raise UserError(
                        f"{who}: {target} holds {found} (a project, a repository or pipeline data); "
                        "refusing to replace it"
                    )
    for parent in (resolved, *resolved.parents):
        if (parent / "dvc.yaml").is_file() and any(
            _is_within(resolved, parent / d) for d in ("data", "models")
        ):
            raise UserError(f"{who}: {target} lies in the pipeline's data of {parent}; choose another folder")


def _claim(target: Path, overwrite: bool, who: str = "export", marker: str | None = None) -> None:
    """Refuse a target that holds something, unless overwriting a previous export (one that has
    ``marker``, the file every export of this kind writes); refuse unsafe targets always."""
    _refuse_unsafe(target, who)
    if not target.exists() and not target.is_symlink():
        return
    hint = "use --overwrite, or overwrite=True, to replace it"
    if target.is_dir() and not target.is_symlink():
        if not any(target.iterdir()):
            return
        if not overwrite:
            raise UserError(f"{who}: {target} is not empty ({hint})")
        if marker is not None and not (target / marker).is_file():
            raise UserError(
                f"{who}: {target} was not written by a photoprep {who} (it has no {marker}); "
                "--overwrite only replaces a previous export"
            )
    elif not overwrite:
        raise UserError(f"{who}: {target} already exists ({hint})")
    elif marker is not None:
        raise UserError(
            f"{who}: {target} is not a folder; --overwrite only replaces a previous export folder"
        )


def _replace(tmp: Path, target: Path) -> None:
    """Move a finished ``tmp`` onto ``target``, removing what was there."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    os.replace(tmp, target)


@contextlib.contextmanager
def folder_in_place(
    target: Path, overwrite: bool, who: str = "export", marker: str | None = None
) -> Iterator[Path]:
    """A new empty folder beside ``target`` to write in; when the block ends well it replaces
    ``target``, else it is removed. A ``target`` that holds something is refused up front unless
    ``overwrite`` and it holds ``marker`` (a previous export's own file); see :func:`_claim`."""
    _claim(target, overwrite, who, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- formats


def _write_imagefolder(
    tmp: Path,
    table: pd.DataFrame,
    images: np.ndarray | ChunkedArray,
    rows: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
) -> None:
    folders = class_folders(classes)
    sha = table["sha256"] if "sha256" in table.columns else pd.Series([None] * len(table))
    manifest: list[tuple[str, str, str, str, str, int]] = []
    names: set[str] = set()
    for source, id_, digest, row, lab in zip(table["source"], table["id"], sha, rows, labels, strict=True):
        folder = UNLABELED_DIR if lab < 0 else folders[classes[lab]]
        name = file_name(str(source), str(id_))
        rel = f"{folder}/{name}"
        if rel.casefold() in names:
            raise UserError(f"export: key (source={source!r}, id={id_!r}) appears twice in the split table")
        names.add(rel.casefold())
        (tmp / folder).mkdir(exist_ok=True)
        Image.fromarray(np.ascontiguousarray(images[row])).save(tmp / folder / name, format="PNG")
        manifest.append(
            (
                rel,
                str(source),
                str(id_),
                "" if digest is None else str(digest),
                "" if lab < 0 else classes[lab],
                int(row),
            )
        )
    manifest.sort()
    with open(tmp / MANIFEST, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "source", "id", "sha256", "label", "row"])
        w.writerows(manifest)
    info = {"classes": list(classes), "folders": [folders[c] for c in classes], "unlabeled": UNLABELED_DIR}
    (tmp / "classes.json").write_text(json.dumps(info, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_npz(path: Path | io.BufferedIOBase, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` layout with a fixed member date, so equal arrays give equal bytes; no pickles."""
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)


def _npz_arrays(
    table: pd.DataFrame,
    images: np.ndarray | ChunkedArray,
    rows: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
) -> dict[str, np.ndarray]:
    picked = np.ascontiguousarray(images[rows])
    return {
        "images": picked.astype(np.uint8, copy=False),
        "labels": labels.astype(np.int64),
        "classes": np.array([str(c) for c in classes], dtype=np.str_),
        "ids": np.array([str(v) for v in table["id"]], dtype=np.str_),
        "sources": np.array([str(v) for v in table["source"]], dtype=np.str_),
        "rows": rows.astype(np.int64),
    }


def _npz_target(out: Path, table: pd.DataFrame) -> Path:
    if out.suffix == ".npz":
        return out
    split = table["split"].dropna().unique() if "split" in table.columns else []
    name = str(split[0]) if len(split) == 1 else "export"
    return out / f"{safe_component(name)}.npz"


def export_split(
    split_table: pd.DataFrame,
    images: np.ndarray | ChunkedArray,
    out: Path,
    fmt: str,
    classes: list[str],
    overwrite: bool = False,
) -> Path:
    """Write one split's images as ``fmt`` (``imagefolder`` or ``npz``) and return what was written.

    ``split_table`` has ``source``, ``id``, ``label`` and ``row`` (index into ``images``, the
    processed N x H x W x 3 array, which may be a memory map); ``classes`` gives the label
    indices. ``imagefolder`` returns the folder ``out``. ``npz`` returns ``out`` itself when it
    ends in ``.npz``, else ``out/<split>.npz`` (``<split>`` from the table's ``split`` column).
    Rows are written in the table's order.
    """
    if fmt not in FORMATS:
        raise UserError(f"export: format must be one of {list(FORMATS)} (got {fmt!r})")
    out = Path(out)
    classes = [str(c) for c in classes]
    table = split_table.reset_index(drop=True)
    rows, labels = _check_inputs(table, images, classes)

    if fmt == "imagefolder":
        target = out
        if target.exists() and not target.is_dir():
            raise UserError(f"export: {target} is a file, not a folder")
        with folder_in_place(target, overwrite, marker=MANIFEST) as tmp:
            _write_imagefolder(tmp, table, images, rows, labels, classes)
        return target

    target = _npz_target(out, table)
    if target.is_dir():
        raise UserError(f"export: {target} is a folder, not a file")
    _claim(target, overwrite)
    with atomic_path(target) as tmp_file:
        write_npz(tmp_file, _npz_arrays(table, images, rows, labels, classes))
    return target
