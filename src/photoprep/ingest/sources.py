"""Sources: `pipeline/sources/<name>/source.yaml` read into a typed `SourceConfig`, plus labels.

A source folder holds everything a source needs (config, manifest, optional `labels.csv`),
so the download stage can depend on the whole folder and nothing outside it. That is why
`manifest` and `labels` must be relative paths that stay inside the source folder.

```yaml
format: heobs                              # heobs | csv | tsv | urls | folder
manifest: photos.txt                       # for folder: the folder of class sub-folders
url: "https://cdn.heobs.org/photo/{id}"    # {id} is URL-quoted; file:// and relative paths work too
labels: labels.csv                         # optional, columns id,label
allow_cross_host_redirects: false          # optional
id_column: id                              # csv/tsv only, like url_column, label_column, title_column
```
"""

from __future__ import annotations

import csv
import re
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from photoprep.core.errors import UserError, describe_validation_error
from photoprep.core.layout import PATHS
from photoprep.core.params import DownloadParams

Format = Literal["heobs", "csv", "tsv", "urls", "folder"]

DEFAULT_ROOT = PATHS.sources_dir
URL_SCHEMES = ("http", "https", "file")

# A source name becomes a folder name, a DVC foreach key and part of output paths: keep it plain.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TABLE_KEYS = ("id_column", "url_column", "label_column", "title_column")


class SourceConfig(BaseModel):
    """One source: where its manifest is, how to read it, and how an id becomes a URL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    directory: Path
    format: Format
    manifest: str
    url: str | None = None
    labels: str | None = None
    allow_cross_host_redirects: bool = False
    id_column: str = "id"
    url_column: str = "url"
    label_column: str = "label"
    title_column: str = "title"

    def download_params(self, p: DownloadParams) -> DownloadParams:
        """`p` with this source's own allowance of cross-host redirects (it can only allow them)."""
        if self.allow_cross_host_redirects and not p.allow_cross_host_redirects:
            return p.model_copy(update={"allow_cross_host_redirects": True})
        return p

    @model_validator(mode="after")
    def _consistent(self) -> SourceConfig:
        for key in ("manifest", "labels"):
            value = getattr(self, key)
            if value is not None and not _inside_folder(value):
                raise ValueError(f"{key}: must be a relative path inside the source folder (got {value!r})")
        if self.format in ("urls", "folder") and self.url is not None:
            where = "each line" if self.format == "urls" else "each file's path"
            raise ValueError(f"url: not used by format {self.format} (the url is {where})")
        if self.format == "heobs" and self.url is None:
            raise ValueError("url: required for format heobs (a template with {id})")
        if self.url is not None:
            if "{id}" not in self.url:
                raise ValueError(f"url: must contain {{id}} (got {self.url!r})")
            scheme = urlsplit(self.url).scheme.lower()
            if scheme and scheme not in URL_SCHEMES:
                raise ValueError(
                    f"url: scheme must be http, https, file or none for a local path (got {scheme!r})"
                )
        if self.format not in ("csv", "tsv"):
            for key in _TABLE_KEYS:
                if key in self.model_fields_set:
                    raise ValueError(f"{key}: only for format csv or tsv")
        return self

    @property
    def manifest_path(self) -> Path:
        return self.directory / self.manifest

    @property
    def labels_path(self) -> Path | None:
        return None if self.labels is None else self.directory / self.labels


def _inside_folder(path: str) -> bool:
    p = PurePosixPath(path.replace("\\", "/"))
    parts = [part for part in p.parts if part != "."]
    return bool(parts) and not p.is_absolute() and ".." not in parts and ":" not in parts[0]


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name or ""):
        raise UserError(
            f"source {name!r}: name must be a simple folder name "
            "(letters, digits, '_', '-', '.'; no '/', no leading '.')"
        )


def list_sources(root: Path = DEFAULT_ROOT) -> list[str]:
    """Names of the source folders under `root` that hold a source.yaml, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / "source.yaml").is_file())


def load_source(name: str, root: Path = DEFAULT_ROOT) -> SourceConfig:
    """Read and validate `<root>/<name>/source.yaml`; raise UserError naming the bad key."""
    _check_name(name)
    root = Path(root)
    directory = root / name
    config = directory / "source.yaml"
    if not directory.is_dir():
        known = ", ".join(list_sources(root)) or "none"
        raise UserError(f"source {name!r}: folder {directory.as_posix()} not found (known sources: {known})")
    if not config.is_file():
        raise UserError(f"source {name!r}: {config.as_posix()} not found")
    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"source {name!r}: source.yaml: not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise UserError(f"source {name!r}: source.yaml: must be a mapping (format, manifest, url, ...)")
    for injected in ("name", "directory"):
        if injected in raw:
            raise UserError(f"source {name!r}: source.yaml: {injected}: unknown key")
    try:
        return SourceConfig.model_validate({**raw, "name": name, "directory": directory})
    except ValidationError as exc:
        raise UserError(
            f"source {name!r}: source.yaml: {describe_validation_error(exc.errors()[0])}"
        ) from None


def load_labels(cfg: SourceConfig) -> pd.DataFrame:
    """The source's labels file as a table `source, id, label`, sorted by id.

    An empty table when the source declares no labels file. The file is hand-made
    configuration, so its problems stop the run (UserError with the line number):
    a missing file, no `id`/`label` header, an empty id or label, or an id given two
    different labels. An id repeated with the same label is kept once.
    """
    columns = ["source", "id", "label"]
    path = cfg.labels_path
    if path is None:
        return pd.DataFrame({c: pd.Series([], dtype=str) for c in columns})
    where = f"source {cfg.name!r}: labels {path.as_posix()}"
    if not path.is_file():
        raise UserError(f"{where} not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
    quick = _labels_by_arrow(text)
    if quick is not None:
        ids, names = (pd.Series(column.to_pandas(), dtype=str) for column in quick)
    else:
        labels = _labels_by_lines(text, where)
        order = sorted(labels)
        ids, names = pd.Series(order, dtype=str), pd.Series([labels[i][0] for i in order], dtype=str)
    return pd.DataFrame({"source": pd.Series([cfg.name] * len(ids), dtype=str), "id": ids, "label": names})


# What Python's str.strip() removes (str.isspace). A cell that is empty, or that starts or ends
# with one of these, is read line by line, where the strip and the report are Python's own.
_SPACE = r"[\t\n\x0b\x0c\r\x1c-\x1f\x85\p{Z}]"
_NOT_PLAIN = rf"^$|^{_SPACE}|{_SPACE}$"


def _labels_by_arrow(text: str) -> tuple[pa.Array, pa.Array] | None:
    """The ids, sorted, and their labels, by Arrow's CSV reader, for a labels file that the
    csv module reads the same way and that holds nothing to report or to clean: no quote,
    carriage return or NUL, a header of plain names with id and label, every row as wide as
    the header, no blank id or label, no cell with spaces around it, no id with two labels.
    None otherwise: `_labels_by_lines` reads it and names the line of each problem.

    Why: at 146,009 labels the line-by-line reader took 0.25 CPU s of the split stage's 2.2, and
    the split stage runs again in full on every increment."""
    if any(c in text for c in '"\r\0'):
        return None
    first = next((line for line in text.split("\n", 64) if line), None)
    header = first.split(",") if first is not None else []
    if "id" not in header or "label" not in header or len(set(header)) != len(header):
        return None
    if any(name != name.strip() or not name for name in header):
        return None
    try:
        table = pacsv.read_csv(
            pa.py_buffer(text.encode("utf-8")),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(header, pa.string()),
                strings_can_be_null=False,
                include_columns=["id", "label"],
            ),
        )
    except pa.ArrowInvalid:  # a row of another width: the line reader says which
        return None
    ids, labels = table.column("id"), table.column("label")
    if any(pc.any(pc.match_substring_regex(column, _NOT_PLAIN)).as_py() for column in (ids, labels)):
        return None
    if not len(ids):
        return ids.combine_chunks(), labels.combine_chunks()
    order = pc.sort_indices(ids)  # in code points, as Python sorts texts
    ids, labels = ids.take(order).combine_chunks(), labels.take(order).combine_chunks()
    same_id = pc.equal(ids[1:], ids[:-1])
    if pc.any(pc.and_(same_id, pc.not_equal(labels[1:], labels[:-1]))).as_py():
        return None  # an id with two labels: an error, with both lines
    keep = pa.concat_arrays([pa.array([True]), pc.invert(same_id)])  # a repeated id once
    return ids.filter(keep), labels.filter(keep)


def _labels_by_lines(text: str, where: str) -> dict[str, tuple[str, int]]:
    """Each id's label and the line it was first given on, read line by line with the csv
    module; a problem stops the run with its line (UserError)."""
    reader = csv.reader(line + "\n" for line in text.split("\n"))
    header: list[str] | None = None
    labels: dict[str, tuple[str, int]] = {}
    line_no = previous_end = 0
    try:
        for row in reader:
            # a quoted field may span lines: report the line where the record starts
            line_no, previous_end = previous_end + 1, reader.line_num
            if header is None:
                if any(cell.strip() for cell in row):
                    header = [cell.strip() for cell in row]
                    missing = [c for c in ("id", "label") if c not in header]
                    if missing:
                        raise UserError(f"{where}: needs columns id and label (has: {', '.join(header)})")
                    id_at, label_at, width = header.index("id"), header.index("label"), len(header)
                continue
            id_, label = (row[id_at].strip(), row[label_at].strip()) if len(row) == width else ("", "")
            if not id_ or not label:  # a blank line, or a line in error: looked at only then
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != width:
                    raise UserError(f"{where}: line {line_no}: expected {width} fields, got {len(row)}")
                raise UserError(f"{where}: line {line_no}: empty {'id' if not id_ else 'label'}")
            if id_ in labels:
                first_label, first_line = labels[id_]
                if first_label != label:
                    raise UserError(
                        f"{where}: id {id_!r} has label {first_label!r} on line {first_line} "
                        f"and {label!r} on line {line_no}"
                    )
                continue
            labels[id_] = (label, line_no)
    except csv.Error as exc:
        raise UserError(f"{where}: line {previous_end + 1}: {exc}") from None
    if header is None:
        raise UserError(f"{where}: empty (needs a header line id,label)")
    return labels
