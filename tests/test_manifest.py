"""Manifests of every format read into one record per id; bad lines are reported, never fatal."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from photoprep.core.errors import UserError
from photoprep.ingest import manifest as manifest_module
from photoprep.ingest.manifest import (
    MALFORMED_COLUMNS,
    RECORD_COLUMNS,
    Manifest,
    parse_heobs,
    read_manifest,
    url_for,
)
from photoprep.ingest.sources import SourceConfig, load_source

REPO = Path(__file__).resolve().parents[1]
CDN = "https://cdn.example.org/photo/{id}"


def source(tmp_path: Path, fmt: str, manifest: str | bytes | None, **keys: object) -> SourceConfig:
    """A source folder in tmp_path with `manifest` written as its manifest file."""
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    name = keys.pop("manifest_name", {"csv": "m.csv", "tsv": "m.tsv"}.get(fmt, "m.txt"))
    if fmt == "heobs":
        keys.setdefault("url", CDN)
    if isinstance(manifest, str):
        (folder / name).write_bytes(manifest.encode("utf-8"))
    elif isinstance(manifest, bytes):
        (folder / name).write_bytes(manifest)
    return SourceConfig(name="src", directory=folder, format=fmt, manifest=name, **keys)


def assert_counts_add_up(m: Manifest) -> None:
    assert list(m.records.columns) == RECORD_COLUMNS
    assert list(m.malformed.columns) == MALFORMED_COLUMNS
    assert m.lines_read == int(m.records["n_lines"].sum()) + len(m.malformed)
    assert m.records["id"].is_unique
    assert m.records["id"].tolist() == sorted(m.records["id"])


def titles(m: Manifest, id_: str) -> dict[str, str]:
    return json.loads(m.records.set_index("id").loc[id_, "titles"])


# heobs


def test_published_heobs_example_gives_three_records_with_both_languages() -> None:
    m = read_manifest(load_source("heobs", REPO / "pipeline/sources"))
    assert_counts_add_up(m)
    assert m.lines_read == 6
    assert m.malformed.empty
    assert m.records["id"].tolist() == [
        "17be8122-dbe0-11e6-860c-5fea02802d0a",
        "400286c8-dbe1-11e6-bb4d-ff975c68de04",
        "5a36f382-dbdf-11e6-95fd-d746d863c3eb",
    ]
    first = m.records.iloc[0]
    assert first["source"] == "heobs"
    assert first["url"] == "https://cdn.heobs.org/photo/17be8122-dbe0-11e6-860c-5fea02802d0a"
    assert first["titles"] == '{"fra": "Vieux marché (3)", "vie": "Chợ Cũ (3)"}'
    assert (first["first_line"], first["n_lines"]) == (3, 2)
    assert titles(m, "5a36f382-dbdf-11e6-95fd-d746d863c3eb") == {
        "fra": "Mendiants",
        "vie": "Những người ăn xin",
    }
    assert titles(m, "400286c8-dbe1-11e6-bb4d-ff975c68de04")["fra"] == "La Banque de l'Indochine"
    assert m.records["label"].isna().all()
    assert m.records["n_lines"].tolist() == [2, 2, 2]


def test_bom_crlf_blank_lines_and_spaces_around_pipes_are_tolerated(tmp_path: Path) -> None:
    text = "\ufeffa1|Un|fra\r\n\r\n   \r\n  b2   |   Deux  |  fra  \r\n\ta1 |One| eng\r\n"
    m = read_manifest(source(tmp_path, "heobs", text))
    assert_counts_add_up(m)
    assert m.malformed.empty
    assert m.lines_read == 3
    assert m.records["id"].tolist() == ["a1", "b2"]
    assert titles(m, "a1") == {"eng": "One", "fra": "Un"}
    assert titles(m, "b2") == {"fra": "Deux"}
    assert m.records["first_line"].tolist() == [1, 4]


def test_malformed_lines_are_reported_with_line_numbers_and_reasons(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "good1 | Title | fra",  # 1
            "only one field",  # 2
            "two | fields",  # 3
            " | no id | fra",  # 4
            "has space | Title | fra",  # 5
            "tab\there | Title | fra",  # 6
            "ctrl\x07id | Title | fra",  # 7
            "nolang | Title | ",  # 8
            "",  # 9
            "good2 | Title | vie",  # 10
        ]
    )
    m = read_manifest(source(tmp_path, "heobs", text))
    assert_counts_add_up(m)
    assert m.records["id"].tolist() == ["good1", "good2"]
    assert m.lines_read == 9
    bad = m.malformed
    assert bad["source"].unique().tolist() == ["src"]
    assert bad["line_no"].tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert bad["reason"].tolist() == [
        "expected 'id | title | lang', got 1 field",
        "expected 'id | title | lang', got 2 fields",
        "empty id",
        "id contains whitespace or control characters",
        "id contains whitespace or control characters",
        "id contains whitespace or control characters",
        "empty lang",
    ]
    assert bad["line"].tolist()[:2] == ["only one field", "two | fields"]


def test_a_title_keeps_its_inner_pipes(tmp_path: Path) -> None:
    m = read_manifest(source(tmp_path, "heobs", "a1 | Before | after | fra\n"))
    assert titles(m, "a1") == {"fra": "Before | after"}


def test_empty_title_keeps_the_id(tmp_path: Path) -> None:
    m = read_manifest(source(tmp_path, "heobs", "a1 |  | fra\na1 | Un | fra\n"))
    assert m.malformed.empty
    assert m.records["titles"].tolist() == ['{"fra": "Un"}']
    assert m.records["n_lines"].tolist() == [2]


def test_same_id_and_language_twice_keeps_the_first_title_and_counts_both(tmp_path: Path) -> None:
    m = read_manifest(source(tmp_path, "heobs", "a1 | First | fra\nb2 | B | fra\na1 | Second | fra\n"))
    assert_counts_add_up(m)
    assert titles(m, "a1") == {"fra": "First"}
    row = m.records.set_index("id").loc["a1"]
    assert (row["first_line"], row["n_lines"]) == (1, 2)


def test_titles_json_keeps_non_ascii_and_sorts_languages(tmp_path: Path) -> None:
    m = read_manifest(source(tmp_path, "heobs", 'a1 | 東京 | jpn\na1 | Tokyo | eng\na1 | "Q" | fra\n'))
    assert m.records.loc[0, "titles"] == '{"eng": "Tokyo", "fra": "\\"Q\\"", "jpn": "東京"}'


def test_invalid_utf8_in_an_id_is_a_malformed_line_and_in_a_title_is_replaced(tmp_path: Path) -> None:
    data = b"a1 | caf\xe9 | fra\nb\xff2 | T | fra\nc3 | ok | fra\n"
    m = read_manifest(source(tmp_path, "heobs", data))
    assert_counts_add_up(m)
    assert m.records["id"].tolist() == ["a1", "c3"]
    assert titles(m, "a1") == {"fra": "caf\ufffd"}
    assert m.malformed[["line_no", "reason"]].values.tolist() == [[2, "not valid UTF-8"]]
    assert m.malformed.loc[0, "line"] == "b\ufffd2 | T | fra"
    m.records.to_parquet(tmp_path / "r.parquet")  # no lone surrogate reaches a table
    m.malformed.to_parquet(tmp_path / "b.parquet")


def test_a_line_of_unicode_line_separators_is_one_line(tmp_path: Path) -> None:
    m = read_manifest(source(tmp_path, "heobs", "a1 | one\u2028two\x0cthree | fra\nb2 | B | fra\n"))
    assert m.records["first_line"].tolist() == [1, 2]
    assert titles(m, "a1") == {"fra": "one\u2028two\x0cthree"}


def test_a_very_long_malformed_line_is_shortened_in_the_report(tmp_path: Path) -> None:
    m = read_manifest(source(tmp_path, "heobs", "x" * 10_000 + "\n"))
    assert len(m.malformed.loc[0, "line"]) == 501


def test_parse_heobs_returns_rows_and_bad_lines() -> None:
    rows, bad = parse_heobs("\ufeffa | T | fra\r\n\r\nbroken\r\nb|U|vie")
    assert rows == [(1, "a", "T", "fra"), (4, "b", "U", "vie")]
    assert bad == [(3, "broken", "expected 'id | title | lang', got 1 field")]


def test_missing_manifest_is_a_user_error(tmp_path: Path) -> None:
    cfg = source(tmp_path, "heobs", None, manifest_name="photos.txt")
    with pytest.raises(UserError) as err:
        read_manifest(cfg)
    assert str(err.value) == f"source 'src': manifest {(tmp_path / 'src/photos.txt').as_posix()} not found"


def test_missing_manifest_message_uses_the_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pipeline/sources/heobs").mkdir(parents=True)
    (tmp_path / "pipeline/sources/heobs/source.yaml").write_text(
        "format: heobs\nmanifest: photos.txt\nurl: 'https://cdn.heobs.org/photo/{id}'\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        read_manifest(load_source("heobs"))
    assert str(err.value) == "source 'heobs': manifest pipeline/sources/heobs/photos.txt not found"


def test_manifest_that_is_a_folder_is_a_user_error(tmp_path: Path) -> None:
    cfg = source(tmp_path, "heobs", None, manifest_name="photos")
    (tmp_path / "src/photos").mkdir()
    with pytest.raises(UserError, match="is a folder, expected a file for format heobs"):
        read_manifest(cfg)


def test_empty_manifest_gives_empty_typed_tables(tmp_path: Path) -> None:
    m = read_manifest(source(tmp_path, "heobs", "\n\n"))
    assert_counts_add_up(m)
    assert m.lines_read == 0
    assert m.records.empty and m.malformed.empty
    assert m.records["n_lines"].dtype == "int64"


def test_large_manifest_parses_in_one_pass(tmp_path: Path) -> None:
    n_ids = 75_000
    lines = []
    for i in range(n_ids):
        id_ = f"{i:08x}-dbdf-11e6-95fd-d746d863c3eb"
        lines.append(f"{id_} | Tiêu đề {i} | vie")
        lines.append(f"{id_} | Titre {i} | fra")
    lines.insert(1234, "broken line")
    m = read_manifest(source(tmp_path, "heobs", "\n".join(lines) + "\n"))
    assert m.lines_read == 150_001
    assert len(m.records) == n_ids
    assert m.malformed["line_no"].tolist() == [1235]
    assert set(m.records["n_lines"]) == {2}
    assert titles(m, "00000007-dbdf-11e6-95fd-d746d863c3eb") == {"fra": "Titre 7", "vie": "Tiêu đề 7"}
    assert_counts_add_up(m)


def test_an_ids_lines_far_apart_and_across_chunks_merge_as_one_record_read_in_order(tmp_path, monkeypatch):
    # The lines go into Arrow columns a chunk at a time and are merged a run of lines an id after
    # a sort: small chunks put an id's lines in different chunks, runs across chunk ends.
    monkeypatch.setattr(manifest_module, "_CHUNK", 7)
    rng = random.Random(3)
    titles_, langs = ["", "T", "Été | x"], ["eng", "fra", "deu"]
    lines = [f"id-{rng.randrange(40)} | {rng.choice(titles_)}{i} | {rng.choice(langs)}" for i in range(500)]
    expected: dict[str, list] = {}  # id -> [first line, lines, {lang: first title}]: a dict merge
    for line_no, line in enumerate(lines, 1):
        id_, rest = line.split(" | ", 1)
        title, lang = rest.rsplit(" | ", 1)
        record = expected.setdefault(id_, [line_no, 0, {}])
        record[1] += 1
        if title:
            record[2].setdefault(lang, title)
    m = read_manifest(source(tmp_path, "heobs", "\n".join(lines)))
    assert m.records["id"].tolist() == sorted(expected)
    got = {row.id: [row.first_line, row.n_lines, json.loads(row.titles)] for row in m.records.itertuples()}
    assert got == expected
    assert_counts_add_up(m)


def test_reading_is_deterministic(tmp_path: Path) -> None:
    cfg = source(tmp_path, "heobs", "b | B | fra\na | A | vie\na | A2 | fra\nbad\n")
    first, second = read_manifest(cfg), read_manifest(cfg)
    pd.testing.assert_frame_equal(first.records, second.records)
    pd.testing.assert_frame_equal(first.malformed, second.malformed)


# urls


def test_hostile_ids_are_quoted_into_one_path_segment() -> None:
    assert url_for(CDN, "../../etc/passwd") == "https://cdn.example.org/photo/..%2F..%2Fetc%2Fpasswd"
    assert url_for(CDN, "a?b#c&d=e") == "https://cdn.example.org/photo/a%3Fb%23c%26d%3De"
    assert url_for(CDN, "@evil.com") == "https://cdn.example.org/photo/%40evil.com"
    assert url_for("https://h/p/{id}?size=medium", "x y/é") == "https://h/p/x%20y%2F%C3%A9?size=medium"
    assert url_for("file:///srv/{id}.jpg", "a%2F") == "file:///srv/a%252F.jpg"


def test_hostile_id_in_a_heobs_manifest_gets_a_quoted_url(tmp_path: Path) -> None:
    m = read_manifest(source(tmp_path, "heobs", "../../etc/passwd | x | fra\n", url="images/{id}"))
    assert m.records["url"].tolist() == ["images/..%2F..%2Fetc%2Fpasswd"]
    assert m.records["id"].tolist() == ["../../etc/passwd"]


def test_url_list_with_comments_duplicates_and_bad_lines(tmp_path: Path) -> None:
    text = (
        "\ufeff# exported 2024-05-01\r\n"
        "https://a.example/1.jpg\r\n"
        "\r\n"
        "  https://b.example/2.jpg?size=large  \r\n"
        "not a url\r\n"
        "ftp://a.example/3.jpg\r\n"
        "https:///nohost.jpg\r\n"
        "file:///srv/photos/4.jpg\r\n"
        "https://a.example/1.jpg\r\n"
        "/just/a/path.jpg\r\n"
    )
    m = read_manifest(source(tmp_path, "urls", text))
    assert_counts_add_up(m)
    assert m.lines_read == 8
    assert m.records["id"].tolist() == [
        "file:///srv/photos/4.jpg",
        "https://a.example/1.jpg",
        "https://b.example/2.jpg?size=large",
    ]
    assert m.records["url"].tolist() == m.records["id"].tolist()
    assert m.records["n_lines"].tolist() == [1, 2, 1]
    assert m.records["titles"].tolist() == ["{}"] * 3
    assert m.malformed[["line_no", "reason"]].values.tolist() == [
        [5, "url contains whitespace or control characters"],
        [6, "not a URL (needs http://, https:// or file://)"],
        [7, "not a URL (no host)"],
        [10, "not a URL (needs http://, https:// or file://)"],
    ]


# csv / tsv


def test_csv_with_url_column_only_uses_the_url_as_id(tmp_path: Path) -> None:
    text = "url,title\nhttps://h/1.jpg,One\nhttps://h/0.jpg,\n,empty\nnope,bad\n"
    m = read_manifest(source(tmp_path, "csv", text))
    assert_counts_add_up(m)
    assert m.records["id"].tolist() == ["https://h/0.jpg", "https://h/1.jpg"]
    assert m.records["url"].tolist() == ["https://h/0.jpg", "https://h/1.jpg"]
    assert m.records["titles"].tolist() == ["{}", '{"und": "One"}']
    assert m.malformed[["line_no", "reason"]].values.tolist() == [
        [4, "empty url"],
        [5, "not a URL (needs http://, https:// or file://)"],
    ]
    assert m.lines_read == 4  # the header is not a data line


def test_csv_with_id_column_and_template_builds_quoted_urls(tmp_path: Path) -> None:
    text = 'id,label,title\nb 2,dog,x\na/1,cat,"Quoted, with comma"\nc3,,Cee\n'
    m = read_manifest(source(tmp_path, "csv", text, url="https://h/{id}.jpg"))
    assert_counts_add_up(m)
    assert m.records["id"].tolist() == ["a/1", "c3"]
    assert m.records["url"].tolist() == ["https://h/a%2F1.jpg", "https://h/c3.jpg"]
    assert m.records["label"].tolist()[0] == "cat"
    assert pd.isna(m.records["label"].tolist()[1])
    assert titles(m, "a/1") == {"und": "Quoted, with comma"}
    assert m.malformed[["line_no", "reason"]].values.tolist() == [
        [2, "id contains whitespace or control characters"]
    ]


def test_csv_with_id_and_url_columns_prefers_the_row_url(tmp_path: Path) -> None:
    text = "id,url\na1,https://other/a.jpg\nb2,\n"
    m = read_manifest(source(tmp_path, "csv", text, url="https://h/{id}"))
    assert m.records["url"].tolist() == ["https://other/a.jpg", "https://h/b2"]


def test_csv_custom_column_names(tmp_path: Path) -> None:
    text = "sku,link,kind,name\nA1,https://h/a.jpg,shoe,Red shoe\n"
    cfg = source(
        tmp_path, "csv", text, id_column="sku", url_column="link", label_column="kind", title_column="name"
    )
    m = read_manifest(cfg)
    assert m.records.drop(columns="titles").to_dict("records") == [
        {
            "source": "src",
            "id": "A1",
            "url": "https://h/a.jpg",
            "label": "shoe",
            "first_line": 2,
            "n_lines": 1,
        }
    ]
    assert titles(m, "A1") == {"und": "Red shoe"}


def test_csv_bom_crlf_blank_lines_and_a_quoted_field_over_two_lines(tmp_path: Path) -> None:
    text = '\ufeff\r\nid , label\r\n\r\na1,"two\r\nlines"\r\nb2, cat \r\nc3,x,extra\r\n'
    m = read_manifest(source(tmp_path, "csv", text, url=CDN))
    assert_counts_add_up(m)
    assert m.records["id"].tolist() == ["a1", "b2"]
    assert m.records["label"].tolist() == ["two\r\nlines", "cat"]
    assert m.records["first_line"].tolist() == [4, 6]
    assert m.malformed[["line_no", "reason"]].values.tolist() == [[7, "expected 2 fields, got 3"]]


def test_csv_repeated_id_merges_but_a_conflicting_label_is_reported(tmp_path: Path) -> None:
    text = "id,label\na1,cat\na1,cat\na1,dog\nb2,dog\n"
    m = read_manifest(source(tmp_path, "csv", text, url=CDN))
    assert_counts_add_up(m)
    assert m.records["n_lines"].tolist() == [2, 1]
    assert m.malformed[["line_no", "reason"]].values.tolist() == [
        [4, "id 'a1' already on line 2 with label 'cat'"]
    ]


def test_tsv_is_read_with_tabs(tmp_path: Path) -> None:
    text = "id\ttitle\na1\tA title, with a comma\nb2\tB\n"
    m = read_manifest(source(tmp_path, "tsv", text, url=CDN))
    assert_counts_add_up(m)
    assert titles(m, "a1") == {"und": "A title, with a comma"}
    assert m.records["url"].tolist() == [
        "https://cdn.example.org/photo/a1",
        "https://cdn.example.org/photo/b2",
    ]


def test_csv_without_id_or_url_column_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"needs a column 'id' or 'url' \(has: photo, title\)$"):
        read_manifest(source(tmp_path, "csv", "photo,title\na,b\n"))


def test_csv_with_ids_but_no_url_anywhere_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no column 'url' and no url template"):
        read_manifest(source(tmp_path, "csv", "id,title\na,b\n"))


# folder


def make_folder(tmp_path: Path, files: list[str]) -> SourceConfig:
    cfg = source(tmp_path, "folder", None, manifest_name="images")
    for rel in files:
        path = cfg.manifest_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8\xff" + rel.encode())
    return cfg


def test_folder_of_class_subfolders(tmp_path: Path) -> None:
    cfg = make_folder(
        tmp_path,
        [
            "dog/b.jpg",
            "cat/a.jpg",
            "cat/z.png",
            "dog/.DS_Store",
            ".git/config",
            "cat/notes.txt",
            "dog/IMG 001.jpg",
            "cat/nested/c.jpg",
            "README.md",
        ],
    )
    (cfg.manifest_path / "empty_class").mkdir()
    m = read_manifest(cfg)
    assert_counts_add_up(m)
    assert m.records["id"].tolist() == [
        "cat/a.jpg",
        "cat/nested/c.jpg",
        "cat/notes.txt",
        "cat/z.png",
        "dog/IMG 001.jpg",
        "dog/b.jpg",
    ]
    assert m.records["label"].tolist() == ["cat"] * 4 + ["dog"] * 2
    assert m.records["url"].tolist()[0] == "images/cat/a.jpg"
    assert m.records.set_index("id").loc["dog/IMG 001.jpg", "url"] == "images/dog/IMG%20001.jpg"
    assert m.records["titles"].tolist() == ["{}"] * 6
    assert m.lines_read == 7
    assert m.malformed[["line", "reason"]].values.tolist() == [["README.md", "file outside a class folder"]]
    # every url resolves, unquoted, to the file inside the source folder
    from urllib.parse import unquote

    for url in m.records["url"]:
        assert (cfg.directory / unquote(url)).is_file()


def test_folder_listing_is_sorted_and_repeatable(tmp_path: Path) -> None:
    cfg = make_folder(tmp_path, [f"c{i % 3}/{i:03d}.jpg" for i in range(30, 0, -1)])
    m = read_manifest(cfg)
    assert m.records["id"].tolist() == sorted(m.records["id"])
    assert m.records["first_line"].tolist() == list(range(1, 31))
    pd.testing.assert_frame_equal(m.records, read_manifest(cfg).records)


def test_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    cfg = source(tmp_path, "folder", None, manifest_name="images")
    with pytest.raises(UserError, match=r"^source 'src': manifest .*src/images not found \(format folder"):
        read_manifest(cfg)


def test_a_csv_record_the_csv_module_rejects_is_reported_and_reading_goes_on(tmp_path: Path) -> None:
    text = "id,title\na1,x\nb2," + "y" * 200_000 + "\nc3,z\n"
    m = read_manifest(source(tmp_path, "csv", text, url=CDN))
    assert_counts_add_up(m)
    assert m.records["id"].tolist() == ["a1", "c3"]
    assert m.malformed["line_no"].tolist() == [3]
    assert m.malformed.loc[0, "reason"].startswith("not valid CSV: field larger than field limit")


def test_shipped_heobs_manifest_is_the_published_example() -> None:
    lines = (REPO / "pipeline/sources/heobs/photos.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6
    assert lines[0] == "5a36f382-dbdf-11e6-95fd-d746d863c3eb | Những người ăn xin | vie"
    assert lines[5] == "400286c8-dbe1-11e6-bb4d-ff975c68de04 | La Banque de l'Indochine | fra"
