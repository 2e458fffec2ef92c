"""Re-saves that cost nothing: an unchanged object is stored once, as a hard link.

A notebook re-saves the same frozen base again and again. Before an object is serialised, its
*content key* is computed (:func:`content_key`): torch's own save steps run with a writer that
only hashes — the pickled structure (keys, dtypes, shapes, strides, storage sharing, devices) and
every storage's bytes, xxh3-128 at memory speed — so the key equals for two states exactly when
torch would write the same records. The manifest's metadata keeps each file's key
(``"content_keys": {"objects/base.pt": "…"}``). When a committed tag of the same root holds a
file with the same key, the new tag gets a hard link to it instead of a new file
(:func:`place`): no bytes written, no disk used, and each tag directory still holds plain
``torch.load`` files — removing either name never affects the other.

Files saved without a key (or whose key is new) are written as usual; a written file whose size
and checksum equal a committed file's is then replaced by a link to it (disk saved, not time).

Safety: a link is made only to a file of a *committed* tag whose manifest lists it with the
expected size and checksum, only to a regular file inside that tag directory, and it is made
under a temporary name in the new tag directory and re-hashed there (a tampered or damaged
committed file is never propagated: the link is dropped and the object written anew), fsynced,
then renamed into place — the same atomic path as any written file. Where links fail (another
file system, no link support) the file is copied through the same path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from ._fileio import CHECKSUM_ALGO, checksum_file, fsync_file
from .layout import tmp_name

if TYPE_CHECKING:
    from .manifest import FileRecord
    from .store import CheckpointInfo

logger = logging.getLogger(__name__)

#: The metadata key: relpath -> content key, for each file of a tag that has one.
KEYS_FIELD = "content_keys"
#: Bumped whenever what the key covers changes.
_KEY_VERSION = "1"


# -- the content key ---------------------------------------------------------------------------------
class _HashingZip:
    """Stands in for torch's ``PyTorchFileWriter``: hashes each record's name and bytes."""

    def __init__(self) -> None:
        self.hash = xxhash.xxh3_128()

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        self.hash.update(f"{name}\0{nbytes}\0".encode())
        if nbytes == 0:
            return
        if isinstance(data, str):
            self.hash.update(data.encode())
        elif isinstance(data, (bytes, bytearray, memoryview)):
            self.hash.update(data)
        else:  # a CPU UntypedStorage: hash its memory where it lies
            self.hash.update((ctypes.c_char * nbytes).from_address(data.data_ptr()))

    def write_record_metadata(self, name: str, nbytes: int) -> None:  # pragma: no cover - skip_data mode
        raise NotImplementedError("content keys need the data")


def _prefix() -> str:
    import torch

    from . import serialization

    fast = serialization._fast_save_available()
    return f"k{_KEY_VERSION};torch {torch.__version__};fast {fast};align {torch.serialization._get_storage_alignment()}"


def content_key(payload: Any) -> str | None:
    """A key of ``payload``'s serialised form, without writing it: equal keys mean torchckpt's
    save writes the same bytes (same torch version). None when it cannot be computed (then the
    object is simply written)."""
    import pickle

    import torch

    try:
        zf = _HashingZip()
        zf.hash.update(_prefix().encode())
        torch.serialization._save(payload, zf, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    except Exception as e:  # noqa: BLE001 - no key: the object is written as usual
        logger.debug("no content key: %s", e)
        return None
    return f"{CHECKSUM_ALGO}:{zf.hash.hexdigest()}"


# -- candidates: committed files of the root -------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A committed file that a new file may share."""

    tag: str
    tag_dir: Path
    record: FileRecord


class Candidates:
    """The committed files of a root, by content key and by (size, checksum); newest tag wins."""

    def __init__(self, infos: Iterable[CheckpointInfo], *, exclude: str | None = None):
        self.by_key: dict[str, Candidate] = {}
        self.by_sum: dict[tuple[int, str], Candidate] = {}
        for info in sorted(infos, key=lambda i: (i.created, i.tag)):
            if not info.committed or info.in_flight or info.manifest is None or info.tag == exclude:
                continue
            keys = info.metadata.get(KEYS_FIELD)
            keys = keys if isinstance(keys, dict) else {}
            for rec in info.manifest.files.values():
                cand = Candidate(info.tag, info.path, rec)
                self.by_sum[(rec.size, rec.checksum)] = cand
                key = keys.get(rec.path)
                if isinstance(key, str):
                    self.by_key[key] = cand

    def __len__(self) -> int:
        return len(self.by_sum)


# -- files whose checksum this process knows ------------------------------------------------------------
#: (st_dev, st_ino) -> (size, mtime_ns, ctime_ns, checksum) of files this process hashed: written
#: through the hashing writer, or re-hashed when linked. Any write to a file changes its mtime and
#: ctime (a ctime cannot be set back), so a file whose identity still matches need not be re-hashed.
_confirmed: dict[tuple[int, int], tuple[int, int, int, str]] = {}
_confirmed_lock = threading.Lock()
_CONFIRMED_MAX = 100_000


def confirm(path: Path, checksum: str) -> None:
    """Remember that ``path``, as it is now, has ``checksum`` (the caller just hashed its bytes)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    with _confirmed_lock:
        if len(_confirmed) >= _CONFIRMED_MAX:
            _confirmed.clear()
        _confirmed[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, checksum)


def _known(st: os.stat_result, checksum: str) -> bool:
    with _confirmed_lock:
        return _confirmed.get((st.st_dev, st.st_ino)) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, checksum)


# -- placing a link ---------------------------------------------------------------------------------
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.ENOSYS}


def _source_problem(cand: Candidate) -> tuple[str | None, os.stat_result | None]:
    from .store import _file_problem

    if problem := _file_problem(cand.tag_dir, cand.record.path):
        return problem, None
    try:
        st = os.lstat(cand.tag_dir / cand.record.path)
    except OSError as e:
        return f"unreadable ({e.strerror})", None
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file", None
    if st.st_size != cand.record.size:
        return f"size {st.st_size} bytes, its manifest says {cand.record.size}", None
    return None, st


def place(final: Path, cand: Candidate, *, verify: bool = True) -> str | None:
    """Make ``final`` the same file as ``cand``: a hard link (or a copy where links fail),
    made under a temporary name, checked against the candidate's manifest record (re-hashed
    when ``verify``, unless this process hashed that very file and it has not changed since: same
    inode, size, mtime and ctime), fsynced and renamed into place. Returns ``"linked"``/``"copied"``,
    or None when the candidate cannot be used (gone, damaged, tampered): write the file instead."""
    source = cand.tag_dir / cand.record.path
    problem, before = _source_problem(cand)
    if problem or before is None:
        logger.warning("not sharing %s/%s: %s", cand.tag, cand.record.path, problem)
        return None
    known = _known(before, cand.record.checksum)
    tmp = tmp_name(final)
    try:
        try:
            os.link(source, tmp, follow_symlinks=False)
            how = "linked"
        except FileNotFoundError:
            return None  # removed meanwhile (rm, gc in another kernel)
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
            shutil.copyfile(source, tmp, follow_symlinks=False)
            how = "copied"
        st = os.lstat(tmp)
        if not stat.S_ISREG(st.st_mode) or st.st_size != cand.record.size:
            raise _Mismatch(f"size {st.st_size}, manifest says {cand.record.size}")
        # (linking changes the inode's ctime, not its mtime: a write in between shows in the mtime)
        unchanged = how == "linked" and (st.st_ino, st.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        if (verify and not (known and unchanged)) or how == "copied":
            size, checksum = checksum_file(tmp)
            if (size, checksum) != (cand.record.size, cand.record.checksum):
                raise _Mismatch("checksum mismatch (bytes changed since its commit)")
        fsync_file(tmp)
        os.replace(tmp, final)
        confirm(final, cand.record.checksum)
    except _Mismatch as e:
        logger.warning("not sharing %s/%s: %s; writing a new file (torchckpt verify %s)",
                       cand.tag, cand.record.path, e, cand.tag)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        return None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return how


class _Mismatch(Exception):
    pass


# -- disk use ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskUsage:
    """Bytes of a root's tag files: ``apparent`` counts every name, ``unique`` each file once."""

    apparent: int
    unique: int
    files: int
    links: int

    @property
    def saved(self) -> int:
        return self.apparent - self.unique


def disk_usage(root: str | os.PathLike) -> DiskUsage:
    """How much of a root's tag files hard links share (files outside tag directories ignored)."""
    apparent = unique = files = links = 0
    seen: set[tuple[int, int]] = set()
    root = Path(root)
    if not root.is_dir():
        return DiskUsage(0, 0, 0, 0)
    for tag_dir in root.iterdir():
        if tag_dir.name.startswith(".") or not tag_dir.is_dir() or tag_dir.is_symlink():
            continue
        for path in tag_dir.rglob("*"):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            files += 1
            apparent += st.st_size
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                links += 1
                continue
            seen.add(ident)
            unique += st.st_size
    return DiskUsage(apparent, unique, files, links)
