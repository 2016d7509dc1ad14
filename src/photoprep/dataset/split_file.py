"""The splits of an images table in a file, a slice at a time: `photoprep.dataset.split`'s
tables and report, byte for byte, with the table never held whole.

Every rule is `photoprep.dataset.split`'s; what this module adds is the order of the passes,
each over the images table's slices (`photoprep.core.tables.slices`, within ``compute.memory_mb``):

1. the keys: in (source, id) order and each once (bucket writes them so), and which of dedup's
   members the table holds, for the labels of their groups;
2. the labels: the distinct classes, which decide `split.classes` and `split.positive` (an
   image's class depends only on its own label and on which classes there are);
3. with `split.max_per_class`, the caps: the `max_per_class` smallest keep-hashes of each class
   (ties broken by key), kept as the slices come; an image past its class's last is dropped;
4. the splits: each slice's rows written to the split tables as they come, counted per split
   and class, and fingerprinted in order (the rows come sorted by key, as `fingerprint` sorts
   them).

Between the slices it holds the classes, the caps (at most `max_per_class` rows a class) and
the counts, never a row per image.

Why by hand: the passes are group-bys of a few rows a class over a hashed key; DuckDB or Arrow
would hold the same rows and need the split rules (Python's sha256 of the key, the natural class
order) written again in SQL.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from photoprep.core import io, memory, tables
from photoprep.core.errors import UserError
from photoprep.core.params import SplitParams
from photoprep.dataset import keys, split
from photoprep.dataset.split import COLUMNS, SPLITS, UNLABELED


@dataclass
class LabelSources:
    """Where labels come from: the sources' label files (source, id, label), dedup's members of
    groups of two or more (source, id, label, group), and the sources in priority order."""

    labels: pd.DataFrame
    members: pd.DataFrame
    priority: list[str]


class ImagesTable:
    """The images table at `path`, read a slice at a time within `memory_mb`, its labels attached
    from `sources`."""

    def __init__(self, path: str | Path, sources: LabelSources, memory_mb: int) -> None:
        self.path, self.sources, self.memory_mb = Path(path), sources, memory_mb
        names = tables.InFile(self.path, memory_mb).columns
        self.columns = [c for c in split.READS if c in names]
        self.n = tables.row_count(self.path)
        self.labeller: split.Labeller | None = None  # once `check_keys` knows the members it holds
        self.classes: list[str] = []  # every label the images have, cleaned (`count_labelled`)

    def _labelled(self, columns: list[str] | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
        """(first row, frame) of each slice (of `columns`, or every column split reads), its
        labels attached."""
        if self.labeller is None:
            self.check_keys()
        assert self.labeller is not None
        start = 0
        for frame in tables.slices(self.path, self.memory_mb, columns or self.columns):
            yield start, self.labeller.attach(frame)
            start += len(frame)
            del frame
            memory.release()  # the slice's pages back to the OS: the next slice takes their place

    def _labels_only(self) -> list[str]:
        """The columns a pass that needs only the labels reads (narrower rows: larger slices)."""
        return [c for c in self.columns if c in ("source", "id", "label", "group")]

    def check_keys(self) -> None:
        """Refuse a key that repeats (`split.assign_splits` says the same) or a table out of
        (source, id) order; note which members the table holds, for the labels of their groups."""
        s = self.sources
        members = keys.SortedKeys(s.members)
        held = np.zeros(len(s.members), dtype=bool)
        order = tables.KeyOrder(self.path)
        for frame in tables.slices(self.path, self.memory_mb, ["source", "id"]):
            repeated = order.check(frame)
            if repeated is not None:
                source, id_, times = repeated
                raise UserError(
                    f"split: key (source={source!r}, id={id_!r}) appears {times} times in the images table"
                )
            members.mark_held(frame, held)
        self.labeller = split.Labeller(s.labels, s.members, s.priority, held)

    def count_labelled(self) -> int:
        """How many images have a label (after their groups'), noting the classes there are."""
        labelled, classes = 0, set()
        for _, frame in self._labelled(self._labels_only()):
            labels = frame["label"]
            labelled += int((labels.notna() & (labels.astype(str) != "")).sum())
            classes.update(split.clean_labels(labels).dropna().unique())
        self.classes = sorted(classes)
        return labelled

    def write_splits(self, p: SplitParams, paths: dict[str, Path]) -> dict:
        """Write the split tables (`paths` of train, val, test and unlabeled, or some of them)
        and return `split.split_report`."""
        if not self.classes:
            self.count_labelled()
        chosen = split.select_classes(pd.Series(self.classes, dtype=object), p)
        mapping = {c: (v if isinstance(v, str) else None) for c, v in zip(self.classes, chosen, strict=True)}
        caps = self._caps(mapping, p) if p.max_per_class is not None else None
        edges = split.split_edges(p.ratios)
        tally = _Tally()
        with contextlib.ExitStack() as stack:
            writers: dict[str, tables.TableWriter] = {}  # opened at a split's first rows
            for start, frame in self._labelled():
                table = _assigned(_selected(frame, start, mapping, tally), p, caps, edges, tally)
                for name, part in tally.add(table).items():
                    if name not in paths:
                        continue
                    if name not in writers:
                        writers[name] = stack.enter_context(tables.TableWriter(paths[name]))
                    writers[name].write(part)
        for name in paths:
            if name not in writers:  # no row: the columns and types `split.assign_splits` gives
                io.write_table(_empty(), paths[name])
        result = split.SplitResult(
            table=_empty().iloc[:0],  # counted as the slices came: `report_of` does not read it
            classes=split.natural_sorted(tally.classes),
            dropped=dict(tally.dropped),
            ratios={name: float(p.ratios.get(name, 0.0)) for name in SPLITS},
            seed=p.seed,
        )
        return split.report_of(result, tally.per_class, dict(tally.totals), tally.fingerprints())

    def _caps(self, mapping: dict[str, str | None], p: SplitParams) -> pd.DataFrame:
        """Each class's last kept (keep-hash, source, id) and whether it is capped at all: the
        `max_per_class` smallest of each class, kept as the slices come."""
        assert p.max_per_class is not None
        best: pd.DataFrame | None = None
        for _, frame in self._labelled(self._labels_only()):
            keys = _keyed(frame, mapping)
            keys = keys.loc[keys["label"].notna(), ["label", "source", "id"]]
            keys["_keep_u"] = split.hash_units(p.seed, keys["source"], keys["id"], salt="keep")
            both = keys if best is None else pd.concat([best, keys], ignore_index=True)
            both = both.sort_values(["label", "_keep_u", "source", "id"], kind="mergesort")
            best = both.groupby("label", sort=False).head(p.max_per_class).reset_index(drop=True)
        assert best is not None  # slices yields one frame at least
        last = best.groupby("label", sort=False).tail(1).set_index("label")
        last["capped"] = best.groupby("label", sort=False).size().reindex(last.index) >= p.max_per_class
        return last


def _keyed(frame: pd.DataFrame, mapping: dict[str, str | None]) -> pd.DataFrame:
    """source, id and selected class (None: unlabeled or not selected) of each row."""
    raw = split.clean_labels(frame["label"].reset_index(drop=True))
    chosen = raw.map(mapping)  # NaN where a label is missing or its class is not selected
    return pd.DataFrame(
        {
            "source": frame["source"].astype(str).to_numpy(dtype=object),
            "id": frame["id"].astype(str).to_numpy(dtype=object),
            "label": chosen.to_numpy(dtype=object),
            "_unlabeled": raw.isna().to_numpy(),
        }
    )


def _selected(frame: pd.DataFrame, start: int, mapping: dict[str, str | None], tally: _Tally) -> pd.DataFrame:
    """The rows of a slice whose class is selected or that have none, as `split.assign_splits`
    builds them."""
    keys = _keyed(frame, mapping)
    not_selected = (~keys["_unlabeled"] & keys["label"].isna()).to_numpy()
    if "row" in frame.columns:
        rows = pd.to_numeric(frame["row"], errors="raise").astype("int64").to_numpy()
    else:
        rows = np.arange(start, start + len(frame), dtype=np.int64)
    table = pd.DataFrame(
        {
            "source": keys["source"],
            "id": keys["id"],
            "sha256": split.clean_sha(frame["sha256"].reset_index(drop=True)),
            "label": split.text_or_none(keys["label"]),
            "row": rows,
        }
    )
    tally.dropped["class_not_selected"] += int(not_selected.sum())
    return table[~not_selected].reset_index(drop=True)


def _assigned(
    table: pd.DataFrame, p: SplitParams, caps: pd.DataFrame | None, edges: list, tally: _Tally
) -> pd.DataFrame:
    """`table` without the rows past their class's cap, each row with its split."""
    if caps is not None and len(table):
        labeled = table["label"].notna().to_numpy()
        u = split.hash_units(p.seed, table["source"][labeled], table["id"][labeled], salt="keep")
        cap = caps.reindex(table["label"][labeled])
        s, i = table["source"][labeled].to_numpy(dtype=object), table["id"][labeled].to_numpy(dtype=object)
        cu = cap["_keep_u"].to_numpy(dtype=np.float64)
        cs, ci = cap["source"].to_numpy(dtype=object), cap["id"].to_numpy(dtype=object)
        # (keep-hash, source, id) at most its class's last kept one: the order `assign_splits` ranks by
        within = (u < cu) | ((u == cu) & ((s < cs) | ((s == cs) & (i <= ci))))
        over = np.zeros(len(table), dtype=bool)
        over[labeled] = cap["capped"].to_numpy(dtype=bool) & ~within
        tally.dropped["max_per_class"] += int(over.sum())
        table = table[~over].reset_index(drop=True)
    labeled = table["label"].notna().to_numpy()
    splits = np.full(len(table), UNLABELED, dtype=object)
    units = split.hash_units(p.seed, table["source"][labeled], table["id"][labeled])
    splits[labeled] = split.splits_of(units, edges)
    table["split"] = splits
    table = table[COLUMNS]
    table["row"] = table["row"].astype("int64")
    return table


def _empty() -> pd.DataFrame:
    """A split table with no row: the columns and types `split.assign_splits` gives."""
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "row" else "str") for c in COLUMNS})


class _Tally:
    """What the report counts, as the slices come: drops, classes, per split and class, totals,
    fingerprints."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter(dict.fromkeys(split.DROP_REASONS, 0))
        self.classes: set[str] = set()
        self.per_class: dict[str, Counter[str]] = {name: Counter() for name in SPLITS}
        self.totals: Counter[str] = Counter(dict.fromkeys((*SPLITS, UNLABELED), 0))
        self.prints = {name: split.Fingerprint() for name in (*SPLITS, UNLABELED)}

    def add(self, table: pd.DataFrame) -> dict[str, pd.DataFrame]:
        """Count a slice's rows; its parts of train, val, test and unlabeled that have rows."""
        self.classes.update(table["label"].dropna().unique())
        names = table["split"].to_numpy(dtype=object)
        parts = {}
        for name in (*SPLITS, UNLABELED):
            at = np.flatnonzero(names == name)
            self.totals[name] += len(at)
            if len(at):
                part = table.iloc[at].reset_index(drop=True)
                # Per part, as `fingerprint` of the split's table: `clean_labels` reads a column's
                # kind from the rows it is given.
                self.prints[name].update(split.fingerprint_rows(part))
                if name in SPLITS:
                    self.per_class[name].update(part["label"].value_counts().to_dict())
                parts[name] = part
        return parts

    def fingerprints(self) -> dict[str, str]:
        return {name: digest.hexdigest() for name, digest in self.prints.items()}
