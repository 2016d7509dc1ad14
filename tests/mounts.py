"""Real file systems for the storage-fault tests: a size-limited tmpfs and a read-only bind mount.

The tests run as root, so permission bits do not bite: a full disk must be a file system that is
full, and a read-only folder one mounted read-only. A test that cannot mount (no root, no
mount(8), a container that forbids it) is skipped with the reason, never passed.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is not installed: the storage-fault tests need real file systems")
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here (mount {' '.join(args)}: {done.stderr.strip()}); the test needs root")


def _unmount(path: Path) -> None:
    done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if done.returncode != 0:  # a process still holds a file: detach now, gone when it lets go
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `path` (made if missing), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _unmount(path)


def resize(path: Path, size: int) -> None:
    """Give the tmpfs at `path` `size` bytes, keeping its files (space freed, as a user would)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` (made if missing) bind-mounted read-only over itself; writable again afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        _unmount(path)


def fill(folder: Path) -> Path:
    """Write a ballast file into `folder` until its file system is full; the file's path."""
    ballast = folder / "ballast"
    with open(ballast, "wb", buffering=0) as out:
        for step in (64 << 10, 4096, 1):  # big steps, then what is left of the last page
            with contextlib.suppress(OSError):
                while out.write(b"\0" * step):
                    pass
    return ballast
