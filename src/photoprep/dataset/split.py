"""Class selection and stable, stratified train/val/test splits.

Every image gets a number ``u`` in [0, 1) from a hash of its key and the split seed::

    u = int.from_bytes(sha256(f"{seed}\\0{source}\\0{id}").digest()[:8], "big") / 2**64

and goes to ``train`` if ``u < r_train``, to ``val`` if ``u < r_train + r_val``, else to
``test``. Images without a label go to ``unlabeled``.

Why a threshold on the hash, and not exact per-class quotas
    The requirement is that adding images never moves an existing image to another split
    (a test image must never become a training image in a later run). ``u`` depends only on
    the image's own key and the seed, so the split of an image depends on nothing else in
    the table: stability holds by construction. Exact per-class quotas (rank each class by
    ``u`` and cut at ``round(ratio * n)``) would move the images that sit at the cut
    whenever a class grows, so they are not used. Stratification is still by label: the
    hashes of distinct keys behave as independent uniform draws, so within every class the
    split sizes are binomial around the ratios (±1.4 percentage points of train for a class
    of 1,000 at 0.7). :func:`split_report` reports the realised ratios per class.

Why the hash is not salted with the label
    Salting would give each class its own stream, but the streams are already independent
    (distinct keys), and salting would make an image's split depend on its label: renaming
    or merging classes, or switching to one-vs-rest, would reshuffle test images into
    train between experiments. With the key-only hash a test image stays a test image under
    every class selection of the same seed.

``max_per_class`` keeps, per class, the N images with the smallest *second* hash (the same
recipe salted with ``"keep"``; reusing ``u`` would keep only training images). Adding images
can only swap in images with a smaller keep-hash, i.e. push some kept images out (counted as
dropped); a kept image never changes split.

Class order: ``SplitResult.classes`` is the final class names in natural order (``'2'``
before ``'10'``, then case-insensitive text), and a class index is a position in that list.

Why one module
    Class selection, the hash assignment and the split report share the label cleaning and
    the fingerprint; apart, each would need the others' private rules to stay consistent.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from photoprep.core.errors import UserError
from photoprep.core.params import SplitParams
from photoprep.dataset import keys

SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"
COLUMNS = ["source", "id", "sha256", "label", "row", "split"]
DROP_REASONS = ("class_not_selected", "max_per_class")

_REQUIRED = ("source", "id", "sha256", "label")
# The columns of the images table that `attach_labels` and `assign_splits` read.
READS = ["source", "id", "sha256", "label", "row", "group"]
_DIGITS = re.compile(r"(\d+)")
FINGERPRINT_ROWS = 4096  # rows of the fingerprint's text hashed at a time


@dataclass
class SplitResult:
    """The split table (one row per kept image, sorted by key), the classes and the drop counts."""

    table: pd.DataFrame
    classes: list[str]
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    ratios: dict[str, float] = field(default_factory=dict)
    seed: int = 0


# --------------------------------------------------------------------------- helpers


def natural_key(name: str) -> tuple:
    """Sort key that orders digit runs by value: ``'c2' < 'c10'``; ties broken by the exact text."""
    parts: list[tuple[int, int | str]] = []
    for i, chunk in enumerate(_DIGITS.split(name)):
        if not chunk:
            continue
        parts.append((0, int(chunk)) if i % 2 else (1, chunk.casefold()))
    return (tuple(parts), name)


def natural_sorted(names: Any) -> list[str]:
    return sorted(names, key=natural_key)


def hash_unit(seed: int, source: str, id_: str, salt: str = "") -> float:
    """A uniform number in [0, 1) from the key (source, id), the seed and an optional salt."""
    text = f"{seed}\0{source}\0{id_}" if not salt else f"{seed}\0{salt}\0{source}\0{id_}"
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def clean_label(value: Any) -> str | None:
    """A label as text; None, NaN and blank text mean unlabeled. ``2.0`` (ints through NaN) reads '2'."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    text = str(value).strip()
    return text or None


def clean_labels(labels: pd.Series) -> pd.Series:
    """`clean_label` of every value, as an object Series; text columns (the pipeline's) are
    cleaned one distinct value at a time (a few labels over many rows), other kinds value by
    value."""
    if isinstance(labels.dtype, pd.StringDtype):
        codes, uniques = labels.factorize()
        distinct = np.asarray(uniques, dtype=object)
    else:
        values = labels.to_numpy(dtype=object)
        if pd.api.types.infer_dtype(values, skipna=True) not in ("string", "empty"):
            return pd.Series([clean_label(v) for v in values], index=labels.index, dtype=object)
        codes, distinct = pd.factorize(values)
    # Missing values have code -1: the last entry, None.
    cleaned = np.array([text.strip() or None for text in distinct] + [None], dtype=object)
    return pd.Series(cleaned[codes], index=labels.index, dtype=object)


def hash_units(
    seed: int, source: pd.Series | np.ndarray, ids: pd.Series | np.ndarray, salt: str = ""
) -> np.ndarray:
    """`hash_unit` of every (source, id) pair, as float64: one sha256 call per key, no other work per row."""
    prefix = f"{seed}\0" if not salt else f"{seed}\0{salt}\0"
    sources = pd.Series(source).to_numpy(dtype=object)  # iterating an Arrow column is slow
    keys = pd.Series(ids).to_numpy(dtype=object)
    digests = b"".join(
        [hashlib.sha256(f"{prefix}{s}\0{i}".encode()).digest() for s, i in zip(sources, keys, strict=True)]
    )
    # The first 8 bytes of each digest, big-endian; uint64 -> float64 rounds as int / 2**64 does.
    first = np.frombuffer(digests, dtype=">u8").reshape(-1, 4)[:, 0] if digests else np.zeros(0, ">u8")
    return first.astype(np.float64) / 2.0**64


def splits_of(u: np.ndarray, edges: list[tuple[str, float]]) -> np.ndarray:
    """The split of each hash: the first edge above it, else the last split."""
    names = np.array([name for name, _ in edges], dtype=object)
    uppers = np.array([upper for _, upper in edges], dtype=np.float64)
    return names[np.minimum(np.searchsorted(uppers, u, side="right"), len(names) - 1)]


def split_edges(ratios: dict[str, float]) -> list[tuple[str, float]]:
    """Cumulative upper bounds of the splits with a positive ratio, in train, val, test order."""
    edges: list[tuple[str, float]] = []
    total = 0.0
    for name in SPLITS:
        r = float(ratios.get(name, 0.0))
        if r > 0:
            total += r
            edges.append((name, total))
    if not edges:
        raise UserError("split.ratios: at least one of train, val, test must be > 0")
    # Float sums can end a hair below 1; the last split takes the remainder.
    edges[-1] = (edges[-1][0], math.inf)
    return edges


# --------------------------------------------------------------------------- class selection


def select_classes(labels: pd.Series, p: SplitParams) -> pd.Series:
    """Apply ``split.classes`` then ``split.positive`` to labels; dropped or unlabeled -> NaN.

    * ``classes`` list: keep these classes. A listed class that no image has is a UserError
      (most often a typo).
    * ``classes`` mapping ``old -> new``: rename, or merge several old names into one new;
      ``old -> null`` drops the class. Classes not named in the mapping are kept as they are.
      An old name that no image has is a UserError.
    * ``classes`` int N: keep the first N classes in natural order (``'2'`` before ``'10'``).
    * ``positive``: one-vs-rest after the selection: the positive class keeps its name, every
      other kept class becomes ``f"not_{positive}"``.

    The result has the index of ``labels``, dtype object, and NaN where an image has no class.
    """
    clean = clean_labels(labels)
    present = set(clean.dropna())
    sel = p.classes

    if sel is None:
        out = clean
    elif isinstance(sel, int) and not isinstance(sel, bool):
        if sel < 1:
            raise UserError(f"split.classes: a number of classes must be >= 1 (got {sel})")
        keep = set(natural_sorted(present)[:sel])
        out = clean.where(clean.isin(keep))
    elif isinstance(sel, dict):
        mapping = {
            str(k): (None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
            for k, v in sel.items()
        }
        missing = natural_sorted(set(mapping) - present)
        if missing:
            raise UserError(
                f"split.classes: no image has class {missing[0]!r} "
                f"(classes found: {_preview(natural_sorted(present))})"
            )
        out = pd.Series(
            [mapping.get(v, v) if v is not None else None for v in clean], index=clean.index, dtype=object
        )
    else:
        wanted = [str(c) for c in cast("list[str]", sel)]  # a list of class names
        if not wanted:
            raise UserError("split.classes: an empty list keeps no class")
        missing = [c for c in wanted if c not in present]
        if missing:
            raise UserError(
                f"split.classes: no image has class {missing[0]!r} "
                f"(classes found: {_preview(natural_sorted(present))})"
            )
        out = clean.where(clean.isin(set(wanted)))

    out = out.astype(object).where(out.notna(), math.nan)
    if p.positive is not None:
        positive = str(p.positive)
        kept = set(out.dropna())
        if positive not in kept:
            raise UserError(
                f"split.positive: no selected image has class {positive!r} "
                f"(classes: {_preview(natural_sorted(kept))})"
            )
        rest = f"not_{positive}"
        out = out.map(lambda v: v if not isinstance(v, str) else (positive if v == positive else rest))
        out = out.astype(object).where(out.notna(), math.nan)
    return out


def _preview(names: list[str], n: int = 10) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", … ({len(names)} in all)" if len(names) > n else "") if names else "none"


def text_or_none(values: pd.Series) -> np.ndarray:
    """Selected class names (text) as objects, None where there is none (None, NaN)."""
    objects = values.to_numpy(dtype=object, copy=True)
    objects[~np.asarray(pd.notna(objects), dtype=bool)] = None
    return objects


def clean_sha(values: pd.Series) -> np.ndarray:
    """sha256 values as text, None where a value is missing or blank."""
    cleaned = clean_labels(values)
    return cleaned.where(cleaned.isna(), values.astype(str).to_numpy(dtype=object)).to_numpy(dtype=object)


# --------------------------------------------------------------------------- splits


def assign_splits(images: pd.DataFrame, p: SplitParams) -> SplitResult:
    """Select classes, cap each class, and assign every kept image to a split by its key's hash.

    ``images`` is the processed table (``source``, ``id``, ``sha256``, ``label``, ...), aligned
    row by row with ``data/processed/images``; ``row`` in the result is the position in that table, or the
    table's own ``row`` column when it has one (for a table that was filtered first).
    Images whose label is missing go to ``unlabeled`` whatever the class selection; images
    whose class is not selected, or beyond ``max_per_class``, are dropped and counted.
    """
    missing = [c for c in _REQUIRED if c not in images.columns]
    if missing:
        raise UserError(f"split: the images table lacks column(s) {missing} (has {list(images.columns)})")

    source = images["source"].astype(str).to_numpy(dtype=object)
    ids = images["id"].astype(str).to_numpy(dtype=object)
    keys = pd.DataFrame({"source": source, "id": ids})
    dup = keys.duplicated(keep=False)
    if dup.any():
        first = keys[dup].iloc[0]
        raise UserError(
            f"split: key (source={first['source']!r}, id={first['id']!r}) appears "
            f"{int(((keys.source == first['source']) & (keys.id == first['id'])).sum())} times "
            "in the images table"
        )

    if "row" in images.columns:
        rows = pd.to_numeric(images["row"], errors="raise").astype("int64").to_numpy()
    else:
        rows = pd.RangeIndex(len(images)).to_numpy(dtype="int64")

    raw = clean_labels(images["label"].reset_index(drop=True))
    selected = select_classes(raw, p).reset_index(drop=True)
    unlabeled = raw.isna().to_numpy()
    not_selected = (~unlabeled) & selected.isna().to_numpy()

    table = pd.DataFrame(
        {
            "source": source,
            "id": ids,
            "sha256": clean_sha(images["sha256"]),
            "label": text_or_none(selected),
            "row": rows,
        }
    )
    table = table[~not_selected].reset_index(drop=True)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    dropped["class_not_selected"] = int(not_selected.sum())

    if p.max_per_class is not None and len(table):
        table["_keep_u"] = hash_units(p.seed, table["source"], table["id"], salt="keep")
        labeled = table["label"].notna()
        # Rank within each class by the keep-hash; ties (never in practice) break by key.
        order = table[labeled].sort_values(["label", "_keep_u", "source", "id"], kind="mergesort")
        rank = order.groupby("label", sort=False).cumcount()
        over = rank[rank >= p.max_per_class].index
        dropped["max_per_class"] = len(over)
        table = table.drop(index=over).drop(columns="_keep_u").reset_index(drop=True)

    edges = split_edges(p.ratios)
    labeled = table["label"].notna().to_numpy()
    split = np.full(len(table), UNLABELED, dtype=object)
    split[labeled] = splits_of(hash_units(p.seed, table["source"][labeled], table["id"][labeled]), edges)
    table["split"] = split
    table = table.sort_values(["source", "id"], kind="mergesort").reset_index(drop=True)
    table = table[COLUMNS]
    table["row"] = table["row"].astype("int64")

    classes = natural_sorted(table["label"].dropna().unique())  # set() of an Arrow column: a step a row
    ratios = {name: float(p.ratios.get(name, 0.0)) for name in SPLITS}
    return SplitResult(table=table, classes=classes, dropped=dropped, ratios=ratios, seed=p.seed)


def split_tables(result: SplitResult) -> dict[str, pd.DataFrame]:
    """The table cut by split: ``{'train': ..., 'val': ..., 'test': ..., 'unlabeled': ...}``."""
    t = result.table
    return {name: t[t["split"] == name].reset_index(drop=True) for name in (*SPLITS, UNLABELED)}


def read_labels(splits_dir: str | Path) -> pd.DataFrame:
    """``source, id, label, split`` of every image in the split tables of ``splits_dir``, one row per key
    (``split`` is the table's name; ``label`` None where an image has none)."""
    frames = [
        pd.read_parquet(path, columns=["source", "id", "label"]).assign(split=path.stem)
        for path in sorted(Path(splits_dir).glob("*.parquet"))
    ]
    if not frames:
        return pd.DataFrame(columns=["source", "id", "label", "split"])
    return pd.concat(frames, ignore_index=True).drop_duplicates(["source", "id"])


def fingerprint(table: pd.DataFrame) -> str:
    """sha256 hex of the sorted (source, id, sha256, label) rows: order-independent, content-sensitive."""
    rows = fingerprint_rows(table)
    sha, label = rows["sha256"], rows["label"]
    rows = rows.assign(
        _sha_none=sha.isna().to_numpy(),
        _sha=sha.fillna("").to_numpy(dtype=object),
        _label_none=label.isna().to_numpy(),
        _label=label.fillna("").to_numpy(dtype=object),
    )
    # Python's order of (source, id, sha256 is None, sha256 or "", label is None, label or "").
    order = rows.sort_values(["source", "id", "_sha_none", "_sha", "_label_none", "_label"], kind="mergesort")
    digest = Fingerprint()
    digest.update(order[["source", "id", "sha256", "label"]])
    return digest.hexdigest()


def fingerprint_rows(table: pd.DataFrame) -> pd.DataFrame:
    """What `fingerprint` hashes of each row: source, id, sha256 and label as text, None where a
    sha256 or label is missing or blank."""
    return pd.DataFrame(
        {
            "source": table["source"].astype(str).to_numpy(dtype=object),
            "id": table["id"].astype(str).to_numpy(dtype=object),
            "sha256": clean_labels(table["sha256"]).to_numpy(dtype=object),
            "label": clean_labels(table["label"]).to_numpy(dtype=object),
        }
    )


class Fingerprint:
    """`fingerprint` of rows that come in its order, a frame at a time: the JSON text of the whole
    list, "[" + the rows' texts joined by "," + "]", hashed `FINGERPRINT_ROWS` rows at a time (the
    text of every row at once was the step's peak)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256(b"[")
        self.started = False

    def update(self, rows: pd.DataFrame) -> None:
        """Rows of (source, id, sha256, label): text, or None where a sha256 or label is missing."""
        values = rows.to_numpy(dtype=object)
        if not len(values):
            return
        plain = _plain_json_rows(values)
        if plain is not None:
            self.digest.update(b"," + plain if self.started else plain)
            self.started = True
            return
        for start in range(0, len(values), FINGERPRINT_ROWS):
            rows_text = json.dumps(
                values[start : start + FINGERPRINT_ROWS].tolist(), ensure_ascii=False, separators=(",", ":")
            )
            self.digest.update((("," if self.started else "") + rows_text[1:-1]).encode("utf-8"))
            self.started = True

    def hexdigest(self) -> str:
        done = self.digest.copy()
        done.update(b"]")
        return done.hexdigest()


def _plain_json_rows(values: np.ndarray) -> bytes | None:
    """The rows' JSON texts joined by "," (what `json.dumps` writes between "[" and "]", UTF-8)
    made by Arrow's string kernels, where every value is a text that JSON writes as it is (no
    quote, backslash or control character) or None; None for other rows, which `json.dumps` writes.

    Why: the split stage writes every row again on each increment, and `json.dumps` of its rows
    was a sixth of its CPU at 144,564 photos."""
    columns = []
    for c in range(values.shape[1]):
        try:
            column = pa.array(values[:, c], type=pa.large_string())  # a NaN or a number: TypeError
        except (pa.ArrowException, TypeError):
            return None
        if pc.any(pc.match_substring_regex(column, r'["\\\x00-\x1f]')).as_py():
            return None
        quoted = pc.binary_join_element_wise(_text('"'), column, _text('"'), _text("")).fill_null("null")
        columns.append(quoted)
    joined = pc.binary_join_element_wise(*columns, _text(","))
    rows = pc.binary_join_element_wise(_text("["), joined, _text("]"), _text(""))
    one = pa.LargeListArray.from_arrays(pa.array([0, len(rows)], pa.int64()), rows)
    return pc.binary_join(one, _text(","))[0].as_buffer().to_pybytes()


def _text(value: str) -> pa.Scalar:
    return pa.scalar(value, pa.large_string())


def split_report(result: SplitResult) -> dict:
    """Counts per split and class, realised per-class ratios, fingerprints, drops, seed and ratios.

    ``counts`` has every class for train, val and test (zeros included); ``unlabeled`` appears in
    ``totals`` and ``fingerprints`` only. ``realised`` is, per class, the fraction of its
    labelled images in each split, to compare with ``ratios``.
    """
    parts = split_tables(result)
    per_class = {name: parts[name]["label"].value_counts().to_dict() for name in SPLITS}
    totals = {name: len(parts[name]) for name in (*SPLITS, UNLABELED)}
    fingerprints = {name: fingerprint(parts[name]) for name in (*SPLITS, UNLABELED)}
    return report_of(result, per_class, totals, fingerprints)


def report_of(
    result: SplitResult,
    per_class: Mapping[str, Mapping[str, int]],
    totals: dict[str, int],
    fingerprints: dict[str, str],
) -> dict:
    """`split_report` of a result whose table was counted elsewhere (`result.table` is not read):
    `per_class` the images of each class in train, val and test, `totals` of each split and
    unlabeled, and the `fingerprints` of their tables."""
    counts: dict[str, dict[str, int]] = {}
    for name in SPLITS:
        counts[name] = {c: int(per_class[name].get(c, 0)) for c in result.classes}
    realised: dict[str, dict[str, float]] = {}
    for c in result.classes:
        n = sum(counts[name][c] for name in SPLITS)
        realised[c] = {name: round(counts[name][c] / n, 6) if n else 0.0 for name in SPLITS}
    overall_n = sum(totals[name] for name in SPLITS)
    return {
        "classes": list(result.classes),
        "counts": counts,
        "totals": dict(totals),
        "realised": realised,
        "realised_overall": {
            name: round(totals[name] / overall_n, 6) if overall_n else 0.0 for name in SPLITS
        },
        "fingerprints": dict(fingerprints),
        "dropped": {k: int(v) for k, v in result.dropped.items()},
        "seed": result.seed,
        "ratios": dict(result.ratios),
    }


class Labeller:
    """The labels of a table's rows, slice after slice: `attach_labels` with what every slice
    shares made once (the labels' keys sorted, `photoprep.dataset.keys`; with `in_table`, the label
    each group of `members` gives)."""

    def __init__(
        self,
        labels: pd.DataFrame,
        members: pd.DataFrame | None = None,
        priority: list[str] | None = None,
        in_table: np.ndarray | None = None,
    ) -> None:
        self.keys = keys.SortedKeys(labels)
        self.labels = labels["label"].reset_index(drop=True)
        self.members, self.priority = members, priority
        self.groups = None if members is None or in_table is None else self._group_labels(in_table)

    def _labels_of(self, frame: pd.DataFrame) -> pd.Series:
        """Each row's label: its labels.csv entry (a key that labels repeat: its first row), else
        what its manifest carried."""
        at = self.keys.first_rows(frame)
        from_file = np.full(len(frame), None, dtype=object)
        from_file[at >= 0] = self.labels.iloc[at[at >= 0]].to_numpy(dtype=object)
        own = frame["label"].to_numpy(dtype=object) if "label" in frame else np.full(len(frame), None)
        return pd.Series(np.where(pd.isna(from_file), own, from_file), index=frame.index)

    def _group_labels(self, held: np.ndarray) -> pd.Series:
        """The label of each group of the members, by group: the member from the source latest in
        `priority` wins, then one the table holds (`held`), then the smallest key."""
        assert self.members is not None
        members = self.members.assign(_kept=np.asarray(held, dtype=bool))
        members = members[members["group"] >= 0].copy()
        members["label"] = self._labels_of(members).to_numpy()
        members = members[members["label"].notna() & (members["label"].astype(str) != "")]
        rank = {name: i for i, name in enumerate(self.priority or [])}
        members["_rank"] = members["source"].map(rank).fillna(-1)
        return (
            members.sort_values(
                ["group", "_rank", "_kept", "source", "id"], ascending=[True, False, False, True, True]
            )
            .drop_duplicates("group")
            .set_index("group")["label"]
        )

    def attach(self, images: pd.DataFrame) -> pd.DataFrame:
        """`images` with their labels (`attach_labels`)."""
        table = images.copy()
        if "label" not in table.columns:
            table["label"] = None
        table["label"] = self._labels_of(table).to_numpy()
        if self.members is None or "group" not in table.columns:
            return table
        groups = self.groups
        if groups is None:  # the whole table: which members it holds, from its own keys
            groups = self._group_labels(keys.SortedKeys(table).first_rows(self.members) >= 0)
        from_group = groups.reindex(table["group"]).to_numpy()
        table["label"] = np.where(pd.isna(from_group), table["label"].to_numpy(dtype=object), from_group)
        return table


def attach_labels(
    images: pd.DataFrame,
    labels: pd.DataFrame,
    members: pd.DataFrame | None = None,
    priority: list[str] | None = None,
    in_table: np.ndarray | None = None,
) -> pd.DataFrame:
    """Labels from the sources' labels.csv (columns source, id, label) fill `label`.

    A label file wins over a label the manifest carried (a folder's class, a csv column),
    because it is the more deliberate statement. With `members` (the records of dedup's groups
    with their `group`: every record, or only the groups of two or more, since a group of one
    adds nothing) a kept image also takes the label of its duplicates: the member from
    the source latest in `priority` wins, so a reviewed folder source listed after the
    collection relabels the images it holds, even though dedup kept the original. `in_table`
    says which members the images table holds, when `images` is a slice of it (a table read in
    slices: one `Labeller` for them all).
    """
    return Labeller(labels, members, priority, in_table).attach(images)
