"""Decode once: per-image results memoized by sha256 under a fingerprint of params and code.

A memo lives in `<cache>/<namespace>/<fingerprint>/` as Parquet parts (plus `.npy` pixel
arrays aligned with them). Parts are written atomically and never changed, so a crashed
run loses at most the part it was writing. The cache is not a pipeline output: deleting it
costs time, never correctness, because the fingerprint names everything the values depend on.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

import photoprep
from photoprep.io import write_table, write_with

CACHE_ENV = "PHOTOPREP_CACHE"
DEFAULT_CACHE = Path(".photoprep") / "cache"


def cache_root() -> Path:
    """Where memos live: $PHOTOPREP_CACHE, else .photoprep/cache under the working directory."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def fingerprint(settings: dict[str, Any], *modules: ModuleType) -> str:
    """A short hash of the settings and the source code of the modules that compute a value."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(photoprep.__version__.encode())
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


class Memo:
    """Rows (and optionally one pixel array per row) keyed by sha256."""

    def __init__(self, namespace: str, fingerprint: str, root: Path | None = None) -> None:
        self.directory = (root or cache_root()) / namespace / fingerprint
        self._index: dict[str, tuple[str, int]] = {}
        self._parts: dict[str, pd.DataFrame] = {}
        if self.directory.exists():
            for part in sorted(self.directory.glob("part-*.parquet")):
                self._add_part(part.stem, pd.read_parquet(part))

    def _add_part(self, name: str, rows: pd.DataFrame) -> None:
        rows = rows.reset_index(drop=True)
        self._parts[name] = rows
        for position, key in enumerate(rows["sha256"]):
            self._index.setdefault(key, (name, position))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The distinct keys not memoized yet, in first-seen order."""
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def rows(self, keys: Sequence[str]) -> pd.DataFrame:
        """Memoized rows for `keys`, in that order (every key must be present)."""
        if not len(keys):
            frames = list(self._parts.values())
            return frames[0].iloc[:0].copy() if frames else pd.DataFrame({"sha256": []})
        by_part: dict[str, list[tuple[int, int]]] = {}
        for slot, key in enumerate(keys):
            name, position = self._index[key]
            by_part.setdefault(name, []).append((slot, position))
        pieces = []
        for name, pairs in by_part.items():
            slots, positions = zip(*pairs, strict=True)
            piece = self._parts[name].iloc[list(positions)].copy()
            piece.index = list(slots)
            pieces.append(piece)
        return pd.concat(pieces).sort_index().reset_index(drop=True)

    def arrays(self, keys: Sequence[str]) -> np.ndarray:
        """Memoized pixel arrays for `keys`, stacked in that order."""
        loaded: dict[str, np.ndarray] = {}
        out = []
        for key in keys:
            name, position = self._index[key]
            if name not in loaded:
                loaded[name] = np.load(self.directory / f"{name}.npy", mmap_mode="r")
            out.append(loaded[name][position])
        return np.stack(out) if out else np.zeros((0,), np.uint8)

    def put(self, rows: pd.DataFrame, arrays: np.ndarray | None = None) -> None:
        """Memoize rows (with a `sha256` column) and, if given, their arrays (first axis aligned)."""
        if rows.empty:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = "part-" + hashlib.sha256("\n".join(rows["sha256"]).encode()).hexdigest()[:16]
        if arrays is not None:
            write_with(self.directory / f"{name}.npy", lambda tmp: _save_npy(tmp, arrays), durable=True)
        write_table(rows, self.directory / f"{name}.parquet", durable=True)
        self._add_part(name, rows)


def log_decodes(stage: str, decoded: int, cached: int) -> None:
    """Append how many images a stage decoded and how many came from the memo.

    The log sits beside the cache, outside every pipeline output, so that counting
    decodes never makes two runs' outputs differ.
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "decodes.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps({"stage": stage, "decoded": decoded, "cached": cached}) + "\n")
