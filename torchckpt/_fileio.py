"""Atomic, durable file writes and fast checksums.

Every file torchckpt writes goes through :func:`atomic_writer`: a temporary name in the same
directory, the bytes hashed while they are written (never read back), flush, fsync, rename.
The directory itself is fsynced by :func:`fsync_dir` before a commit marker refers to the file.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .errors import WriteError

#: Temporary files carry this infix; gc recognises leftovers by it.
TMP_INFIX = ".tmp-"
CHECKSUM_ALGO = "xxh3_128"
_READ_CHUNK = 16 << 20


def tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and TMP_INFIX in name


class HashingWriter:
    """A write-only binary stream that hashes and counts what passes through it."""

    def __init__(self, raw):
        self._raw = raw
        self._hash = xxhash.xxh3_128()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        written = self._raw.write(view)
        self.size += len(view)
        return written if written is not None else len(view)

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    @property
    def checksum(self) -> str:
        return f"{CHECKSUM_ALGO}:{self._hash.hexdigest()}"


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    size: int
    checksum: str


def describe_os_error(err: OSError, path: Path) -> str:
    """A one-line explanation of a write failure with the fix for the common causes."""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}: free space there or save to another root"
    if err.errno == errno.EFBIG:
        return f"file too large while writing {path}: the file-size limit (ulimit -f) or the filesystem's maximum was reached"
    if err.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {path}: free space in your quota or save elsewhere"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {err.strerror}; choose a writable checkpoint root"
    return f"writing {path} failed: {err.strerror or err}"


@contextlib.contextmanager
def atomic_writer(final: Path, *, buffering: int = 8 << 20) -> Iterator[HashingWriter]:
    """Yield a hashing stream whose bytes appear under ``final`` only if the block completes.

    On success the file is flushed, fsynced and renamed over ``final``; the caller must
    :func:`fsync_dir` the parent before publishing the file. On any failure the temporary file
    is removed and ``final`` is untouched. The resulting :class:`WrittenFile` is available as
    ``writer.result`` after the block.
    """
    final = Path(final)
    tmp = tmp_name(final)
    try:
        raw = open(tmp, "xb", buffering=buffering)  # noqa: SIM115 - closed below on every path
    except OSError as e:
        raise WriteError(e.errno, describe_os_error(e, final)) from e
    writer = HashingWriter(raw)
    try:
        try:
            yield writer
            raw.flush()
            os.fsync(raw.fileno())
        finally:
            raw.close()
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(e.errno, describe_os_error(e, final)) from e
        raise
    writer.result = WrittenFile(final, writer.size, writer.checksum)  # type: ignore[attr-defined]


def write_bytes_atomic(final: Path, data: bytes) -> WrittenFile:
    with atomic_writer(final, buffering=-1) as w:
        w.write(data)
    return w.result  # type: ignore[attr-defined]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checksum_file(path: Path) -> tuple[int, str]:
    """Size and checksum of a file, read through mmap (page cache, no extra copy)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    for start in range(0, size, _READ_CHUNK):
                        h.update(view[start : start + _READ_CHUNK])
                finally:
                    view.release()
    return size, f"{CHECKSUM_ALGO}:{h.hexdigest()}"
