"""Where a record's bytes come from, and the rules that keep a download inside its source.

A record's `url` is an http(s) URL, a ``file://`` URL, or a path relative to the source folder
(`target_of`). Local files (relative paths and ``file://`` URLs) are read only from inside the
source folder: lexically when the target is made (``path_outside_source``), and again with
symlinks resolved when the file is read (`read_local`), which reads only regular files and
never blocks on a FIFO. Redirects are followed only to the same host (`same_host`): the same
hostname and port, where an upgrade from http to https on the default ports counts as the
same host.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from yarl import URL

_NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR, errno.ELOOP})


@dataclass(frozen=True, slots=True)
class Target:
    """Where a record's bytes come from: an http(s) URL, a local file, or nowhere (`reason`).

    A local file must resolve (symlinks followed) to a path inside `root`, the source folder.
    """

    url: URL | None = None
    path: str | None = None
    reason: str = ""
    root: str = ""


def target_of(url: Any, base_dir: Path) -> Target:
    """Classify a record's `url`: http(s), file://, or a path relative to `base_dir`.

    Local files (file:// and paths) must lie inside `base_dir`, the source folder.
    """
    if not isinstance(url, str) or not url.strip():
        return Target(reason="bad_url")
    if url.startswith(("http://", "https://")):  # the common case, without urlsplit's cost
        return _http_target(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _http_target(url)
    if scheme == "file":
        return _file_url_target(url, base_dir)
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, i.e. a path
        return Target(reason="bad_url")
    return _relative_target(url, base_dir)


def _http_target(url: str) -> Target:
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 -- an out-of-range port raises only when read
    except (ValueError, TypeError):
        return Target(reason="bad_url")
    if not parsed.host:
        return Target(reason="bad_url")
    return Target(url=parsed)


def _local_target(full: str, base_dir: Path) -> Target:
    """A local path, refused unless it lies inside the source folder (lexically here; symlinks at read)."""
    base = os.path.normpath(os.path.abspath(base_dir))
    full = os.path.normpath(os.path.abspath(full))
    if not _inside(full, base):
        return Target(reason="path_outside_source")
    return Target(path=full, root=base)


def _file_url_target(url: str, base_dir: Path) -> Target:
    """A file:// URL inside the source folder; a '..' segment after percent-decoding is refused."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        return Target(reason="bad_url")
    path = unquote(parts.path)
    if "\0" in path or ".." in path.split("/"):
        return Target(reason="bad_url")
    return _local_target(path, base_dir)


def _relative_target(url: str, base_dir: Path) -> Target:
    """A percent-encoded path relative to the source folder, which it must not leave."""
    path = unquote(url)
    if "\0" in path:
        return Target(reason="bad_url")
    return _local_target(os.path.join(os.path.abspath(base_dir), path), base_dir)


def reads_files(urls: Iterable[Any]) -> bool:
    """Whether any of `urls` names a local file (a path or a file:// URL), not an http(s) URL."""
    return any(isinstance(url, str) and not url.lower().startswith(("http://", "https://")) for url in urls)


def same_host(origin: URL, to: URL) -> bool:
    """Same hostname and port; http -> https on the default ports is the same host too."""
    if origin.host != to.host:
        return False
    if origin.port == to.port:
        return True
    return (
        origin.scheme == "http"
        and to.scheme == "https"
        and origin.explicit_port in (None, 80)
        and to.explicit_port in (None, 443)
    )


def _inside(path: str, root: str) -> bool:
    return path.startswith(root.rstrip(os.sep) + os.sep)


def read_local(path: str, root: str, max_bytes: int) -> tuple[bytes | None, str]:
    """The bytes of a regular file inside `root` (symlinks resolved) and '', or None and why not
    (path_outside_source, not_found, permission_denied, too_large, read_error); never blocks on a FIFO."""
    real = os.path.realpath(path)
    if root and not _inside(real, os.path.realpath(root)):
        return None, "path_outside_source"
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        return None, _os_reason(exc)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, "not_found"
        if info.st_size > max_bytes:
            return None, "too_large"
        with os.fdopen(os.dup(fd), "rb") as f:
            data = _read_up_to(f, min(info.st_size, max_bytes) + 1, max_bytes + 1)
    except OSError as exc:
        return None, _os_reason(exc)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        return None, "too_large"
    return data, ""


def _read_up_to(f: io.BufferedReader, expected: int, limit: int) -> bytes:
    """At most `limit` bytes of `f`, asking first for the `expected` its size says (plus one).

    ``read(limit)`` alone makes Python allocate `limit` bytes for every file (50 MB at the
    default ``download.max_bytes``; a 9 KB photo read so took 41 µs against 10). A file that
    holds more than its size said (it grew since, or the system reports no size) is read on."""
    data = f.read(expected)
    if len(data) < expected or expected >= limit:
        return data
    return data + f.read(limit - expected)


def _os_reason(exc: OSError) -> str:
    if exc.errno in _NOT_FOUND_ERRNOS:
        return "not_found"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission_denied"
    return "read_error"
