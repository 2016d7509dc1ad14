"""The sharded blob store: image bytes appended to a few tar shards, indexed by sha256.

A source's fetched bytes live in ``data/raw/<source>/shard-<16 hex>.tar``. DVC then tracks a
handful of large files instead of 100k small ones, and no file name ever comes from an id
(members are named by their sha256), so no id can write outside the store.

- Shards are uncompressed ustar archives with deterministic headers (mtime 0, uid/gid 0,
  empty uname/gname, mode 0o644), so ``tar tf shard-*.tar`` lists the sha256 of each blob.
- Byte-identical blobs are stored once: the writer indexes the shards already on disk.
- Blobs are written as they are added, in the order added, each once (no copy held in
  memory); a shard is named from a hash of its member list, which fixes its bytes. The
  same sequence of blobs always gives the same files.
- Writes are atomic: a shard is built in a temporary file in the same folder and renamed
  into place when full or flushed. Existing shards are never modified.
- Nothing is trusted because it exists: every shard's size and headers are checked against
  the archive they describe, and its name against the hash of its member list, before its
  blobs count as stored (`verify_shard`). A damaged shard is set aside (renamed to
  ``.damaged-<name>``, which no glob of shards matches) and its blobs are fetched again.
- The shard being written can be committed (`ShardWriter.commit`: fsync, then its name and
  length go into the download's journal) and picked up again after a kill
  (`ShardWriter(..., resume=...)`): each member up to the committed length is re-hashed, the
  rest cut off, and appending goes on, so an interrupted and resumed download writes the
  same shards as an uninterrupted one. A write that fails (a full disk) is undone: the shard in
  progress ends with its last whole blob again, can still be committed, and is never removed
  once a commit names it (`ShardWriter.cut_back` cuts it back to that commit).
- Blobs are read back by (shard, offset, size) (`photoprep.ingest.blobs`).

Why one module
    The writer and the verifier share one definition of a shard's bytes (the member header,
    the padding, the end of the archive); split apart, a change to one would silently break
    the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from photoprep.core.io import fsync_directory
from photoprep.ingest.blobindex import BlobIndex

SHARD_GLOB = "shard-*.tar"
SHARD_NAME = re.compile(r"shard-[0-9a-f]{16}\.tar")
# A partitioned download (photoprep.ingest.partitions) keeps each partition's shards in a folder
# of their own: a table then names a shard ``part-0007/shard-<hash>.tar``.
PART_PREFIX = "part-"
SHARD_REF = re.compile(r"(?:part-[0-9]{4}/)?shard-[0-9a-f]{16}\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240: archives end on a record boundary, like tar(1) writes them
_TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = ".damaged-"


def index_shards(directory: Path) -> BlobIndex:
    """sha256 -> BlobRef of every blob in the sound, finished shards of `directory` (damaged ones skipped)."""
    refs = BlobIndex()
    for path in _shard_paths(directory):
        members, _problem = verify_shard(path)
        _index_members(refs, path.name, members or {})
    return refs


def _index_members(refs: BlobIndex, name: str, members: dict[str, tuple[int, int]]) -> None:
    code = refs.shard_code(name)
    for sha256, (offset, size) in members.items():
        refs.add(sha256, code, offset, size)


def _shard_paths(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [p for p in sorted(directory.glob(SHARD_GLOB)) if SHARD_NAME.fullmatch(p.name)]


def _walk_members(fd: int, end: int) -> tuple[dict[str, tuple[int, int]], int, str]:
    """Members (sha256 -> data offset, size) of the archive in `fd` up to byte `end`.

    Also the position after the last member and a problem ('' when none): a header that is not
    ours, a checksum that does not match, or data that runs past `end`. Stops at the
    end-of-archive marker (a zero block).
    """
    members: dict[str, tuple[int, int]] = {}
    position = 0
    while position + _BLOCK <= end:
        header = os.pread(fd, _BLOCK, position)
        if len(header) < _BLOCK:
            return members, position, f"short read at byte {position}"
        if header == b"\0" * _BLOCK:
            return members, position, ""
        ours = _our_header(header)
        if ours is not None:
            name, size = ours
        else:
            try:
                info = tarfile.TarInfo.frombuf(header, encoding="utf-8", errors="strict")
            except (tarfile.HeaderError, UnicodeDecodeError) as exc:
                return members, position, f"bad header at byte {position} ({exc})"
            if not (info.isfile() and _SHA256.fullmatch(info.name)):
                return members, position, f"unexpected member {info.name!r} at byte {position}"
            name, size = info.name, info.size
        data_at = position + _BLOCK
        after = data_at + size + (-size % _BLOCK)
        if data_at + size > end:
            return members, position, f"member {name[:12]}... runs past byte {end}"
        members.setdefault(name, (data_at, size))
        position = after
    return members, position, ""


def _our_header(header: bytes) -> tuple[str, int] | None:
    """(sha256, size) when `header` is byte for byte the header this store writes for them.

    That one comparison checks the checksum and every other field; it costs a few microseconds
    where tarfile's parser takes tens, and a re-run walks every header of every shard. Any other
    header (None) goes through tarfile, which accepts or names what is wrong with it.
    """
    try:
        name = header[:64].decode("ascii")
        size = int(header[124:135], 8)
    except (UnicodeDecodeError, ValueError):
        return None
    if not _SHA256.fullmatch(name) or header != member_header(name, size):
        return None
    return name, size


def _listing_hash(members: dict[str, tuple[int, int]]) -> str:
    listing = "".join(f"{sha256} {size}\n" for sha256, (_, size) in members.items())
    return hashlib.sha256(listing.encode()).hexdigest()


def verify_shard(path: Path) -> tuple[dict[str, tuple[int, int]] | None, str]:
    """The members of a finished shard (sha256 -> data offset, size), or None and what is wrong.

    Checked without reading the blobs: every header (checksum, a sha256 name), the end-of-archive
    marker, the file size (the archive ends on a record boundary, nothing after it), and the
    name, which is the hash of the member list, so a header that lies about a size is caught too.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return None, f"cannot open ({exc.strerror})"
    try:
        size = os.fstat(fd).st_size
        members, position, problem = _walk_members(fd, size)
    finally:
        os.close(fd)
    if problem:
        return None, problem
    expected = position + 2 * _BLOCK
    expected += -expected % _RECORD
    if size != expected:
        return None, f"{size} bytes where its members make {expected} (truncated or extended)"
    if not members:
        return None, "no member"
    if path.name != f"shard-{_listing_hash(members)[:16]}.tar":
        return None, "its name does not match its member list"
    return members, ""


def set_aside_damaged(directory: Path) -> list[str]:
    """Rename every damaged shard of `directory` to ``.damaged-<name>``; one line per shard set aside."""
    return check_shards(directory)[0]


def check_shards(directory: Path) -> tuple[list[str], BlobIndex]:
    """Each shard of `directory` verified once: the damaged ones set aside (a line each), and
    the index (sha256 -> BlobRef) of the blobs in the sound ones."""
    lines: list[str] = []
    refs = BlobIndex()
    for path in _shard_paths(directory):
        members, problem = verify_shard(path)
        if members is None:
            os.replace(path, path.with_name(DAMAGED_PREFIX + path.name))
            lines.append(
                f"shard {path.name} is damaged ({problem}): set aside as {DAMAGED_PREFIX}{path.name}"
            )
            continue
        _index_members(refs, path.name, members)
    if lines:
        fsync_directory(Path(directory))
    return lines, refs


def tarfile_header(sha256: str, size: int) -> bytes:
    """The 512-byte ustar header of one blob, as tarfile writes it."""
    info = tarfile.TarInfo(sha256)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


_HEADER_TEMPLATE = tarfile_header("0" * 64, 0)
_MAX_OCTAL_SIZE = 8**11 - 1  # what the 12-byte size field holds


def member_header(sha256: str, size: int) -> bytes:
    """The ustar header of one blob: the same bytes on every machine and run.

    Only the name, the size and the checksum differ between blobs, so they are patched into
    a template (tarfile builds each header from scratch, some 70 us apiece).
    """
    if len(sha256) != 64 or size > _MAX_OCTAL_SIZE:
        return tarfile_header(sha256, size)
    header = bytearray(_HEADER_TEMPLATE)
    header[0:64] = sha256.encode("ascii")
    header[124:136] = b"%011o\0" % size
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _padding(size: int, unit: int) -> bytes:
    """Zero bytes that bring `size` up to a multiple of `unit`."""
    return b"\0" * (-size % unit)


@dataclass(frozen=True)
class OpenState:
    """A committed shard in progress: its temporary file's name and how many bytes of it count."""

    tmp_name: str
    length: int


class _OpenShard:
    """A shard being written: a temporary file in the store folder, renamed when closed. Its blobs
    go into the writer's index (`refs`) as they are written, under a code of their own."""

    def __init__(self, directory: Path, refs: BlobIndex, resume: OpenState | None = None):
        self.directory = directory
        self.refs = refs
        self.code = refs.shard_code()
        self.position = 0
        self.payload = 0
        self.count = 0  # blobs written
        self.listing = hashlib.sha256()  # of the member list, as `_listing_hash` has it
        self.synced = 0  # bytes made durable by `sync`: a journal may name this length, never more
        if resume is None:
            self.fd, self.tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tar", dir=directory)
            return
        self.tmp = str(directory / resume.tmp_name)
        self.fd = os.open(self.tmp, os.O_RDWR)
        try:
            self._take_up(resume.length)
        except BaseException:
            self.discard()
            raise

    def _take_up(self, length: int) -> None:
        """Check the committed part of a temporary shard (each blob re-hashed) and cut off the rest."""
        size = os.fstat(self.fd).st_size
        if size < length:
            raise ValueError(f"{size} bytes where {length} were committed")
        members, position, problem = _walk_members(self.fd, length)
        if problem or position != length:
            raise ValueError(problem or f"members end at byte {position}, not at {length}")
        for sha256, (offset, n) in members.items():
            if hashlib.sha256(pread_exact(self.fd, offset, n)).hexdigest() != sha256:
                raise ValueError(f"blob {sha256[:12]}... does not hash to its name")
        os.ftruncate(self.fd, length)
        os.lseek(self.fd, length, os.SEEK_SET)  # appending goes on where the commit ended
        for sha256, (offset, n) in members.items():
            self._member(sha256, offset, n)
        self.position = self.synced = length

    def sync(self) -> OpenState:
        """Make every blob appended so far durable; what a journal needs to pick the shard up again."""
        os.fsync(self.fd)
        self.synced = self.position
        return OpenState(os.path.basename(self.tmp), self.position)

    def append(self, sha256: str, data: bytes) -> None:
        header = member_header(sha256, len(data))
        at = self.position + len(header)
        self._write(header, data, _padding(len(data), _BLOCK))
        self._member(sha256, at, len(data))  # once whole: a failed write adds no member

    def _member(self, sha256: str, offset: int, size: int) -> None:
        self.refs.add(sha256, self.code, offset, size)
        self.listing.update(f"{sha256} {size}\n".encode())
        self.count += 1
        self.payload += size

    def rewind(self, end: int) -> bool:
        """Cut the file back to `end`, where its last whole blob ends, after a failed write; False
        when it cannot be (closed already, or the cut itself failed)."""
        if self.fd < 0:
            return False
        try:
            os.ftruncate(self.fd, end)
            os.lseek(self.fd, end, os.SEEK_SET)
        except OSError:
            return False
        self.position = end
        return True

    def close(self) -> str:
        """Finish the archive, make it durable, rename it after its content; its file name."""
        self._write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
        self._write(_padding(self.position, _RECORD))
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        name = f"shard-{self._content_hash()[:16]}.tar"
        final = self.directory / name
        if final.exists():
            # Same name, same member list, hence the same bytes: keep the existing shard untouched.
            os.unlink(self.tmp)
        else:
            os.replace(self.tmp, final)
            fsync_directory(self.directory)
        return name

    def discard(self) -> None:
        self.refs.forget(self.code)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def give_up(self) -> None:
        """After a write that could not be undone: remove the file if no journal can name it (never
        synced), else leave it to `ShardWriter.cut_back` or the next run's take-up. Best effort:
        the error that brought us here is the one to report."""
        self.refs.forget(self.code)
        with contextlib.suppress(OSError):
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                os.close(fd)
            if self.synced == 0:
                os.unlink(self.tmp)

    def _content_hash(self) -> str:
        # The archive's bytes are a function of its member list (names, sizes, order), and each
        # name is the sha256 of the data: hashing that list names the content without reading
        # hundreds of MB again.
        return self.listing.hexdigest()

    def _write(self, *chunks: bytes) -> None:
        total = sum(len(c) for c in chunks)
        written = os.writev(self.fd, chunks)  # one syscall, no copy into a buffer
        if written < total:
            rest = b"".join(chunks)[written:]
            while rest:
                rest = rest[os.write(self.fd, rest) :]
        self.position += total


class ShardWriter:
    """Appends blobs to shards in `directory`, in the order added, at most `shard_bytes` of payload each.

    A blob whose bytes the store already holds (in a shard on disk or in this run) is skipped.
    Each blob is written at once to a temporary shard file; a full shard is closed (renamed
    to ``shard-<hash of its member list>.tar``) and the next one begun. The same sequence of
    blobs gives byte-identical shards, so a caller that adds in a fixed order (the fetcher
    adds in record order, whatever order responses arrive in) gets deterministic shards.
    `known` is the index of blobs already stored; by default the shards in `directory` are
    read for it. Leaving the `with` block flushes, unless an exception is on its way out:
    then the shard being written is removed (shards closed before stay; each is complete). A
    download, whose journal commits part of that shard, calls `cut_back` instead, which keeps it.
    Temporary files a killed run left behind are removed when a writer starts, so they never
    end up in a DVC output: one writer per folder at a time. Not thread-safe: call it from
    one thread (a download's storage thread, `photoprep.ingest.fetch`).
    """

    def __init__(
        self,
        directory: Path,
        shard_bytes: int,
        known: BlobIndex | None = None,
        resume: OpenState | None = None,
    ):
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1 (got {shard_bytes})")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []  # one line per damaged shard set aside or commit not taken up
        keep = resume.tmp_name if resume is not None else None
        for leftover in self.directory.glob(_TMP_PREFIX + "*"):
            if leftover.name != keep:
                leftover.unlink()
        self.shard_bytes = shard_bytes
        if known is None:
            damaged, known = check_shards(self.directory)
            self.notes.extend(damaged)
        self._refs = known
        self._open: _OpenShard | None = None
        self.broken = False  # a failed write could not be undone: the shard in progress was given up
        if resume is not None and resume.length > 0:
            try:
                self._open = _OpenShard(self.directory, self._refs, resume)
            except FileNotFoundError:
                pass  # closed after that commit: its blobs are in a finished shard, indexed above
            except (OSError, ValueError) as exc:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / resume.tmp_name)
                self.notes.append(f"the shard in progress {resume.tmp_name} is damaged ({exc}): removed")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.flush()
        else:
            self.discard()

    def add(self, data: bytes, sha256: str | None = None) -> str:
        """Store `data` unless the store already holds it; return its sha256.

        Its BlobRef is known once its shard is closed (`flush`). `sha256` is trusted when
        given (the caller has just hashed the bytes).
        """
        if sha256 is None:
            sha256 = hashlib.sha256(data).hexdigest()
        shard = self._open
        if sha256 in self._refs:
            return sha256
        if shard is not None and shard.count and shard.payload + len(data) > self.shard_bytes:
            self._close_shard()
            shard = None
        if shard is None:
            shard = self._open = _OpenShard(self.directory, self._refs)
        end = shard.position
        try:
            shard.append(sha256, data)
        except BaseException:
            self._after_failure(shard, end)
            raise
        return sha256

    def holds(self, sha256: str) -> bool:
        """True when the store holds the blob: in a finished shard or in the one being written."""
        return sha256 in self._refs

    def commit(self) -> OpenState | None:
        """Make every blob added so far durable; the shard in progress to resume from (None if none)."""
        return None if self._open is None else self._open.sync()

    def flush(self) -> BlobIndex:
        """Close the shard being written; the refs of every blob the store holds (the writer's own
        index, not a copy: a copy was a second table of every blob)."""
        if self._open is not None:
            self._close_shard()
        return self._refs

    def abandon(self) -> None:
        """Stop writing, leaving the shard in progress on disk as its last commit made it (a stop)."""
        if self._open is not None:
            shard, self._open = self._open, None
            self._refs.forget(shard.code)  # not stored, as far as this writer can tell
            if shard.fd >= 0:
                os.close(shard.fd)
                shard.fd = -1

    def cut_back(self, kept: OpenState | None) -> None:
        """Leave the store as a journal's last commit (`kept`) left it, after a failed write.

        The shard in progress that `kept` names is cut back to its committed length; every other
        temporary shard (nothing committed names it) is removed. Closed shards stay. A full disk
        gets its space past the commit back now, and the next run takes the shard up as after a
        kill. Best effort: what cannot be changed here (a read-only folder) the next run does.
        """
        self.abandon()
        for leftover in self.directory.glob(_TMP_PREFIX + "*.tar"):
            with contextlib.suppress(OSError):
                if kept is not None and leftover.name == kept.tmp_name:
                    os.truncate(leftover, kept.length)
                else:
                    leftover.unlink()

    def discard(self) -> None:
        """Remove the shard being written (its blobs are forgotten); closed shards stay."""
        if self._open is not None:
            shard, self._open = self._open, None
            shard.discard()

    def _after_failure(self, shard: _OpenShard, end: int) -> None:
        """A write to `shard` failed (a full disk): it ends with its last whole blob again and
        stays open, or, when that cannot be, it is given up and the writer is `broken`."""
        if not shard.rewind(end):
            self._open = None
            self.broken = True
            shard.give_up()

    def _close_shard(self) -> None:
        shard = self._open
        assert shard is not None
        end = shard.position
        try:
            name = shard.close()
        except BaseException:
            self._after_failure(shard, end)
            raise
        self._open = None
        self._refs.name(shard.code, name)


def pread_exact(fd: int, offset: int, size: int) -> bytes:
    """Exactly `size` bytes at `offset`, or ValueError when the file is shorter."""
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        part = os.pread(fd, size - got, offset + got)
        if not part:
            raise ValueError(f"blob at offset {offset} (size {size}) runs past the end of its shard")
        parts.append(part)
        got += len(part)
    return b"".join(parts)
