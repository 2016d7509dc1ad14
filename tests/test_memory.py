"""photoprep.core.memory: freed pages go back to the operating system (Linux)."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from photoprep.core import memory


def anon_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon and malloc_trim are Linux's")
def test_the_garbage_of_a_table_step_is_given_back(tmp_path):
    n = 300_000
    digests = np.random.default_rng(0).integers(0, 2**63, n).astype(str)
    frame = pd.DataFrame({"id": [f"id-{i:07d}" for i in range(n)], "sha256": np.char.zfill(digests, 64)})
    frame.to_parquet(tmp_path / "t.parquet")
    del frame
    memory.release()
    before = anon_mb()
    # A stage's step: read a table, make transient copies, keep a small result.
    table = pd.read_parquet(tmp_path / "t.parquet")
    table = pd.concat([table, table]).sort_values("id", kind="stable").reset_index(drop=True)
    kept = table.head(10).copy()
    del table
    grown = anon_mb() - before
    memory.release()
    left = anon_mb() - before
    assert len(kept) == 10
    assert grown > 20, grown  # the step did leave freed pages in the process
    assert left < grown / 2, (grown, left)


def test_release_without_pyarrow_loaded_or_twice_is_harmless():
    memory.release()
    memory.release()


_BODIES = """
import subprocess
import sys
from photoprep.core import memory

if sys.argv[1] == "mapped":
    memory.map_large_blocks()


def anon_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon:"))


# The download's pattern: a body of tens of KB a photo, freed soon, between blocks that stay.
before = anon_mb()
bodies, kept = [], []
for i in range(4000):
    bodies.append(bytes(range(256)) * (80 + i % 80))
    kept.append(bytearray(700))
del bodies
print(anon_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon and mallopt are Linux's (glibc)")
def test_freed_bodies_between_blocks_that_stay_go_back_when_large_blocks_are_mapped():
    def left_mb(mode: str) -> float:
        command = [sys.executable, "-c", _BODIES, mode]
        return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    in_the_heap, mapped = left_mb("heap"), left_mb("mapped")
    assert in_the_heap > 40, in_the_heap  # 4,000 bodies of about 30 KB: their pages stayed
    assert mapped < in_the_heap / 4, (in_the_heap, mapped)
