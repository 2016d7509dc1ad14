"""Manifests: a source's list of images read into one record per unique id.

Formats (`source.yaml: format`):

- ``heobs``: ``id | title | lang`` lines, one per id and language. A line is split at its
  first and its last ``|``, so a title keeps any ``|`` inside it (``a | x | y | fra`` is id
  ``a``, title ``x | y``, lang ``fra``). Spaces around the pipes are dropped. An empty
  title is allowed (the id still counts); an empty id or lang is not.
- ``csv`` / ``tsv``: a header line, then rows read with the csv module. The id comes from
  ``id_column`` (or is the url when there is no id column), the url from ``url_column``
  (or from the template and the id), the label from ``label_column`` and a title from
  ``title_column`` (stored under the language ``und``, "undetermined"). A row whose id is
  already known with a different url or label is reported, not merged.
- ``urls``: one URL per line (http, https or file); the id is the URL; ``#`` starts a comment line.
- ``folder``: ``<manifest>/<class>/<file>``; the id is ``<class>/<file>`` (forward slashes;
  files in deeper sub-folders keep their path and belong to the top class), the label is the
  class, the url is the file's path relative to the source folder. Every regular file is
  listed (validation rejects what is not an image); hidden names are skipped; a file outside
  a class folder, a symlinked folder (never followed), a FIFO, socket or device (never opened)
  and a name that is not UTF-8 are refused rows of `malformed`. "Line" numbers are positions in
  the sorted list of files.

Every url is a URL reference: absolute (``https://``, ``file://``) or relative to the source
folder, with each path segment percent-quoted. The fetcher resolves it and unquotes it; since
an id may unquote to ``../..``, a local path must be checked to stay where it is meant to.

A UTF-8 BOM, CRLF line ends and blank lines are tolerated. A malformed line (wrong number
of fields, empty id, an id with whitespace or control characters, a url that is not a URL,
bytes that are not UTF-8) becomes a row of `Manifest.malformed` with its line number and
reason; it never stops the run. Parsing is one pass over the lines. The heobs reader puts the
good lines in Arrow columns as it goes and merges each id's lines after a sort by id (`_runs`),
a thousand lines at a time, so its heap follows the Arrow columns, not a Python object a line:
144,564 lines in 0.51 s with 33 MB at its peak, against 0.68 s and 87 MB for a dict keyed by id
(this 2-core AMD). The other formats, far smaller in practice, merge in a dict keyed by id.

Counting rule: ``lines_read == records.n_lines.sum() + len(malformed)``; ``lines_read``
counts non-blank data lines (not a CSV header, not a comment line; files for ``folder``).

Why one module
    Every format ends in the same record table with the same malformed-line rules (line
    numbers, reasons, the repeated-id merge); one reader per format would repeat those rules.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import operator
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from photoprep.core.errors import UserError
from photoprep.ingest.sources import URL_SCHEMES, SourceConfig

RECORD_COLUMNS = ["source", "id", "url", "titles", "label", "first_line", "n_lines"]
MALFORMED_COLUMNS = ["source", "line_no", "line", "reason"]
UNDETERMINED_LANG = "und"
SHOWN_LINE_CHARS = 500  # a malformed line is kept up to this length in reports

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes kept by surrogateescape
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")  # what quote(safe="") leaves as it is
_TITLES_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode
_NOT_UTF8 = "not valid UTF-8"
_BAD_ID = "id contains whitespace or control characters"
_DOT_IDS = frozenset({".", ".."})  # in a url template they would name the folder or its parent
_DOT_ID = "id is '.' or '..'"
_CHUNK = 1024  # lines or ids made Arrow columns at a time: so many Python objects at most
_TEXT = pa.large_string()
_LINE_TYPES = {"line_no": pa.int64(), "id": _TEXT, "title": _TEXT, "lang": _TEXT}
_RUN_TYPES = {"id": _TEXT, "url": _TEXT, "titles": _TEXT, "first_line": pa.int64(), "n_lines": pa.int64()}


@dataclass
class Manifest:
    """The records of one source, the lines that could not be read, and the line count."""

    records: pd.DataFrame
    malformed: pd.DataFrame
    lines_read: int


def url_for(template: str, id: str) -> str:
    """The url of `id`: `{id}` in the template replaced by the id, quoted with no safe characters.

    Quoting every '/' and '.' sequence means an id like '../../etc/passwd' stays one path
    segment ('..%2F..%2Fetc%2Fpasswd') and cannot change the host or the query.
    """
    return template.replace("{id}", id if _UNRESERVED.fullmatch(id) else quote(id, safe=""))


def _is_clean(s: str) -> bool:
    """No whitespace and no control characters. Python's printable excludes every Unicode
    space but ' ', control and format characters and lone surrogates; cheaper than a regex."""
    return s.isprintable() and " " not in s


def _iter_lines(text: str) -> Iterator[str]:
    """Lines split on '\\n' only (U+2028 or a form feed inside a title is not a line end), one at
    a time (no list of every line); a leading BOM is dropped, and a last empty line."""
    start, end = (1 if text.startswith("\ufeff") else 0), len(text)
    while start < end:
        stop = text.find("\n", start)
        if stop < 0:
            stop = end
        yield text[start:stop]
        start = stop + 1


def _shown(line: str) -> str:
    """A malformed line as it goes in a report: valid text, not too long."""
    line = line.rstrip("\r")
    if _SURROGATE.search(line):
        line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return line if len(line) <= SHOWN_LINE_CHARS else line[:SHOWN_LINE_CHARS] + "…"


def parse_heobs(text: str) -> tuple[list[tuple[int, str, str, str]], list[tuple[int, str, str]]]:
    """Parse `id | title | lang` lines into (line_no, id, title, lang) and (line_no, line, reason)."""
    bad: list[tuple[int, str, str]] = []
    return list(heobs_lines(text, bad)), bad


def heobs_lines(text: str, bad: list[tuple[int, str, str]]) -> Iterator[tuple[int, str, str, str]]:
    """(line_no, id, title, lang) of each good `id | title | lang` line, one at a time (no list of
    every line is made); each bad line's (line_no, line, reason) is added to `bad`."""
    check_utf8 = _SURROGATE.search(text) is not None
    for line_no, line in enumerate(_iter_lines(text), 1):
        s = line.strip()
        if not s:
            continue
        first = s.find("|")
        last = s.rfind("|")
        if first == last:
            n = s.count("|") + 1
            bad.append((line_no, _shown(line), f"expected 'id | title | lang', got {n} field{'s' * (n > 1)}"))
            continue
        id_ = s[:first].strip()
        lang = s[last + 1 :].strip()
        title = s[first + 1 : last].strip()
        if check_utf8 and _SURROGATE.search(s):
            if _SURROGATE.search(id_) or _SURROGATE.search(lang):
                bad.append((line_no, _shown(line), _NOT_UTF8))
                continue
            # a bad byte in a title should not cost the image: show it as U+FFFD
            title = title.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if not id_:
            bad.append((line_no, _shown(line), "empty id"))
        elif not id_.isprintable() or " " in id_:  # inline _is_clean: the hot loop
            bad.append((line_no, _shown(line), _BAD_ID))
        elif id_ in _DOT_IDS:
            bad.append((line_no, _shown(line), _DOT_ID))
        elif not lang:
            bad.append((line_no, _shown(line), "empty lang"))
        else:
            yield line_no, id_, title, lang


def url_problem(url: str) -> str | None:
    """Why `url` is not a URL that the fetcher can use, or None when it is."""
    if not _is_clean(url):
        return "url contains whitespace or control characters"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a URL"
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        return "not a URL (needs http://, https:// or file://)"
    if scheme != "file" and not parts.hostname:
        return "not a URL (no host)"
    if scheme == "file" and not parts.path:
        return "not a URL (no path)"
    return None


class _Records:
    """Records merged by id in one pass: the first line of an id wins, later ones add titles."""

    def __init__(self) -> None:
        # id -> [first_line, n_lines, url, label, titles]
        self.by_id: dict[str, list] = {}

    def add(
        self, line_no: int, id_: str, url: str | None, label: str | None, title: str, lang: str
    ) -> str | None:
        """Add one line; return a reason when it contradicts the id's first line."""
        rec = self.by_id.get(id_)
        if rec is None:
            self.by_id[id_] = [line_no, 1, url, label, {lang: title} if title else {}]
            return None
        if url is not None and rec[2] is not None and url != rec[2]:
            return f"id {id_!r} already on line {rec[0]} with another url"
        if label is not None and rec[3] is not None and label != rec[3]:
            return f"id {id_!r} already on line {rec[0]} with label {rec[3]!r}"
        rec[1] += 1
        if title and lang not in rec[4]:
            rec[4][lang] = title
        return None

    def frame(self, source: str) -> pd.DataFrame:
        """The records as a table sorted by id; the records are emptied.

        Each column is an Arrow array before the table is made, and the records' Python objects
        (a list, a dict and texts an id) are freed first: the table's few objects then land
        where nothing else lives, not among the parse's freed ones, whose memory they would keep
        from going back to the system."""
        ids = sorted(self.by_id)
        recs = [self.by_id[i] for i in ids]
        urls = [r[2] for r in recs]
        texts = {
            "id": pa.array(ids, pa.large_string()),
            "url": pa.array(urls, pa.large_string()),
            "titles": pa.array([_TITLES_JSON(r[4]) if r[4] else "{}" for r in recs], pa.large_string()),
            "label": pa.array([r[3] for r in recs], pa.large_string()),
        }
        numbers = {
            "first_line": np.array([r[0] for r in recs], np.int64),
            "n_lines": np.array([r[1] for r in recs], np.int64),
        }
        del ids, recs, urls
        self.by_id.clear()
        return _records_frame(source, texts, numbers)


def _records_frame(source: str, texts: dict[str, pa.Array], numbers: dict[str, np.ndarray]) -> pd.DataFrame:
    """The record table of its text columns (Arrow) and its number columns."""
    columns = {name: pd.Series(values, dtype=str) for name, values in texts.items()}
    columns["source"] = pd.Series([source] * len(numbers["first_line"]), dtype=str)
    return pd.DataFrame({**columns, **numbers}, columns=RECORD_COLUMNS)


def _runs(lines: Iterable[tuple[int, str, str, str]], template: str | None) -> Iterator[tuple[Any, ...]]:
    """One record a run of lines with the same id, from lines sorted by id, then line: (id, url,
    titles, first line, line count), merged as `_Records` merges them (the first title of each
    language)."""
    for id_, run in itertools.groupby(lines, key=operator.itemgetter(1)):
        titles: dict[str, str] = {}
        first = count = 0
        for line_no, _, title, lang in run:
            first, count = first or line_no, count + 1
            if title and lang not in titles:
                titles[lang] = title
        url = url_for(template, id_) if template is not None else None
        yield id_, url, _TITLES_JSON(titles) if titles else "{}", first, count


def _arrow_table(rows: Iterable[tuple[Any, ...]], types: dict[str, pa.DataType]) -> pa.Table:
    """`rows` (tuples in the order of `types`) as Arrow columns, made `_CHUNK` rows at a time: so
    many rows' Python objects at most."""
    chunks = []
    rest = iter(rows)
    while batch := list(itertools.islice(rest, _CHUNK)):
        columns = zip(types.items(), zip(*batch, strict=True), strict=True)
        chunks.append(pa.table({name: pa.array(values, kind) for (name, kind), values in columns}))
    if not chunks:
        return pa.table({name: pa.array([], kind) for name, kind in types.items()})
    return pa.concat_tables(chunks)


def _table_rows(table: pa.Table) -> Iterator[tuple[Any, ...]]:
    """The rows of `table` as tuples, made `_CHUNK` at a time."""
    for start in range(0, table.num_rows, _CHUNK):
        yield from zip(*(column.to_pylist() for column in table.slice(start, _CHUNK).columns), strict=True)


def _malformed_frame(source: str, bad: list[tuple[int, str, str]]) -> pd.DataFrame:
    bad = sorted(bad)
    return pd.DataFrame(
        {
            "source": pd.Series([source] * len(bad), dtype=str),
            "line_no": pd.Series([b[0] for b in bad], dtype="int64"),
            "line": pd.Series([b[1] for b in bad], dtype=str),
            "reason": pd.Series([b[2] for b in bad], dtype=str),
        },
        columns=MALFORMED_COLUMNS,
    )


def _where(cfg: SourceConfig) -> str:
    return f"source {cfg.name!r}: manifest {cfg.manifest_path.as_posix()}"


def _read_text(cfg: SourceConfig) -> str:
    """The manifest file as text; undecodable bytes survive as surrogate escapes, reported per line."""
    path = cfg.manifest_path
    if path.is_dir():
        raise UserError(f"{_where(cfg)}: is a folder, expected a file for format {cfg.format}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{_where(cfg)} not found") from None
    except OSError as exc:
        raise UserError(f"{_where(cfg)}: cannot read ({exc.strerror or exc})") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    return data.decode("utf-8", errors="surrogateescape")


def _read_heobs(cfg: SourceConfig, text: str) -> Manifest:
    """The good lines go into Arrow columns as they are parsed, are sorted by id there, and are
    merged a run of lines an id, `_CHUNK` lines at a time: a dict of every id held a list, a
    dict and texts an id (about 530 bytes; 11 MB at 20,200 ids, this 2-core AMD)."""
    bad: list[tuple[int, str, str]] = []
    lines = _arrow_table(heobs_lines(text, bad), _LINE_TYPES)
    lines = lines.take(pc.sort_indices(lines, [("id", "ascending"), ("line_no", "ascending")]))
    # One chunk a column: the table's later takes and copies of chunked columns held 1 MB more
    # at 20,200 ids.
    runs = _arrow_table(_runs(_table_rows(lines), cfg.url), _RUN_TYPES).combine_chunks()
    texts = {name: runs[name] for name in ("id", "url", "titles")}
    texts["label"] = pa.nulls(runs.num_rows, _TEXT)
    numbers = {name: runs[name].to_numpy() for name in ("first_line", "n_lines")}
    records = _records_frame(cfg.name, texts, numbers)
    return Manifest(records, _malformed_frame(cfg.name, bad), lines.num_rows + len(bad))


def _read_urls(cfg: SourceConfig, text: str) -> Manifest:
    records = _Records()
    bad: list[tuple[int, str, str]] = []
    check_utf8 = _SURROGATE.search(text) is not None
    lines_read = 0
    for line_no, line in enumerate(_iter_lines(text), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        lines_read += 1
        reason = _NOT_UTF8 if check_utf8 and _SURROGATE.search(s) else url_problem(s)
        if reason is None:
            reason = records.add(line_no, s, s, None, "", "")
        if reason is not None:
            bad.append((line_no, _shown(line), reason))
    return Manifest(records.frame(cfg.name), _malformed_frame(cfg.name, bad), lines_read)


def _read_table(cfg: SourceConfig, text: str) -> Manifest:
    """CSV or TSV with a header; a record may span lines inside quotes."""
    delimiter = "\t" if cfg.format == "tsv" else ","
    reader = csv.reader((line + "\n" for line in _iter_lines(text)), delimiter=delimiter)
    check_utf8 = _SURROGATE.search(text) is not None
    records = _Records()
    bad: list[tuple[int, str, str]] = []
    header: list[str] | None = None
    col: dict[str, int | None] = {}
    lines_read = 0
    previous_end = 0
    while True:
        start = previous_end + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if reader.line_num <= previous_end:  # the reader cannot move on
                break
            previous_end = reader.line_num
            lines_read += header is not None
            bad.append((start, "", f"not valid {cfg.format.upper()}: {exc}"))
            continue
        previous_end = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            col = _table_columns(cfg, header)
            continue
        lines_read += 1
        shown = delimiter.join(row)
        if check_utf8 and _SURROGATE.search(shown):
            bad.append((start, _shown(shown), _NOT_UTF8))
            continue
        if len(row) != len(header):
            bad.append((start, _shown(shown), f"expected {len(header)} fields, got {len(row)}"))
            continue
        reason = _add_table_row(cfg, records, start, row, col)
        if reason is not None:
            bad.append((start, _shown(shown), reason))
    return Manifest(records.frame(cfg.name), _malformed_frame(cfg.name, bad), lines_read)


def _table_columns(cfg: SourceConfig, header: list[str]) -> dict[str, int | None]:
    """Where each known column is in the header; UserError when no record could be read."""

    def at(name: str) -> int | None:
        return header.index(name) if name in header else None

    col = {
        "id": at(cfg.id_column),
        "url": at(cfg.url_column),
        "label": at(cfg.label_column),
        "title": at(cfg.title_column),
    }
    has = ", ".join(header)
    if col["id"] is None and col["url"] is None:
        raise UserError(f"{_where(cfg)}: needs a column {cfg.id_column!r} or {cfg.url_column!r} (has: {has})")
    if col["url"] is None and cfg.url is None:
        raise UserError(
            f"{_where(cfg)}: no column {cfg.url_column!r} and no url template in source.yaml (has: {has})"
        )
    return col


def _add_table_row(
    cfg: SourceConfig, records: _Records, line_no: int, row: list[str], col: dict[str, int | None]
) -> str | None:
    def cell(key: str) -> str:
        i = col[key]
        return "" if i is None else row[i].strip()

    row_url = cell("url")
    id_ = cell("id") if col["id"] is not None else row_url
    if not id_:
        return "empty id" if col["id"] is not None else "empty url"
    if not _is_clean(id_):
        return _BAD_ID
    if id_ in _DOT_IDS:
        return _DOT_ID
    if row_url:
        reason = url_problem(row_url)
        if reason is not None:
            return reason
        url = row_url
    elif cfg.url is not None:
        url = url_for(cfg.url, id_)
    else:
        return "empty url"
    return records.add(line_no, id_, url, cell("label") or None, cell("title"), UNDETERMINED_LANG)


def _read_folder(cfg: SourceConfig) -> Manifest:
    base = cfg.manifest_path
    if not base.is_dir():
        what = "is not a folder" if base.exists() else "not found"
        raise UserError(f"{_where(cfg)} {what} (format folder needs a folder of class sub-folders)")
    prefix = PurePosixPath(cfg.manifest.replace("\\", "/")).as_posix()
    entries = sorted(_folder_entries(base, cfg.directory))
    records = _Records()
    bad: list[tuple[int, str, str]] = []
    for line_no, (rel, refused) in enumerate(entries, 1):
        reason = refused
        if reason:
            pass
        elif _SURROGATE.search(rel):
            reason = "file name is not valid UTF-8"
        elif _CONTROL.search(rel):
            reason = "file name contains control characters"
        elif "/" not in rel:
            reason = "file outside a class folder"
        if reason:
            bad.append((line_no, _shown(rel), reason))
            continue
        url = quote(f"{prefix}/{rel}", safe="/")
        records.add(line_no, rel, url, rel.split("/", 1)[0], "", "")
    return Manifest(records.frame(cfg.name), _malformed_frame(cfg.name, bad), len(entries))


def _folder_entries(base: Path, source_dir: Path) -> Iterable[tuple[str, str]]:
    """(path relative to `base` with '/', why it is refused or '') of every non-hidden entry that is
    not a plain folder: regular files; symlinked folders (never followed: listed, refused); FIFOs,
    sockets and devices (refused without being opened, so nothing blocks on them)."""
    root = os.path.realpath(source_dir)
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        kept = []
        for name in dirnames:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                inside = os.path.realpath(full).startswith(root.rstrip(os.sep) + os.sep)
                why = "symlinked folder (not followed)" if inside else "path_outside_source: symlinked folder"
                yield rel.replace(os.sep, "/"), why
            else:
                kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            rel = (name if rel_dir == "." else os.path.join(rel_dir, name)).replace(os.sep, "/")
            try:
                mode = os.stat(full).st_mode  # follows a symlinked file; the fetcher checks where it leads
            except OSError:
                yield rel, "broken symlink"
                continue
            if stat.S_ISREG(mode):
                yield rel, ""
            elif not stat.S_ISDIR(mode):
                yield rel, "not a regular file (a FIFO, socket or device)"


def read_manifest(cfg: SourceConfig) -> Manifest:
    """Read a source's manifest: one record per unique id, sorted by id, and the malformed lines."""
    if cfg.format == "folder":
        return _read_folder(cfg)
    text = _read_text(cfg)
    if cfg.format == "heobs":
        return _read_heobs(cfg, text)
    if cfg.format == "urls":
        return _read_urls(cfg, text)
    return _read_table(cfg, text)
