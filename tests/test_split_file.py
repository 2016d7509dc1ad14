"""The splits of an images table in a file, a slice at a time, are the splits of the table in
memory: the same split tables, byte for byte, and the same report."""

import numpy as np
import pandas as pd
import pytest

from photoprep.core import io, tables
from photoprep.core.errors import UserError
from photoprep.core.params import SplitParams
from photoprep.dataset import split, split_file

N = 6000


def _images(n: int = N, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """An images table in (source, id) order, a labels file, and dedup's members (every record
    with its group: the kept images and, for some groups, copies from another source)."""
    rng = np.random.default_rng(seed)
    classes = np.array(["2", "10", "cat", "Dog", " bird ", "", None], dtype=object)
    images = pd.DataFrame(
        {
            "source": np.where(np.arange(n) < n // 2, "coll", "more"),
            "id": [f"{i:06d}" for i in range(n)],
            "sha256": [f"{i:064x}" if i % 97 else None for i in range(n)],
            "label": rng.choice(classes, n, p=[0.1, 0.1, 0.2, 0.2, 0.1, 0.1, 0.2]),
            "row": np.arange(n, dtype=np.int64),
            "group": np.arange(n, dtype=np.int64),
        }
    )
    copies = images.sample(n // 10, random_state=seed)
    copies = pd.DataFrame(
        {
            "source": "review",
            "id": [f"x/{i}" for i in copies["id"]],
            "label": rng.choice(classes[:5], len(copies)),
            "group": copies["group"].to_numpy(),
        }
    )
    members = pd.concat([images[["source", "id", "label", "group"]], copies], ignore_index=True)
    labelled = images.sample(n // 20, random_state=seed + 1)
    labels = pd.DataFrame({"source": labelled["source"], "id": labelled["id"], "label": "cat"})
    return images, labels, members


PARAMS = [
    SplitParams(),
    SplitParams(classes=["cat", "Dog"], seed=7),
    SplitParams(classes=2, max_per_class=300),
    SplitParams(classes={"cat": "animal", "Dog": "animal", "10": None}, max_per_class=900),
    SplitParams(positive="cat", ratios={"train": 0.8, "val": 0.0, "test": 0.2}),
]


@pytest.mark.parametrize("p", PARAMS)
def test_the_splits_of_a_table_in_a_file_are_the_splits_in_memory(tmp_path, p):
    images, labels, members = _images()
    io.write_table(images, tmp_path / "images.parquet")
    assert tables.slice_rows(tmp_path / "images.parquet", 1, split.READS) < N // 2  # several slices
    result = split.assign_splits(split.attach_labels(images, labels, members, ["coll", "more", "review"]), p)
    want = split.split_report(result)
    for name in (*split.SPLITS, split.UNLABELED):
        io.write_table(
            result.table[result.table["split"] == name].reset_index(drop=True), tmp_path / f"{name}.want"
        )
    sizes = members["group"].map(members["group"].value_counts())
    only_copies = split_file.LabelSources(labels, members[sizes >= 2], ["coll", "more", "review"])
    table = split_file.ImagesTable(tmp_path / "images.parquet", only_copies, 1)
    assert table.count_labelled() == int(
        (result.table["label"].notna()).sum()
        + want["dropped"]["class_not_selected"]
        + want["dropped"]["max_per_class"]
    )
    paths = {name: tmp_path / f"{name}.parquet" for name in (*split.SPLITS, split.UNLABELED)}
    assert table.write_splits(p, paths) == want
    for name in paths:
        assert paths[name].read_bytes() == (tmp_path / f"{name}.want").read_bytes(), name
    if p.max_per_class is not None:
        assert want["dropped"]["max_per_class"] > 0  # the caps bit


def test_a_repeated_key_or_a_table_out_of_order_is_refused(tmp_path):
    images, labels, members = _images(3000)
    sources = split_file.LabelSources(labels, members.iloc[:0], [])
    io.write_table(
        pd.concat([images, images.iloc[[10]]]).sort_values(["source", "id"]), tmp_path / "twice.parquet"
    )
    with pytest.raises(UserError, match=r"key \(source='coll', id='000010'\) appears 2 times"):
        split_file.ImagesTable(tmp_path / "twice.parquet", sources, 1).count_labelled()
    io.write_table(images.iloc[::-1], tmp_path / "reversed.parquet")
    with pytest.raises(ValueError, match="not sorted by source and id"):
        split_file.ImagesTable(tmp_path / "reversed.parquet", sources, 1).count_labelled()
