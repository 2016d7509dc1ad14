"""source.yaml loading and labels: every user mistake is one line naming the source and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from photoprep.core.errors import UserError
from photoprep.ingest.sources import SourceConfig, list_sources, load_labels, load_source

REPO = Path(__file__).resolve().parents[1]


def write_source(root: Path, name: str, config: str, files: dict[str, str] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "source.yaml").write_text(config, encoding="utf-8")
    for file_name, text in (files or {}).items():
        (folder / file_name).write_text(text, encoding="utf-8", newline="")
    return folder


HEOBS = 'format: heobs\nmanifest: photos.txt\nurl: "https://cdn.example.org/photo/{id}"\n'


def test_heobs_source_shipped_in_the_repo_loads() -> None:
    cfg = load_source("heobs", REPO / "pipeline/sources")
    assert cfg.name == "heobs"
    assert cfg.format == "heobs"
    assert cfg.url == "https://cdn.heobs.org/photo/{id}"
    assert cfg.manifest_path == REPO / "pipeline/sources/heobs/photos.txt"
    assert cfg.labels is None
    assert cfg.allow_cross_host_redirects is False


def test_full_config_is_read_with_every_key(tmp_path: Path) -> None:
    write_source(
        tmp_path,
        "shop",
        "format: csv\nmanifest: items.csv\nurl: 'file:///data/{id}.jpg'\nlabels: labels.csv\n"
        "allow_cross_host_redirects: true\nid_column: sku\nurl_column: link\n"
        "label_column: kind\ntitle_column: name\n",
    )
    cfg = load_source("shop", tmp_path)
    assert cfg.directory == tmp_path / "shop"
    columns = (cfg.id_column, cfg.url_column, cfg.label_column, cfg.title_column)
    assert columns == ("sku", "link", "kind", "name")
    assert cfg.allow_cross_host_redirects is True
    assert cfg.labels_path == tmp_path / "shop" / "labels.csv"


def test_list_sources_names_folders_with_a_source_yaml(tmp_path: Path) -> None:
    write_source(tmp_path, "b", HEOBS)
    write_source(tmp_path, "a", HEOBS)
    (tmp_path / "no_config").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "source.yaml").write_text(HEOBS)
    assert list_sources(tmp_path) == ["a", "b"]
    assert list_sources(tmp_path / "missing") == []


def test_missing_source_folder_names_the_known_ones(tmp_path: Path) -> None:
    write_source(tmp_path, "heobs", HEOBS)
    with pytest.raises(UserError) as err:
        load_source("flickr", tmp_path)
    msg = str(err.value)
    assert msg.startswith("source 'flickr': folder ")
    assert "flickr not found (known sources: heobs)" in msg
    assert "\n" not in msg


def test_missing_source_yaml(tmp_path: Path) -> None:
    (tmp_path / "heobs").mkdir()
    with pytest.raises(UserError, match=r"^source 'heobs': .*heobs/source.yaml not found$"):
        load_source("heobs", tmp_path)


def test_missing_source_yaml_message_uses_the_path_as_given() -> None:
    with pytest.raises(UserError) as err:
        load_source("nope", Path("pipeline/sources"))
    assert str(err.value).startswith("source 'nope': folder pipeline/sources/nope not found")


def test_bad_format_value_lists_the_allowed_ones(tmp_path: Path) -> None:
    write_source(tmp_path, "x", "format: xml\nmanifest: a.xml\n")
    with pytest.raises(UserError) as err:
        load_source("x", tmp_path)
    assert str(err.value) == (
        "source 'x': source.yaml: format: "
        "must be one of 'heobs', 'csv', 'tsv', 'urls' or 'folder' (got 'xml')"
    )


def test_unknown_key_is_named(tmp_path: Path) -> None:
    write_source(tmp_path, "x", HEOBS + "lables: labels.csv\n")
    with pytest.raises(UserError, match=r"^source 'x': source.yaml: lables: unknown key$"):
        load_source("x", tmp_path)


@pytest.mark.parametrize("key", ["name", "directory"])
def test_keys_filled_in_by_the_loader_cannot_be_set(tmp_path: Path, key: str) -> None:
    write_source(tmp_path, "x", HEOBS + f"{key}: other\n")
    with pytest.raises(UserError, match=rf"^source 'x': source.yaml: {key}: unknown key$"):
        load_source("x", tmp_path)


def test_missing_required_key(tmp_path: Path) -> None:
    write_source(tmp_path, "x", "format: heobs\nurl: 'https://h/{id}'\n")
    with pytest.raises(UserError, match=r"^source 'x': source.yaml: manifest: Field required"):
        load_source("x", tmp_path)


@pytest.mark.parametrize("name", ["a/b", "..", "../heobs", ".hidden", "", "a\\b", "sp ace"])
def test_name_must_be_a_simple_folder_name(tmp_path: Path, name: str) -> None:
    write_source(tmp_path, "heobs", HEOBS)
    with pytest.raises(UserError, match="name must be a simple folder name"):
        load_source(name, tmp_path / "heobs")


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    write_source(tmp_path, "x", "format: [heobs\n")
    with pytest.raises(UserError) as err:
        load_source("x", tmp_path)
    assert str(err.value).startswith("source 'x': source.yaml: not valid YAML:")
    assert "\n" not in str(err.value)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    write_source(tmp_path, "x", "- heobs\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_source("x", tmp_path)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("format: heobs\nmanifest: p.txt\n", "url: required for format heobs"),
        ("format: heobs\nmanifest: p.txt\nurl: https://h/photo\n", "url: must contain {id}"),
        ("format: heobs\nmanifest: p.txt\nurl: 'ftp://h/{id}'\n", "url: scheme must be http, https, file"),
        ("format: urls\nmanifest: u.txt\nurl: 'https://h/{id}'\n", "url: not used by format urls"),
        ("format: folder\nmanifest: images\nurl: 'https://h/{id}'\n", "url: not used by format folder"),
        ("format: heobs\nmanifest: ../p.txt\nurl: 'https://h/{id}'\n", "manifest: must be a relative path"),
        ("format: heobs\nmanifest: /etc/p.txt\nurl: 'https://h/{id}'\n", "manifest: must be a relative path"),
        ("format: folder\nmanifest: images\nlabels: ../labels.csv\n", "labels: must be a relative path"),
        ("format: urls\nmanifest: u.txt\nid_column: sku\n", "id_column: only for format csv"),
        ("format: urls\nmanifest: u.txt\nallow_cross_host_redirects: maybe\n", "allow_cross_host_redirects"),
    ],
)
def test_inconsistent_configs_are_rejected(tmp_path: Path, config: str, message: str) -> None:
    write_source(tmp_path, "x", config)
    with pytest.raises(UserError) as err:
        load_source("x", tmp_path)
    assert str(err.value).startswith(f"source 'x': source.yaml: {message}")
    assert "\n" not in str(err.value)


def test_templates_that_are_local_work(tmp_path: Path) -> None:
    write_source(tmp_path, "a", "format: heobs\nmanifest: p.txt\nurl: 'file:///srv/photos/{id}.jpg'\n")
    write_source(tmp_path, "b", "format: heobs\nmanifest: p.txt\nurl: 'images/{id}.jpg'\n")
    assert load_source("a", tmp_path).url == "file:///srv/photos/{id}.jpg"
    assert load_source("b", tmp_path).url == "images/{id}.jpg"


def test_csv_source_may_have_no_template(tmp_path: Path) -> None:
    write_source(tmp_path, "x", "format: csv\nmanifest: m.csv\n")
    assert load_source("x", tmp_path).url is None


def test_source_config_is_validated_when_built_directly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="url: required for format heobs"):
        SourceConfig(name="x", directory=tmp_path, format="heobs", manifest="p.txt")


# labels


def labelled(tmp_path: Path, labels_text: str | None) -> SourceConfig:
    files = {} if labels_text is None else {"labels.csv": labels_text}
    write_source(tmp_path, "x", HEOBS + "labels: labels.csv\n", files)
    return load_source("x", tmp_path)


def test_no_labels_file_declared_gives_an_empty_table(tmp_path: Path) -> None:
    write_source(tmp_path, "x", HEOBS)
    labels = load_labels(load_source("x", tmp_path))
    assert list(labels.columns) == ["source", "id", "label"]
    assert labels.empty


def test_labels_are_read_sorted_by_id(tmp_path: Path) -> None:
    cfg = labelled(tmp_path, "id,label,note\nb2,dog,x\na1,cat,\n a3 , cat ,y\n")
    labels = load_labels(cfg)
    assert labels.to_dict("records") == [
        {"source": "x", "id": "a1", "label": "cat"},
        {"source": "x", "id": "a3", "label": "cat"},
        {"source": "x", "id": "b2", "label": "dog"},
    ]


def test_labels_tolerate_bom_crlf_blank_lines_and_column_order(tmp_path: Path) -> None:
    cfg = labelled(tmp_path, "\ufefflabel,id\r\n\r\ncat,a1\r\ndog,b2\r\n\r\n")
    labels = load_labels(cfg)
    assert labels["id"].tolist() == ["a1", "b2"]
    assert labels["label"].tolist() == ["cat", "dog"]


def test_repeated_id_with_the_same_label_is_kept_once(tmp_path: Path) -> None:
    labels = load_labels(labelled(tmp_path, "id,label\na1,cat\na1,cat\n"))
    assert labels["id"].tolist() == ["a1"]


@pytest.mark.parametrize("seed", range(3))
def test_a_plain_labels_file_reads_as_the_line_reader_reads_it(tmp_path: Path, monkeypatch, seed) -> None:
    """Arrow's CSV reader takes a plain file (no quote, carriage return or NUL, nothing to
    report); one quote sends the same labels to the csv module's reader: the same table."""
    import numpy as np
    import pandas as pd
    import pyarrow.csv

    rng = np.random.default_rng(seed)
    ids = [f"{int(v):05d}" for v in rng.integers(0, 300, 400)] + ["ä", "日本", "Z", "a-b", "10", "9"]
    rows = [f"{i},c{i[-1]},n{k}" for k, i in enumerate(ids)]  # an id repeated with its one label
    plain = "id,label,note\n" + "\n".join(rows) + "\n"
    quoted = plain.replace(",n0\n", ',"n0"\n', 1)
    calls: list[int] = []
    read_csv = pyarrow.csv.read_csv
    monkeypatch.setattr(pyarrow.csv, "read_csv", lambda *a, **k: calls.append(1) or read_csv(*a, **k))
    fast = load_labels(labelled(tmp_path / "plain", plain))
    assert calls == [1]  # Arrow read it
    slow = load_labels(labelled(tmp_path / "quoted", quoted))
    assert calls == [1]  # the line reader did
    pd.testing.assert_frame_equal(fast, slow)
    assert fast["id"].tolist() == sorted(set(ids))


def test_conflicting_labels_name_the_id_and_both_lines(tmp_path: Path) -> None:
    cfg = labelled(tmp_path, "id,label\na1,cat\nb2,dog\n\na1,dog\n")
    with pytest.raises(UserError) as err:
        load_labels(cfg)
    assert str(err.value) == (
        "source 'x': labels "
        + (tmp_path / "x/labels.csv").as_posix()
        + ": id 'a1' has label 'cat' on line 2 and 'dog' on line 5"
    )


def test_declared_labels_file_that_is_missing(tmp_path: Path) -> None:
    cfg = labelled(tmp_path, None)
    with pytest.raises(UserError, match=r"^source 'x': labels .*x/labels.csv not found$"):
        load_labels(cfg)


def test_labels_without_id_and_label_columns(tmp_path: Path) -> None:
    cfg = labelled(tmp_path, "photo,class\na1,cat\n")
    with pytest.raises(UserError, match=r"needs columns id and label \(has: photo, class\)$"):
        load_labels(cfg)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,label\na1,cat\n,dog\n", "line 3: empty id"),
        ("id,label\na1,\n", "line 2: empty label"),
        ("id,label\na1,cat,extra\n", "line 2: expected 2 fields, got 3"),
        ("", "empty (needs a header line id,label)"),
    ],
)
def test_bad_label_rows_stop_with_the_line_number(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        load_labels(labelled(tmp_path, text))
    assert str(err.value).endswith(message)
