"""Helpers of the download tests: fast params, records for a loopback CDN, and assertions on rows."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from photoprep.core.params import DownloadParams
from photoprep.ingest.blobs import read_blobs
from photoprep.ingest.fetch import Place, fetch_all

# Timeouts generous enough for a busy test machine; backoff short enough for a fast suite.
FAST = DownloadParams(
    concurrency=8,
    per_host=8,
    connect_timeout=2.0,
    read_timeout=0.8,
    retries=3,
    backoff_base=0.01,
    backoff_max=0.5,
)


def photo(id_: str, size: int = 3000) -> bytes:
    """Bytes that sniff as a JPEG, different for every id."""
    seed = hashlib.sha256(id_.encode()).digest()
    return (b"\xff\xd8\xff\xe0" + seed * (size // 32 + 1))[:size]


def records(url_of, *ids: str, source: str = "demo") -> pd.DataFrame:
    """Manifest records for `ids`; `url_of(id)` gives the url (e.g. cdn.url)."""
    return pd.DataFrame(
        {
            "source": source,
            "id": list(ids),
            "url": [url_of(i) for i in ids],
            "title": [f"title of {i}" for i in ids],
        }
    )


def run(
    recs: pd.DataFrame,
    tmp_path: Path,
    p: DownloadParams = FAST,
    *,
    previous: pd.DataFrame | None = None,
    allow_cross_host: bool = False,
) -> pd.DataFrame:
    """fetch_all into tmp_path/store, with tmp_path/source as the source folder."""
    if allow_cross_host:
        p = p.model_copy(update={"allow_cross_host_redirects": True})
    return fetch_all(
        recs, Place(tmp_path / "store", tmp_path / "source"), p, previous=previous, progress=False
    )


def row(table: pd.DataFrame, id_: str) -> pd.Series:
    (match,) = table.index[table["id"] == id_]
    return table.loc[match]


def stored(tmp_path: Path, r: pd.Series) -> bytes:
    """The bytes the store holds for a result row."""
    (data,) = read_blobs(tmp_path / "store", [(r["shard"], r["offset"], r["size"])])
    return data


def assert_ok(tmp_path: Path, table: pd.DataFrame, id_: str, data: bytes) -> None:
    r = row(table, id_)
    assert (r["status"], r["reason"]) == ("ok", "")
    assert r["sha256"] == hashlib.sha256(data).hexdigest()
    assert r["size"] == len(data)
    assert stored(tmp_path, r) == data


def assert_failed(table: pd.DataFrame, id_: str, reason: str) -> None:
    r = row(table, id_)
    assert (r["status"], r["reason"]) == ("failed", reason)
    assert (r["sha256"], r["size"], r["shard"]) == ("", 0, "")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def make_source(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A source folder with files under cdn/ (names relative to it)."""
    base = tmp_path / "source"
    for name, data in files.items():
        path = base / "cdn" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return base
