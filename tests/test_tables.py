"""Tables a slice at a time (photoprep.core.tables): the file written depends on the rows only,
never on the memory budget; a table of one row group is the file DataFrame.to_parquet writes; and
the validate stage, which streams its table, writes the same bytes in one slice or in many."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from photoprep.core import io, tables


def _frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(n)
    return pd.DataFrame(
        {
            "source": np.where(rng.random(n) < 0.5, "a", "b"),
            "id": [f"p{i:07d}" for i in range(n)],
            "width": rng.integers(1, 500, n).astype(float),
            "valid": rng.random(n) < 0.9,
            "note": [None if i < n // 2 else f"n{i}" for i in range(n)],  # empty in the first slices
        }
    )


def _stream(src, dst, memory_mb=256, rows=None, monkeypatch=None) -> None:
    if rows is not None:
        monkeypatch.setattr(tables, "slice_rows", lambda *args, **kwargs: rows)
    with tables.TableWriter(dst) as out:
        for frame in tables.slices(src, memory_mb):
            out.write(frame)


def test_a_streamed_table_is_the_same_file_whatever_the_slices(tmp_path, monkeypatch):
    whole = _frame(150_000)
    whole.to_parquet(tmp_path / "in.parquet", index=False)
    _stream(tmp_path / "in.parquet", tmp_path / "many.parquet", rows=10_000, monkeypatch=monkeypatch)
    _stream(tmp_path / "in.parquet", tmp_path / "few.parquet", rows=37_001, monkeypatch=monkeypatch)
    assert (tmp_path / "many.parquet").read_bytes() == (tmp_path / "few.parquet").read_bytes()
    groups = pq.ParquetFile(tmp_path / "many.parquet").metadata.num_row_groups
    assert groups == -(-150_000 // tables.ROW_GROUP)  # 16,384 rows each
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "many.parquet"), whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.parquet", "in.parquet", "many.parquet"]


def test_a_table_of_one_row_group_is_the_file_write_table_writes(tmp_path, monkeypatch):
    whole = _frame(15_000)  # columns of more than one page (io.PAGE_BYTES)
    io.write_table(whole, tmp_path / "in.parquet")
    _stream(tmp_path / "in.parquet", tmp_path / "out.parquet", rows=999, monkeypatch=monkeypatch)
    assert (tmp_path / "out.parquet").read_bytes() == (tmp_path / "in.parquet").read_bytes()


_ARROW_PEAK = """
import sys
from photoprep.core import memory
memory.arrow_from_malloc()
import numpy as np, pandas as pd, pyarrow as pa
from photoprep.core import io, tables

def slice_of(start, n):  # 64-letter text in ten columns: about 11 MB a row group of 16,384 rows
    rng = np.random.default_rng(start)
    text = {f"t{j}": rng.integers(0, 2**63, (n, 4)).astype(">u8").view("S32")[:, 0] for j in range(10)}
    frame = pd.DataFrame({k: [v.hex() for v in col] for k, col in text.items()})
    return frame.assign(k=np.arange(start, start + n))

if sys.argv[1] == "write":
    with tables.TableWriter(sys.argv[2]) as out:
        for start in range(0, 16_000, 500):
            out.write(slice_of(start, 500))
else:
    for frame in tables.slices(sys.argv[2], 1):
        del frame
print(pa.default_memory_pool().max_memory())
"""


def _arrow_peak(mode: str, path: Path) -> int:
    """The most bytes Arrow held at once in a process that only writes (or reads) `path`."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run(
        [sys.executable, "-c", _ARROW_PEAK, mode, str(path)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_writing_and_reading_a_table_holds_about_a_column_of_a_row_group_not_the_row_group(tmp_path):
    """16,000 rows (one row group of 11 MB of Arrow's buffers) written 500 rows at a time, then
    read in slices of 1,024: the waiting rows lie in a scratch file, read back memory-mapped,
    and a reader holds about a page of each column (io.PAGE_BYTES), not a row group's column.
    Before, the writer held the row group twice (27 MB at its peak) and the reader 14 MB."""
    path = tmp_path / "t.parquet"
    assert _arrow_peak("write", path) < 4 << 20
    assert pd.read_parquet(path)["k"].tolist() == list(range(16_000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]  # no scratch file left
    assert _arrow_peak("read", path) < 6 << 20


def test_a_slice_holds_what_the_budget_allows_and_never_more_than_slice_bytes(tmp_path):
    wide = _frame(20_000)
    wide["text"] = [f"{i:0200d}" for i in range(len(wide))]  # about 200 bytes a row
    wide.to_parquet(tmp_path / "in.parquet", index=False)
    path = tmp_path / "in.parquet"
    small, large = (tables.slice_rows(path, mb) for mb in (1, 2))
    assert tables.MIN_ROWS <= small < large
    assert tables.slice_rows(path, 1, columns=["valid"]) > small  # narrower rows
    # A larger budget does not make larger slices than SLICE_BYTES allows.
    assert tables.slice_rows(path, 256) == tables.slice_rows(path, tables.SLICE_BYTES >> 20) == large
    sizes = [len(frame) for frame in tables.slices(path, 256)]
    assert max(sizes) == large < len(wide) and sum(sizes) == len(wide)


def test_an_empty_table_streams_to_an_empty_table_with_its_columns(tmp_path):
    _frame(10).iloc[:0].to_parquet(tmp_path / "in.parquet", index=False)
    _stream(tmp_path / "in.parquet", tmp_path / "out.parquet")
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out.empty and list(out.columns) == list(_frame(1).columns)


def test_a_failed_slice_leaves_the_old_file_and_no_temporary(tmp_path):
    _frame(100).to_parquet(tmp_path / "out.parquet", index=False)
    before = (tmp_path / "out.parquet").read_bytes()
    with pytest.raises(RuntimeError), tables.TableWriter(tmp_path / "out.parquet") as out:
        out.write(_frame(10))
        raise RuntimeError("stop")
    assert (tmp_path / "out.parquet").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_a_csv_written_in_slices_is_the_csv_written_at_once(tmp_path):
    whole = _frame(3_000)
    with tables.CsvWriter(tmp_path / "slices.csv") as out:
        for start in range(0, len(whole), 700):
            out.write(whole.iloc[start : start + 700])
    whole.to_csv(tmp_path / "once.csv", index=False, lineterminator="\n")
    assert (tmp_path / "slices.csv").read_bytes() == (tmp_path / "once.csv").read_bytes()


def test_the_validate_stage_writes_the_same_bytes_in_one_slice_or_in_many(tmp_path, monkeypatch):
    from test_incremental import make_project, run_stage

    project = make_project(tmp_path / "p", 120)
    for i in range(0, 120, 17):  # some broken photos for reports/broken.csv
        photo = project / "pipeline" / "sources" / "syn" / "cdn" / f"p{i:04d}"
        photo.write_bytes(photo.read_bytes()[:300])
    run_stage(project, "download", monkeypatch, "syn")
    run_stage(project, "dedup", monkeypatch)
    outputs = ("data/interim/valid.parquet", "reports/broken.csv", "reports/counts/validate.json")
    run_stage(project, "validate", monkeypatch)
    once = {name: (project / name).read_bytes() for name in outputs}
    monkeypatch.setattr(tables, "slice_rows", lambda *args, **kwargs: 7)  # 18 slices
    run_stage(project, "validate", monkeypatch)
    assert {name: (project / name).read_bytes() for name in outputs} == once
    assert len(pd.read_parquet(project / outputs[0])) > 100
    assert len(pd.read_csv(project / outputs[1])) == 8


def test_row_count_reads_the_footer(tmp_path):
    _frame(40_000).to_parquet(tmp_path / "in.parquet", index=False, row_group_size=tables.ROW_GROUP)
    assert tables.row_count(tmp_path / "in.parquet") == 40_000


@pytest.mark.parametrize("stage", ["download", "dedup", "validate", "bucket", "features", "split"])
def test_the_data_stages_take_arrows_buffers_from_malloc(stage):
    """The setting must come before pyarrow loads (Arrow reads it once): importing the stage
    script, with all it imports, leaves Arrow's default pool the system's."""
    repo = Path(__file__).resolve().parents[1]
    code = (
        "import importlib.util, sys\n"
        "sys.path.insert(0, 'stages')\n"
        f"spec = importlib.util.spec_from_file_location('stage', 'stages/{stage}.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "import pyarrow\n"
        "print(pyarrow.default_memory_pool().backend_name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "system"


@pytest.mark.parametrize(
    "rows",
    [
        np.arange(5000),
        np.array([3, 3, 4000, 4999]),  # ascending with a repeat
        np.array([4999, 0, 17, 17, 2500]),  # any order
        np.zeros(0, np.int64),
    ],
)
def test_rows_in_a_file_are_the_rows_in_memory_whatever_the_slices(tmp_path, monkeypatch, rows):
    """`InFile` reads a budget's slice at a time and gives the frames `InMemory` gives."""
    monkeypatch.setattr(tables, "COPIES", 10_000)  # the smallest slice, MIN_ROWS
    frame = pd.DataFrame(
        {"n": np.arange(5000), "text": [f"row {i}" for i in range(5000)], "x": np.linspace(0, 1, 5000)}
    )
    frame.to_parquet(tmp_path / "t.parquet", index=False, row_group_size=700)
    in_memory, in_file = tables.InMemory(frame), tables.InFile(tmp_path / "t.parquet", 1)
    assert tables.slice_rows(tmp_path / "t.parquet", 1) < 5000  # several slices
    assert (in_file.n, in_file.columns) == (in_memory.n, in_memory.columns)
    for per_slice in (257, 1024, 10_000):
        want = list(in_memory.pick(["text", "x"], rows, per_slice))
        got = list(in_file.pick(["text", "x"], rows, per_slice))
        assert [start for start, _ in got] == [start for start, _ in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(in_file.take(["n"], rows), in_memory.take(["n"], rows))
    assert in_file.take(["n"], rows).index.tolist() == rows.tolist()


def test_rows_in_groups_are_the_rows_of_the_groups_that_hold_a_marked_row(tmp_path, monkeypatch):
    """Two passes of slices give what one filter over the whole table gives."""
    monkeypatch.setattr(tables, "COPIES", 10_000)  # the smallest slice, MIN_ROWS
    rng = np.random.default_rng(3)
    n = 6000
    frame = pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "group": rng.integers(-1, 2500, n),
            "mark": np.where(rng.random(n) < 0.2, "x", ""),
        }
    )
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    assert tables.slice_rows(tmp_path / "t.parquet", 1) < n  # several slices
    marked = set(frame.loc[frame["mark"] != "", "group"])
    want = frame[frame["group"].isin(marked)].reset_index(drop=True)
    got = tables.rows_in_groups(tmp_path / "t.parquet", 1, "group", "mark")
    pd.testing.assert_frame_equal(got, want)
    got = tables.rows_in_groups(tmp_path / "t.parquet", 1, "group", "mark", ["id"])
    pd.testing.assert_frame_equal(got, want[["id"]])
    frame.assign(mark="").to_parquet(tmp_path / "none.parquet", index=False)
    assert tables.rows_in_groups(tmp_path / "none.parquet", 1, "group", "mark").empty
