"""Specification of the split stage: stable, stratified, deterministic, with class selection."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest

from photoprep.core.errors import UserError
from photoprep.core.params import SplitParams
from photoprep.dataset.split import (
    SplitResult,
    assign_splits,
    fingerprint,
    hash_unit,
    natural_sorted,
    select_classes,
    split_report,
    split_tables,
)

LABELS = [f"c{i}" for i in range(10)]


def images_table(
    n: int, *, start: int = 0, labels: list[str] = LABELS, source: str = "src", unlabeled_every: int = 0
) -> pd.DataFrame:
    """A synthetic processed table: keys src/img00000.., labels cycling, rows = positions."""
    ids = [f"img{i:05d}" for i in range(start, start + n)]
    lab = [labels[i % len(labels)] for i in range(start, start + n)]
    if unlabeled_every:
        lab = [
            None if (i % unlabeled_every == 0) else v
            for i, v in zip(range(start, start + n), lab, strict=False)
        ]
    return pd.DataFrame(
        {
            "source": source,
            "id": ids,
            "sha256": [hashlib.sha256(i.encode()).hexdigest() for i in ids],
            "label": lab,
            "bucket": "64x64",
            "width": 64,
            "height": 64,
        }
    )


def split_of(result: SplitResult) -> dict[tuple[str, str], str]:
    return {
        (s, i): sp
        for s, i, sp in zip(result.table["source"], result.table["id"], result.table["split"], strict=False)
    }


# --------------------------------------------------------------------------- stability


def test_adding_ten_percent_more_images_moves_no_existing_image():
    base = images_table(2000)
    more = pd.concat([base, images_table(200, start=2000)], ignore_index=True)
    # Shuffle the bigger table too: order must not matter either.
    more = more.sample(frac=1.0, random_state=3).reset_index(drop=True)
    p = SplitParams(seed=7)

    before = split_of(assign_splits(base, p))
    after = split_of(assign_splits(more, p))

    assert len(before) == 2000 and len(after) == 2200
    moved = [k for k, sp in before.items() if after[k] != sp]
    assert moved == []
    # The new images are spread over the splits too, not dumped into one.
    new_splits = {after[("src", f"img{i:05d}")] for i in range(2000, 2200)}
    assert new_splits == {"train", "val", "test"}


def test_split_depends_on_key_and_seed_only_not_on_label_or_neighbours():
    t = images_table(500)
    relabelled = t.assign(label=t["label"].map(lambda v: "merged" if v in {"c1", "c2"} else v))
    a = split_of(assign_splits(t, SplitParams(seed=1)))
    b = split_of(assign_splits(relabelled, SplitParams(seed=1)))
    assert a == b
    c = split_of(assign_splits(t, SplitParams(seed=2)))
    assert sum(a[k] != c[k] for k in a) > 100  # another seed is another draw


def test_the_hash_is_the_documented_recipe():
    digest = hashlib.sha256(b"42\0src\0img00001").digest()
    assert hash_unit(42, "src", "img00001") == int.from_bytes(digest[:8], "big") / 2**64
    t = images_table(50)
    r = assign_splits(t, SplitParams(seed=42, ratios={"train": 0.7, "val": 0.1, "test": 0.2}))
    for s, i, sp in zip(r.table["source"], r.table["id"], r.table["split"], strict=False):
        u = hash_unit(42, s, i)
        assert sp == ("train" if u < 0.7 else "val" if u < 0.8 else "test")


# --------------------------------------------------------------------------- stratification


def test_every_big_class_is_split_close_to_the_ratios():
    t = images_table(20_000)  # 2,000 per class
    r = assign_splits(t, SplitParams(seed=0))
    report = split_report(r)
    for c in LABELS:
        n = sum(report["counts"][s][c] for s in ("train", "val", "test"))
        assert n == 2000
        # binomial sd of the train fraction at n=2000 is ~0.010; 0.04 is 4 sd
        assert abs(report["realised"][c]["train"] - 0.7) < 0.04
        assert abs(report["realised"][c]["val"] - 0.1) < 0.03
        assert abs(report["realised"][c]["test"] - 0.2) < 0.035
        assert math.isclose(sum(report["realised"][c].values()), 1.0, abs_tol=1e-5)


def test_zero_ratio_split_gets_nothing():
    r = assign_splits(images_table(1000), SplitParams(ratios={"train": 0.8, "test": 0.2}))
    assert set(r.table["split"]) == {"train", "test"}
    r = assign_splits(images_table(300), SplitParams(ratios={"train": 1.0}))
    assert set(r.table["split"]) == {"train"}


# --------------------------------------------------------------------------- unlabeled


@pytest.mark.parametrize("missing", [None, math.nan, "", "  "])
def test_images_without_label_go_to_unlabeled(missing):
    t = images_table(300)
    t["label"] = t["label"].astype(object)
    t.loc[t.index % 3 == 0, "label"] = missing
    r = assign_splits(t, SplitParams())
    unl = r.table[r.table["split"] == "unlabeled"]
    assert len(unl) == 100
    assert unl["label"].isna().all()
    assert r.table.loc[r.table["split"] != "unlabeled", "label"].notna().all()
    assert split_report(r)["totals"]["unlabeled"] == 100


def test_unlabeled_images_are_kept_whatever_the_class_selection():
    t = images_table(300, unlabeled_every=10)
    r = assign_splits(t, SplitParams(classes=["c1"]))
    assert (r.table["split"] == "unlabeled").sum() == 30
    assert set(r.table["label"].dropna()) == {"c1"}
    assert r.classes == ["c1"]


# --------------------------------------------------------------------------- class selection


def test_class_list_keeps_only_those_classes_and_counts_the_rest():
    t = images_table(1000)
    r = assign_splits(t, SplitParams(classes=["c3", "c1"]))
    assert r.classes == ["c1", "c3"]
    assert set(r.table["label"]) == {"c1", "c3"}
    assert len(r.table) == 200
    assert r.dropped == {"class_not_selected": 800, "max_per_class": 0}


def test_class_list_naming_an_unknown_class_is_a_user_error():
    with pytest.raises(UserError, match=r"split.classes: no image has class 'cat'"):
        assign_splits(images_table(100), SplitParams(classes=["c1", "cat"]))


def test_class_mapping_renames_and_merges_and_keeps_unmapped():
    labels = pd.Series(["a", "b", "c", "d", None])
    out = select_classes(labels, SplitParams(classes={"a": "ab", "b": "ab", "c": "sea"}))
    assert out.iloc[:4].tolist() == ["ab", "ab", "sea", "d"]
    assert pd.isna(out.iloc[4])


def test_class_mapping_to_null_drops_the_class():
    # params.py types the mapping as dict[str, str]; build it unvalidated to exercise null drops.
    p = SplitParams.model_construct(
        classes={"c0": None, "c1": "one"},
        seed=42,
        ratios={"train": 0.7, "val": 0.1, "test": 0.2},
        positive=None,
        max_per_class=None,
    )
    r = assign_splits(images_table(100), p)
    assert "c0" not in r.classes and "one" in r.classes and "c1" not in r.classes
    assert r.dropped["class_not_selected"] == 10
    assert len(r.table) == 90


def test_class_count_keeps_the_first_n_in_natural_order():
    labels = pd.Series(["10", "2", "1", "b", "B2", "a", "2", None])
    assert natural_sorted({"10", "2", "1", "b", "a"}) == ["1", "2", "10", "a", "b"]
    out = select_classes(labels, SplitParams(classes=3))
    assert [v if isinstance(v, str) else None for v in out] == ["10", "2", "1", None, None, None, "2", None]
    t = images_table(120, labels=[str(i) for i in range(12)])
    r = assign_splits(t, SplitParams(classes=3))
    assert r.classes == ["0", "1", "2"]  # not "0", "1", "10"
    big = assign_splits(t, SplitParams(classes=11))
    assert big.classes[-2:] == ["9", "10"]


def test_numeric_labels_read_as_their_text():
    t = images_table(30)
    t["label"] = [float(i % 3) if i % 5 else math.nan for i in range(30)]
    r = assign_splits(t, SplitParams())
    assert r.classes == ["0", "1", "2"]


def test_positive_is_one_vs_rest():
    t = images_table(1000, unlabeled_every=50)
    r = assign_splits(t, SplitParams(positive="c4"))
    assert r.classes == ["c4", "not_c4"]
    labelled = r.table[r.table["split"] != "unlabeled"]
    # ids 0 mod 50 are unlabelled (they would be c0); all 100 c4 stay, the other 880 are the rest
    assert (labelled["label"] == "c4").sum() == 100
    assert (labelled["label"] == "not_c4").sum() == 880
    # the same split for each image as without one-vs-rest
    plain = split_of(assign_splits(t, SplitParams()))
    assert split_of(r) == plain


def test_positive_after_class_selection():
    t = images_table(100)
    r = assign_splits(t, SplitParams(classes=["c1", "c2", "c3"], positive="c2"))
    assert r.classes == ["c2", "not_c2"]
    assert len(r.table) == 30 and r.dropped["class_not_selected"] == 70
    with pytest.raises(UserError, match=r"split.positive"):
        assign_splits(t, SplitParams(classes=["c1", "c2"], positive="c5"))


# --------------------------------------------------------------------------- max_per_class


def test_max_per_class_caps_each_class_and_counts_drops():
    labels = ["big"] * 9 + ["small"]
    t = images_table(1000, labels=labels)  # 900 big, 100 small
    r = assign_splits(t, SplitParams(max_per_class=150))
    counts = r.table["label"].value_counts().to_dict()
    assert counts == {"big": 150, "small": 100}
    assert r.dropped == {"class_not_selected": 0, "max_per_class": 750}
    # the kept ones are still spread over all splits (the cap does not pick train only)
    assert set(r.table.loc[r.table["label"] == "big", "split"]) == {"train", "val", "test"}


def test_max_per_class_is_stable_kept_images_never_change_split():
    p = SplitParams(max_per_class=100, seed=3)
    base = images_table(2000)
    more = pd.concat([base, images_table(200, start=2000)], ignore_index=True)
    a, b = split_of(assign_splits(base, p)), split_of(assign_splits(more, p))
    for key in set(a) & set(b):
        assert a[key] == b[key]
    # a new image can only push an old one out, never pull a dropped one in
    assert set(b) - set(a) <= {("src", f"img{i:05d}") for i in range(2000, 2200)}


def test_max_per_class_does_not_cap_unlabeled():
    t = images_table(100, unlabeled_every=2)
    r = assign_splits(t, SplitParams(max_per_class=1))
    assert (r.table["split"] == "unlabeled").sum() == 50
    assert r.table["label"].value_counts().max() == 1


# --------------------------------------------------------------------------- table shape, determinism


def test_table_columns_sort_and_rows_point_into_the_arrays():
    t = images_table(200).sample(frac=1.0, random_state=1).reset_index(drop=True)
    r = assign_splits(t, SplitParams())
    assert list(r.table.columns) == ["source", "id", "sha256", "label", "row", "split"]
    assert r.table["row"].dtype == np.int64
    assert list(zip(r.table["source"], r.table["id"], strict=False)) == sorted(
        zip(r.table["source"], r.table["id"], strict=False)
    )
    for _, row in r.table.iterrows():
        assert t.loc[row["row"], "id"] == row["id"]


def test_existing_row_column_is_used():
    t = images_table(10).iloc[5:].assign(row=range(5, 10))
    r = assign_splits(t, SplitParams())
    assert r.table["row"].tolist() == [5, 6, 7, 8, 9]


def test_same_input_gives_byte_identical_tables(tmp_path):
    t = images_table(500, unlabeled_every=7)
    # the same images in another order, each keeping its row in the arrays
    shuffled = t.assign(row=t.index).sample(frac=1.0, random_state=9).reset_index(drop=True)
    a = assign_splits(t, SplitParams(max_per_class=30))
    b = assign_splits(shuffled, SplitParams(max_per_class=30))
    a.table.to_parquet(tmp_path / "a.parquet", index=False)
    b.table.to_parquet(tmp_path / "b.parquet", index=False)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert json.dumps(split_report(a), sort_keys=True) == json.dumps(split_report(b), sort_keys=True)


def test_duplicate_keys_and_missing_columns_are_user_errors():
    t = images_table(10)
    with pytest.raises(UserError, match="appears 2 times"):
        assign_splits(pd.concat([t, t.iloc[:1]]), SplitParams())
    with pytest.raises(UserError, match="lacks column"):
        assign_splits(t.drop(columns="label"), SplitParams())


# --------------------------------------------------------------------------- fingerprint, report


def test_fingerprint_is_order_independent_and_content_sensitive():
    t = assign_splits(images_table(100), SplitParams()).table
    fp = fingerprint(t)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fingerprint(t.iloc[::-1]) == fp
    assert fingerprint(t.sample(frac=1.0, random_state=2)) == fp
    changed_label = t.copy()
    changed_label.loc[3, "label"] = "c9" if t.loc[3, "label"] != "c9" else "c8"
    assert fingerprint(changed_label) != fp
    changed_bytes = t.copy()
    changed_bytes.loc[3, "sha256"] = "0" * 64
    assert fingerprint(changed_bytes) != fp
    assert fingerprint(t.iloc[1:]) != fp
    # the split column and row index are not content
    assert fingerprint(t.assign(split="x", row=0)) == fp
    unlab = t.copy()
    unlab.loc[3, "label"] = None
    assert fingerprint(unlab) != fp


def test_fingerprint_hashes_the_whole_json_text_though_it_is_written_a_slice_at_a_time(monkeypatch):
    import photoprep.dataset.split as split_module

    t = assign_splits(images_table(300, unlabeled_every=7), SplitParams()).table
    rows = t.sort_values(["source", "id"])[["source", "id", "sha256", "label"]].to_numpy(dtype=object)
    whole = json.dumps(rows.tolist(), ensure_ascii=False, separators=(",", ":"))
    expected = hashlib.sha256(whole.encode("utf-8")).hexdigest()
    for step in (1, 7, 299, 300, 301):
        monkeypatch.setattr(split_module, "FINGERPRINT_ROWS", step)
        assert fingerprint(t) == expected, step
    assert fingerprint(t.iloc[:0]) == hashlib.sha256(b"[]").hexdigest()


def test_fingerprint_of_texts_by_arrow_is_json_dumps_of_every_kind_of_value():
    """Plain texts and None go through Arrow's string kernels; a quote, a backslash, a control
    character, a NaN or a number through json.dumps: the same digest, however the rows come."""
    from photoprep.dataset.split import Fingerprint

    rng = np.random.default_rng(0)
    plain = ["a", "b\u00e9", "日本", "", None, "z" * 70, "\u2028", "\x7f"]
    other = ['q"x', "b\\s", "t\tab", "n\nl", float("nan"), 5]
    for _ in range(400):
        pool = plain if rng.random() < 0.5 else plain + other
        n = int(rng.integers(0, 12))
        rows = pd.DataFrame(
            [[pool[int(rng.integers(0, len(pool)))] for _ in range(4)] for _ in range(n)],
            columns=["source", "id", "sha256", "label"],
            dtype=object,
        )
        text = json.dumps(rows.to_numpy(dtype=object).tolist(), ensure_ascii=False, separators=(",", ":"))
        digest = Fingerprint()
        cut = int(rng.integers(0, n + 1))
        digest.update(rows.iloc[:cut])
        digest.update(rows.iloc[cut:])
        assert digest.hexdigest() == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_split_report_is_json_and_consistent():
    t = images_table(1000, unlabeled_every=20)
    r = assign_splits(t, SplitParams(classes=["c1", "c2", "c3"], max_per_class=80, seed=5))
    rep = json.loads(json.dumps(split_report(r)))
    assert rep["classes"] == ["c1", "c2", "c3"]
    assert rep["seed"] == 5
    assert rep["ratios"] == {"train": 0.7, "val": 0.1, "test": 0.2}
    assert rep["dropped"]["max_per_class"] == 3 * (100 - 80)
    # 50 unlabelled (ids 0 mod 20, all would-be c0) are kept; 1000 - 50 - 300 labelled are not selected
    assert rep["dropped"]["class_not_selected"] == 650
    assert sum(rep["totals"].values()) == len(r.table)
    parts = split_tables(r)
    for s in ("train", "val", "test"):
        assert sum(rep["counts"][s].values()) == rep["totals"][s]
        assert rep["fingerprints"][s] == fingerprint(parts[s])
    assert rep["totals"]["unlabeled"] == 50


def test_label_file_fills_and_overrides_manifest_labels():
    from photoprep.dataset.split import attach_labels

    images = pd.DataFrame({"source": ["s", "s", "s"], "id": ["a", "b", "c"], "label": ["cat", None, "dog"]})
    labels = pd.DataFrame({"source": ["s", "s"], "id": ["b", "c"], "label": ["bird", "cow"]})
    assert list(attach_labels(images, labels)["label"]) == ["cat", "bird", "cow"]
    unchanged = attach_labels(images, labels.iloc[:0])["label"]
    assert unchanged.isna().tolist() == [False, True, False]
    assert list(unchanged.dropna()) == ["cat", "dog"]


def test_a_later_source_relabels_the_duplicate_that_dedup_kept():
    from photoprep.dataset.split import attach_labels

    kept = pd.DataFrame(
        {"source": ["coll", "coll"], "id": ["a", "b"], "label": [None, "cat"], "group": [0, 1]}
    )
    members = pd.DataFrame(
        {
            "source": ["coll", "review", "coll", "review", "other"],
            "id": ["a", "dog/a.png", "b", "bird/b.png", "x"],
            "label": [None, "dog", "cat", "bird", "fish"],
            "group": [0, 0, 1, 1, -1],
        }
    )
    none = pd.DataFrame({"source": [], "id": [], "label": []})
    out = attach_labels(kept, none, members, priority=["coll", "review"])
    assert list(out["label"]) == ["dog", "bird"]
    # Listed first, the review source loses to the collection's own label where it has one.
    out = attach_labels(kept, none, members, priority=["review", "coll"])
    assert list(out["label"]) == ["dog", "cat"]


def test_the_members_of_groups_of_two_or_more_give_the_labels_that_every_member_gives():
    """The split stage reads only the groups with duplicates: a group of one adds nothing."""
    from photoprep.dataset.split import attach_labels

    rng = np.random.default_rng(5)
    n = 3000
    members = pd.DataFrame(
        {
            "source": np.where(rng.random(n) < 0.7, "coll", "review"),
            "id": [f"{i:05d}" for i in range(n)],
            "label": rng.choice(np.array(["cat", "dog", "", None], dtype=object), n),
            "group": rng.integers(-1, 2000, n),
        }
    )
    kept = members[members["group"] >= 0].drop_duplicates("group").reset_index(drop=True)
    labels = members.sample(200, random_state=1).assign(label="bird")[["source", "id", "label"]]
    sizes = members["group"].map(members["group"].value_counts())
    some = members[(members["group"] >= 0) & (sizes >= 2)]
    assert 0 < len(some) < len(members)
    for priority in (["coll", "review"], ["review", "coll"]):
        pd.testing.assert_frame_equal(
            attach_labels(kept, labels, some, priority), attach_labels(kept, labels, members, priority)
        )


def test_a_label_reaches_only_the_image_with_both_parts_of_its_key():
    from photoprep.dataset.split import attach_labels

    images = pd.DataFrame({"source": ["s", "sa", "t"], "id": ["ab", "b", "ab"], "label": [None, None, None]})
    labels = pd.DataFrame({"source": ["s", "s"], "id": ["ab", "ab"], "label": ["cat", "dog"]})
    # A repeated key gives its first label (pandas' drop_duplicates did); "s" + "ab" is not "sa" + "b".
    assert attach_labels(images, labels)["label"].tolist()[0] == "cat"
    assert attach_labels(images, labels)["label"].isna().tolist() == [False, True, True]
