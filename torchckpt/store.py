"""The checkpoint store: one root directory of tags, and the transaction that writes a tag.

Everything that lists, inspects, verifies, loads, deletes or writes checkpoints goes through
:class:`CheckpointStore`; the DeepSpeed engine, the magics, the panel and the CLI are shells
over it. The on-disk contract is in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import difflib
import errno
import fcntl
import functools
import logging
import os
import shutil
import stat
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import filelock

from ._fileio import (
    atomic_writer,
    checksum_file,
    fsync_dir,
    write_bytes_atomic,
)
from .errors import (
    CheckpointInUseError,
    CommitError,
    CorruptCheckpointError,
    FileNotInCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    InvalidTagError,
    ManifestError,
    StoreLockedError,
    TagNotFoundError,
    TorchckptError,
    UnsafePathError,
    WriteError,
)
from .layout import (
    LATEST_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    RESERVED_PREFIX,
    TRASH_PREFIX,
    WRITING_NAME,
    is_tmp_name,
    origin,
    rank_part_name,
    started_by_torchckpt,
)
from .manifest import (
    CheckpointMeta,
    FileRecord,
    Manifest,
    check_metadata,
    current_versions,
    read_manifest,
    validate_relpath,
    validate_tag,
    write_manifest,
)

if TYPE_CHECKING:
    from . import serialization
    from .async_writer import AsyncWriter

logger = logging.getLogger(__name__)



class LatestFallbackWarning(UserWarning):
    """``latest`` was missing, torn or named an incomplete tag; the newest committed tag was used."""


class UnverifiedLoadWarning(UserWarning):
    """A file was loaded from a directory without a manifest (DeepSpeed's own engine wrote it, or a
    bare file): weights-only and checked for tears, but with no checksum to compare against."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What the store knows about one tag, without loading any tensor."""

    tag: str
    path: Path
    committed: bool
    created: float
    size: int
    is_latest: bool = False
    in_flight: bool = False
    manifest: Manifest | None = None
    problem: str | None = None

    @property
    def status(self) -> str:
        if self.in_flight:
            return "writing"
        if self.problem:
            return "unreadable"
        return "committed" if self.committed else "incomplete"

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest.metadata if self.manifest else {}

    @functools.cached_property
    def meta(self) -> CheckpointMeta:
        """The metadata torchckpt writes, typed and checked (:class:`~torchckpt.manifest.CheckpointMeta`);
        parsed once per info (the table, sorting and the panel read it for every row)."""
        return CheckpointMeta.parse(self.metadata)


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of re-checking every file of a tag against its manifest."""

    tag: str
    files_checked: int
    problems: list[str] = field(default_factory=list)
    #: Why the tag was not checked (being written now), or None.
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class GcPlan:
    """What :meth:`CheckpointStore.gc` removed (or, in a dry run, would remove)."""

    committed: list[str]
    incomplete: list[str]
    leftovers: list[Path]
    kept: list[str]
    dry_run: bool


class Coordinator(Protocol):
    """How the ranks of one commit agree; see :mod:`torchckpt._distributed`."""

    rank: int
    world_size: int

    def gather_errors(self, error: str | None, *, step: str) -> list[str | None]:
        """Every rank's error (None when fine) for ``step``, on every rank; never hangs."""

    def exchange(self, value: Any, *, step: str) -> tuple[list[Any], list[str | None]]:
        """Every rank's JSON value for ``step``, and why each missing rank is missing; never hangs."""


class LocalCoordinator:
    """One process: nothing to agree on."""

    rank = 0
    world_size = 1

    def gather_errors(self, error: str | None, *, step: str) -> list[str | None]:
        return [error]

    def exchange(self, value: Any, *, step: str) -> tuple[list[Any], list[str | None]]:
        return [value], [None]


def _in_flight(tag_dir: Path) -> bool:
    """True while some process holds the tag's writing lock (released by the OS on death).

    The probe tests the lock by taking it exclusively for an instant. Probes of one tag take turns
    (a lock on the tag's directory, in this process and others), so a probe never takes another
    probe for a writer, and a lock found held is a writer's: no waiting on a tag being written.
    Where directories cannot be locked, a lock held for :data:`_PROBE_PATIENCE` counts.
    """
    try:
        fd = os.open(tag_dir / WRITING_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        with _probes_take_turns(tag_dir) as alone:
            if not _lock_exclusive(fd, patience=0.0 if alone else _PROBE_PATIENCE):
                return True
            fcntl.flock(fd, fcntl.LOCK_UN)  # before the next probe's turn
            return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def _probes_take_turns(tag_dir: Path) -> Iterator[bool]:
    """Hold the tag directory's flock (only probes take it); yields False where it cannot be had."""
    try:
        fd = os.open(tag_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another probe's instant
            alone = True
        except OSError:  # a file system without directory locks
            alone = False
        yield alone
    finally:
        os.close(fd)  # releases it


#: How long a new writer keeps trying for a tag's writing lock: a probe (a listing in this process
#: or another: dedup's candidates, ``list``, the panel's poll) holds it exclusively for an instant
#: (a few ms on a loaded machine), a writer for the whole save. And how long a probe that cannot
#: take turns with the others (see :func:`_in_flight`) waits before it counts the lock as a writer's.
_BEGIN_PATIENCE = 0.5
_PROBE_PATIENCE = 0.05


def _lock_exclusive(fd: int, *, patience: float = _BEGIN_PATIENCE) -> bool:
    """Take ``fd``'s flock exclusively, retrying for up to ``patience`` seconds; False if it stayed held."""
    deadline = time.monotonic() + patience
    attempt = 0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            attempt += 1
            time.sleep(min(0.001 * attempt, 0.02))


class CheckpointStore:
    """A directory of checkpoint tags.

    Args:
        root: the checkpoint root (created on first write).
        lock_timeout: seconds to wait for another process's lock on the root before failing.

    Example:
        >>> store = CheckpointStore("checkpoints")
        >>> with store.transaction("step-100") as tx:
        ...     tx.write("model.pt", model.state_dict())
        ...     tx.commit(metadata={"step": 100})
        >>> state = store.load("latest", "model.pt", map_location="cpu")
    """

    def __init__(self, root: str | os.PathLike, *, lock_timeout: float = 60.0):
        self.root = Path(root).expanduser().absolute()
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.root)!r})"

    # -- paths and locking ---------------------------------------------------------------
    def tag_dir(self, tag: str) -> Path:
        return self.root / validate_tag(tag)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the root's lock (manifests, ``latest``, deletions). Released by the OS if we die."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.root / LOCK_NAME), timeout=self.lock_timeout)
        try:
            lock.acquire()
        except filelock.Timeout as e:
            raise StoreLockedError(
                f"another process has held the lock on {self.root} for over {self.lock_timeout:g}s "
                "(another kernel committing or deleting?); wait for it, or raise lock_timeout"
            ) from e
        try:
            yield
        finally:
            lock.release()

    # -- reading -----------------------------------------------------------------------------
    def _latest_named(self) -> str | None:
        try:
            text = (self.root / LATEST_NAME).read_text(encoding="utf-8", errors="replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return text

    def _info(self, tag_dir: Path, latest: str | None) -> CheckpointInfo:
        tag = tag_dir.name
        manifest, problem = None, None
        try:
            manifest = read_manifest(tag_dir)
        except ManifestError as e:
            problem = str(e)
        if manifest is not None:
            created, size = manifest.created, manifest.size
        else:
            created = tag_dir.stat().st_mtime
            size = _bytes_on_disk(tag_dir)
        return CheckpointInfo(
            tag=tag,
            path=tag_dir,
            committed=manifest is not None,
            created=created,
            size=size,
            is_latest=manifest is not None and tag == latest,
            in_flight=_in_flight(tag_dir),
            manifest=manifest,
            problem=problem,
        )

    def list(self) -> list[CheckpointInfo]:
        """Every tag under the root, committed or not, oldest first."""
        if not self.root.is_dir():
            return []
        latest = self._resolve_latest(warn=False)
        infos = []
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("."):
                try:
                    validate_tag(entry.name)
                    infos.append(self._info(entry, latest))
                except ValueError:
                    continue
                except FileNotFoundError:  # removed (gc, rm in another kernel) while we listed it
                    continue
        return sorted(infos, key=lambda i: (i.created, i.tag))

    def tags(self, *, committed_only: bool = False) -> builtins.list[str]:
        return [i.tag for i in self.list() if i.committed or not committed_only]

    def info(self, tag: str) -> CheckpointInfo:
        """Details of one tag (``"latest"`` allowed); raises TagNotFoundError."""
        tag = self._existing(tag)
        return self._info(self.root / tag, self._resolve_latest(warn=False))

    def latest(self) -> str | None:
        """The tag ``latest`` names if it is committed; else the newest committed tag, with a warning."""
        return self._resolve_latest(warn=True)

    def _resolve_latest(self, *, warn: bool) -> str | None:
        named = self._latest_named()
        reason = None
        if named is None:
            reason = "is missing"
        elif not named:
            reason = "is empty (torn write?)"
        else:
            try:
                if read_manifest(self.root / validate_tag(named)) is not None:
                    return named
                reason = f"names {named!r}, which is not committed"
            except (ValueError, ManifestError, OSError):
                reason = f"holds {named[:60]!r}, which is not a committed tag"
        committed = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.is_dir() and not entry.name.startswith("."):
                    with contextlib.suppress(ValueError, ManifestError, OSError):
                        validate_tag(entry.name)
                        m = read_manifest(entry)
                        if m is not None:
                            committed.append((m.created, m.tag))
        if not committed:
            return None
        newest = max(committed)[1]
        if warn and named is not None:  # no 'latest' at all is normal for save_latest=False
            warnings.warn(
                f"{self.root / LATEST_NAME} {reason}; using the newest committed tag {newest!r}",
                LatestFallbackWarning,
                stacklevel=3,
            )
        return newest

    def _existing(self, tag: str | None) -> str:
        if tag is None or tag == LATEST_NAME:
            resolved = self.latest()
            if resolved is None:
                raise TagNotFoundError(f"no committed checkpoint in {self.root}; save one first")
            return resolved
        tag_dir = self.tag_dir(tag)
        if not tag_dir.is_dir():
            known = self.tags()
            close = difflib.get_close_matches(tag, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else (
                f"; known tags: {', '.join(known[-5:])}" if known else "; the root has no checkpoints yet"
            )
            raise TagNotFoundError(f"no checkpoint {tag!r} in {self.root}{hint}")
        return tag

    def deepspeed_latest(self) -> str | None:
        """The tag DeepSpeed's own ``latest`` file names, if DeepSpeed's own engine wrote that tag.

        :meth:`latest` resolves to committed tags only; on a root that only DeepSpeed's own engine
        wrote there is none, and this is what ``latest`` means to its user.
        """
        try:
            tag = validate_tag((self.root / LATEST_NAME).read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        return tag if origin(self.root / tag) == "deepspeed" else None

    def lookup(self, tag: str | None = LATEST_NAME) -> tuple[str, str | None]:
        """The tag a user means when showing or checking one (``info``, ``verify``): ``tag``, or for
        ``latest``/None on a root with no committed tag, the one DeepSpeed's own ``latest`` names,
        with a note saying so (None otherwise). An empty tag is refused."""
        if tag is not None and not tag.strip():
            raise InvalidTagError(f"tag {tag!r} is empty; give a tag or 'latest'")
        if tag in (None, LATEST_NAME) and not self.tags(committed_only=True):
            named = self.deepspeed_latest()
            if named is not None:
                return named, f"`latest` is {named}, written by DeepSpeed's own engine (no manifest)"
        return tag or LATEST_NAME, None

    def resolve(self, tag: str | None = LATEST_NAME, *, allow_incomplete: bool = False) -> str:
        """The tag to load: ``latest``/None resolved, existence checked, completeness enforced."""
        return self._resolved(tag, allow_incomplete=allow_incomplete)[0]

    def _resolved(self, tag: str | None, *, allow_incomplete: bool) -> tuple[str, Manifest | None]:
        """:meth:`resolve`, and the tag's manifest (read once)."""
        tag = self._existing(tag)
        manifest = read_manifest(self.root / tag)
        if manifest is None and not allow_incomplete:
            raise IncompleteCheckpointError(
                f"checkpoint {tag!r} in {self.root} is incomplete (no {MANIFEST_NAME}: never committed, "
                "or written without torchckpt); commit it, adopt it with `torchckpt adopt`, "
                "or load with allow_incomplete=True"
            )
        return tag, manifest

    def manifest(self, tag: str) -> Manifest:
        manifest = self._resolved(tag, allow_incomplete=False)[1]
        assert manifest is not None  # _resolved checked
        return manifest

    def verify_all(self, tags: Iterable[str] | None = None) -> builtins.list[VerifyReport]:
        """:meth:`verify` for each of ``tags`` (default: every tag under the root), never raising
        for one tag: a tag being written is skipped (``skipped`` says why), one DeepSpeed's own engine
        wrote has no checksums to verify against (a problem naming ``torchckpt adopt``), an
        incomplete or unreadable one is a problem."""
        infos = self.list() if tags is None else [self.info(t) for t in tags]
        reports = []
        for info in infos:
            if info.in_flight:
                reports.append(VerifyReport(info.tag, 0, skipped="being written now; verify it after its commit"))
            elif not info.committed and not info.problem and origin(info.path) == "deepspeed":
                reports.append(VerifyReport(info.tag, 0, [
                    "no manifest: written by DeepSpeed's own engine, so there are no checksums to verify "
                    f"against; adopt it first: torchckpt adopt {self.root} {info.tag}"]))
            else:
                reports.append(self.verify(info.tag))
        return reports

    def verify(self, tag: str) -> VerifyReport:
        """Recompute every checksum of a committed tag; report each missing or mismatching file."""
        tag = self._existing(tag)
        tag_dir = self.root / tag
        try:
            manifest = read_manifest(tag_dir)
        except ManifestError as e:
            return VerifyReport(tag, 0, [f"{MANIFEST_NAME}: {e}"])
        if manifest is None:
            return VerifyReport(tag, 0, [f"{MANIFEST_NAME}: missing - the tag was never committed"])
        problems = [p for rec in manifest.files.values() if (p := _check_file(tag_dir, rec))]
        return VerifyReport(tag, len(manifest.files), problems)

    def load(
        self,
        tag: str | None,
        relpath: str,
        *,
        map_location: serialization.MapLocation = None,
        verify: bool = True,
        allow: serialization.Allow = (),
        trusted: bool = False,
        allow_incomplete: bool = False,
        mmap: bool = True,
    ) -> Any:
        """Load one file of a tag, checking it against the manifest (``verify``): :meth:`load_files`
        of one file."""
        return self.load_files(tag, [relpath], map_location=map_location, verify=verify, allow=allow,
                               trusted=trusted, allow_incomplete=allow_incomplete, mmap=mmap)[relpath]

    def load_files(
        self,
        tag: str | None,
        relpaths: Iterable[str],
        *,
        map_location: serialization.MapLocation = None,
        verify: bool = True,
        allow: serialization.Allow = (),
        trusted: bool = False,
        allow_incomplete: bool = False,
        mmap: bool = True,
        on_loaded: Callable[[str], None] | None = None,
        while_verifying: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Load files of one tag, each checked against the manifest's size and checksum (``verify``).

        Nothing is returned unless every file matches. Files of at least :data:`OVERLAP_BYTES` in
        all are hashed on other threads while this one unpickles them (hashing releases the GIL;
        the unpickling is the weights-only one, built for untrusted bytes): a file that fails to
        load and to match is reported as corrupt. With ``trusted=True`` (``weights_only=False``:
        pickled code runs) every file is checked first. ``on_loaded(relpath)`` follows each file.

        ``while_verifying(loaded)`` runs on this thread once every file is unpickled, while the
        last checksums are still being computed: work that reads what was loaded and changes
        nothing (checking it against the live objects it will restore). Should it raise while a
        file does not match, the mismatch is the error reported.
        """
        try:
            tag, manifest = self._resolved(tag, allow_incomplete=allow_incomplete)
        except ManifestError as e:
            if verify or not allow_incomplete:
                raise ManifestError(f"{e}; to read its files anyway, load with verify=False, "
                                    "allow_incomplete=True") from e
            tag, manifest = self._existing(tag), None
        tag_dir = self.root / tag
        relpaths = list(dict.fromkeys(relpaths))
        records: list[FileRecord] = []
        for relpath in relpaths:
            validate_relpath(relpath)
            if problem := _file_problem(tag_dir, relpath):
                raise CorruptCheckpointError(f"checkpoint {tag!r} cannot be read safely: {relpath}: {problem}")
            if manifest is not None:
                rec = manifest.files.get(relpath)
                if rec is None:
                    raise FileNotInCheckpointError(
                        f"checkpoint {tag!r} has no file {relpath!r}; it has: {', '.join(sorted(manifest.files))}"
                    )
                records.append(rec)
            elif not (tag_dir / relpath).is_file():
                raise FileNotInCheckpointError(f"checkpoint {tag!r} has no file {relpath!r}")

        def corrupt(problems: list[str]) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"checkpoint {tag!r} is corrupt: {'; '.join(problems)}; "
                                          "restore it from a copy, or load with verify=False")

        # trusted=True unpickles with weights_only=False: never before the bytes are known to match
        checks = _Checksums(tag_dir, records if verify else [], overlap=not trusted)
        if not checks.overlapped and (problems := checks.problems()):
            raise corrupt(problems)
        from . import (
            serialization,  # imports torch: not needed to list, verify or delete
        )

        loaded: dict[str, Any] = {}
        try:
            for relpath in relpaths:
                try:
                    loaded[relpath] = serialization.load(tag_dir / relpath, map_location=map_location, allow=allow,
                                                         trusted=trusted, mmap=mmap)
                except Exception as e:
                    if problems := checks.problems(relpath):  # the bytes are damaged: that is the error
                        raise corrupt(problems) from e
                    raise
                if on_loaded is not None:
                    on_loaded(relpath)
            if while_verifying is not None:
                try:
                    while_verifying(loaded)
                except Exception as e:
                    if problems := checks.problems():  # checking damaged bytes failed: the damage is the error
                        raise corrupt(problems) from e
                    raise
            if problems := checks.problems():
                raise corrupt(problems)
        finally:
            checks.join()
        return loaded

    # -- writing -----------------------------------------------------------------------------
    def transaction(
        self,
        tag: str,
        *,
        writer: AsyncWriter | None = None,
        coordinator: Coordinator | None = None,
        on_write: Callable[[int], None] | None = None,
    ) -> Transaction:
        """Begin writing ``tag``: nothing is visible as committed until :meth:`Transaction.commit`.

        ``on_write(nbytes)`` is called as the bytes of the tag's files are written (on the writer
        thread for background writes): progress reports.
        """
        return Transaction(self, tag, writer=writer, coordinator=coordinator, on_write=on_write)

    def set_latest(self, tag: str) -> None:
        """Replace ``latest`` atomically (the caller holds :meth:`lock`)."""
        write_bytes_atomic(self.root / LATEST_NAME, validate_tag(tag).encode())
        fsync_dir(self.root)

    # -- removing ----------------------------------------------------------------------------
    def delete(self, tag: str, *, allow_latest: bool = False) -> None:
        """Remove a tag. Refuses a tag being written, and ``latest`` unless ``allow_latest``."""
        tag = self._existing(tag)
        with self.lock():
            self._delete_locked(tag, allow_latest=allow_latest)

    def delete_all(self, tags: builtins.list[str], *, allow_latest: bool = False) -> builtins.list[str]:
        """Remove several tags, all or nothing: every tag is checked (it exists, nobody is writing
        it, it is not ``latest`` unless ``allow_latest``) before any is removed. Returns them."""
        resolved = list(dict.fromkeys(self._existing(tag) for tag in tags))
        with self.lock():
            for tag in resolved:
                self._check_deletable(tag, allow_latest=allow_latest)
            for tag in resolved:
                self._delete_locked(tag, allow_latest=allow_latest)
        return resolved

    def _check_deletable(self, tag: str, *, allow_latest: bool) -> bool:
        """Raise if ``tag`` may not be removed now; return whether it is ``latest``."""
        if _in_flight(self.root / tag):
            raise CheckpointInUseError(f"checkpoint {tag!r} is being written by another process or save; wait for "
                                       "its commit")
        is_latest = self._resolve_latest(warn=False) == tag
        if is_latest and not allow_latest:
            raise CheckpointInUseError(
                f"checkpoint {tag!r} is 'latest'; pass allow_latest=True (or --force) to remove it anyway"
            )
        return is_latest

    def _delete_locked(self, tag: str, *, allow_latest: bool) -> None:
        tag_dir = self.root / tag
        is_latest = self._check_deletable(tag, allow_latest=allow_latest)
        # Un-commit first, durably: a crash mid-removal leaves an incomplete tag, never a torn committed one.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tag_dir / MANIFEST_NAME)
            fsync_dir(tag_dir)
        trash = self.root / f"{TRASH_PREFIX}{tag}-{uuid.uuid4().hex[:8]}"
        os.rename(tag_dir, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        if is_latest:
            successor = self._resolve_latest(warn=False)
            if successor is not None:
                self.set_latest(successor)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / LATEST_NAME)
        logger.info("removed checkpoint %s from %s", tag, self.root)

    def gc(self, *, keep_last: int | None = None, dry_run: bool = False) -> GcPlan:
        """Remove leftovers of crashes and, with ``keep_last``, old committed tags.

        Removes incomplete tags nobody is writing, temporary files of dead writers and
        half-deleted directories. With ``keep_last=N`` it also removes committed tags older
        than the newest N. Never removes ``latest``, a tag being written, or a directory
        torchckpt did not start (DeepSpeed's own engine's checkpoints: no manifest, no
        bookkeeping file; ``torchckpt adopt`` brings them under gc).
        """
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise InvalidArgumentError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        with self.lock():
            infos = self.list()
            latest = self._resolve_latest(warn=False)
            # Only tags torchckpt started: DeepSpeed's own engine's checkpoints (no manifest, no
            # bookkeeping of ours) are not leftovers; `torchckpt adopt` brings them under gc.
            # A tag whose manifest is unreadable was committed once: it is kept for a human to look at.
            incomplete = [
                i.tag for i in infos if not i.committed and not i.in_flight and not i.problem and not _foreign(i.path)
            ]
            committed = [i for i in infos if i.committed and not i.in_flight]
            doomed: list[str] = []
            if keep_last is not None:
                newest = {i.tag for i in sorted(committed, key=lambda i: i.created)[-keep_last:]}
                doomed = [i.tag for i in committed if i.tag not in newest and i.tag != latest]
            leftovers = [p for p in self.root.iterdir() if p.name.startswith(TRASH_PREFIX) or is_tmp_name(p.name)]
            for info in infos:
                if not info.in_flight and info.tag not in incomplete:
                    listed = set(info.manifest.files) if info.manifest else set()
                    leftovers += [
                        p
                        for p in info.path.rglob(".*")
                        if is_tmp_name(p.name) and p.relative_to(info.path).as_posix() not in listed
                    ]
            kept = [i.tag for i in infos if i.tag not in doomed and i.tag not in incomplete]
            if not dry_run:
                for tag in doomed + incomplete:
                    self._delete_locked(tag, allow_latest=False)
                for path in leftovers:
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
        return GcPlan(committed=doomed, incomplete=incomplete, leftovers=leftovers, kept=kept, dry_run=dry_run)


def _bytes_on_disk(tag_dir: Path) -> int:
    """Bytes of the regular files under a tag directory that a writer may be changing right now."""
    total = 0
    for path in tag_dir.rglob("*"):
        try:
            st = path.lstat()
        except FileNotFoundError:  # a temporary file renamed, or a tag removed, while we looked
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def _describe(e: Exception) -> str:
    """An error as one rank reports it to the others: without the ``[Errno N]`` prefix."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def _foreign(tag_dir: Path) -> bool:
    """Files that torchckpt did not start writing (DeepSpeed's own engine's checkpoints)."""
    return origin(tag_dir) != "torchckpt" and any(tag_dir.iterdir())


def _file_problem(tag_dir: Path, relpath: str) -> str | None:
    """Why reading ``relpath`` is refused: it leads outside ``tag_dir`` through a symbolic link,
    or is not a regular file (a FIFO would block forever). None when it is safe, or missing."""
    path = tag_dir / relpath
    try:
        real = path.resolve(strict=True)
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return None  # the caller reports it missing
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        return f"unreadable ({getattr(e, 'strerror', None) or e})"
    if not real.is_relative_to(tag_dir.resolve()):
        return "leads outside the tag directory (a symbolic link); refusing to read it"
    if not stat.S_ISREG(mode):
        return "is not a regular file; refusing to read it"
    return None


#: Files of at least this many bytes in all are hashed while they are unpickled (on other threads).
OVERLAP_BYTES = 4 << 20


class _Checksums:
    """:func:`_check_file` of each record: at once on this thread for small files, else on up to
    four other threads (one fewer than the CPUs), which start now. ``problems(relpath)`` waits
    for that file's, ``problems()`` for every file's."""

    def __init__(self, tag_dir: Path, records: list[FileRecord], *, overlap: bool = True):
        self._tag_dir = tag_dir
        self._results: dict[str, str | None] = {}
        self._done = {rec.path: threading.Event() for rec in records}
        self.overlapped = overlap and sum(rec.size for rec in records) >= OVERLAP_BYTES
        self._threads: list[threading.Thread] = []
        if not self.overlapped:
            for rec in records:
                self._check(rec)
            return
        queue = collections.deque(records)

        def work() -> None:
            while True:
                try:
                    rec = queue.popleft()
                except IndexError:
                    return
                self._check(rec)

        count = min(len(records), 4, max(1, (os.cpu_count() or 2) - 1))
        self._threads = [threading.Thread(target=work, name="torchckpt-verify", daemon=True) for _ in range(count)]
        for t in self._threads:
            t.start()

    def _check(self, rec: FileRecord) -> None:
        try:
            self._results[rec.path] = _check_file(self._tag_dir, rec)
        except Exception as e:  # noqa: BLE001 - reported as the file's problem
            self._results[rec.path] = f"{rec.path}: unreadable ({_describe(e)})"
        finally:
            self._done[rec.path].set()

    def problems(self, relpath: str | None = None) -> list[str]:
        paths = list(self._done) if relpath is None else [relpath] if relpath in self._done else []
        for path in paths:
            self._done[path].wait()
        return [p for path in paths if (p := self._results[path])]

    def join(self) -> None:
        for t in self._threads:
            t.join()


def _check_file(tag_dir: Path, rec: FileRecord) -> str | None:
    path = tag_dir / rec.path
    if problem := _file_problem(tag_dir, rec.path):
        return f"{rec.path}: {problem}"
    try:
        size, checksum = checksum_file(path)
    except FileNotFoundError:
        return f"{rec.path}: missing"
    except OSError as e:
        return f"{rec.path}: unreadable ({e.strerror})"
    if size != rec.size:
        return f"{rec.path}: size {size} bytes, manifest says {rec.size} (truncated or replaced)"
    if checksum != rec.checksum:
        return f"{rec.path}: checksum mismatch (bytes changed since commit)"
    return None


def scan_files(tag_dir: Path) -> list[str]:
    """Relative paths of the data files in a tag directory (bookkeeping and temporaries excluded)."""
    found = []
    for path in tag_dir.rglob("*"):
        rel = path.relative_to(tag_dir).as_posix()
        data = path.is_file() and not path.is_symlink() and not is_tmp_name(path.name) and path.name != MANIFEST_NAME
        if data and not rel.split("/")[0].startswith(RESERVED_PREFIX):
            found.append(rel)
    return sorted(found)


_warned_unverified: set[Path] = set()


def load_unmanaged(
    path: str | os.PathLike,
    *,
    map_location: serialization.MapLocation = None,
    allow: serialization.Allow = (),
    trusted: bool = False,
    allow_incomplete: bool = False,
    mmap: bool = True,
) -> Any:
    """Load a file that no manifest covers: one DeepSpeed's own engine wrote, or a bare file.

    Refuses a file in a tag directory torchckpt began and never committed (that is what a crash
    mid-save leaves: ``IncompleteCheckpointError``, unless ``allow_incomplete``), a symbolic link out of its
    directory and anything but a regular file; checks a zip file for tears (its central directory, and every
    record's CRC-32); then loads it weights-only (``allow``/``trusted`` as :meth:`CheckpointStore.load`),
    warning once per directory (:class:`UnverifiedLoadWarning`) that nothing verified its bytes
    and how to adopt it.
    """
    path = Path(path).absolute()
    folder = path.parent
    if not allow_incomplete and started_by_torchckpt(folder):
        raise IncompleteCheckpointError(
            f"{folder} is a checkpoint torchckpt began writing and never committed (no {MANIFEST_NAME}): "
            "a save that was interrupted; load another tag, or pass allow_incomplete=True to read it anyway"
        )
    if problem := _file_problem(folder, path.name):
        raise CorruptCheckpointError(f"{path} cannot be read safely: {problem}")
    if not path.is_file():
        raise FileNotInCheckpointError(errno.ENOENT, f"no checkpoint file {path}", str(path))
    if problem := torn_zip_problem(path):
        raise CorruptCheckpointError(
            f"{path} is torn: {problem} (written by a save that did not finish, or damaged since); "
            "load an older checkpoint"
        )
    if folder not in _warned_unverified:
        _warned_unverified.add(folder)
        warnings.warn(
            UnverifiedLoadWarning(
                f"loading {folder} without a manifest (not written by torchckpt): weights-only and checked "
                f"for tears, but nothing to verify its bytes against; `torchckpt adopt {folder.parent} "
                f"{folder.name}` records checksums for it"
            ),
            stacklevel=3,
        )
    from . import serialization

    return serialization.load(path, map_location=map_location, allow=allow, trusted=trusted, mmap=mmap)


def torn_zip_problem(path: Path, *, chunk: int = 16 << 20) -> str | None:
    """Why a zip file (torch.save's format) is torn, or None: its central directory must be readable
    and every record's CRC-32 must match (records that carry none, as torchckpt's own, are skipped).
    Files of other formats are left to their loader, which fails on a truncated stream."""
    import zipfile

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return None
    except OSError as e:
        return f"unreadable ({e.strerror})"
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0 and info.file_size:
                    continue
                with zf.open(info) as member:
                    while member.read(chunk):
                        pass
    except zipfile.BadZipFile as e:
        return str(e)
    except (OSError, EOFError, ValueError) as e:  # UnicodeDecodeError: a damaged record header
        return f"damaged zip structure ({type(e).__name__}: {e})"
    return None


class Transaction:
    """Writes one tag: files are atomic and durable; the manifest is written last, at commit.

    Use as a context manager: leaving the block without :meth:`commit` aborts (the tag stays
    incomplete, temporary files are removed).
    """

    def __init__(self, store: CheckpointStore, tag: str, *, writer=None, coordinator=None, on_write=None):
        self.store = store
        self.tag = validate_tag(tag)
        self.dir = store.root / self.tag
        self.writer = writer
        self.on_write: Callable[[int], None] | None = on_write
        self.coordinator: Coordinator = coordinator or LocalCoordinator()
        self._records: dict[str, FileRecord] = {}
        self._pending: list[Any] = []
        self._failed: list[WriteError] = []  # deferred write failures (many ranks)
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        self.committed: Manifest | None = None
        self._begin()

    def _begin(self) -> None:
        # Under the root lock, where gc and delete decide what is in flight: they either remove
        # an old directory of this tag before we start, or see us writing it - never remove it
        # from under us.
        with self.store.lock():
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / WRITING_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                # One process per tag: two kernels saving the same tag would interleave files and
                # manifests (the ranks of one multi-rank save share the tag). Retried: a probe of
                # another thread or process holds the lock for an instant.
                if self.coordinator.world_size == 1 and not _lock_exclusive(fd):
                    raise CheckpointInUseError(
                        f"checkpoint {self.tag!r} in {self.store.root} is being written by another process "
                        "or save; wait for its commit, or save under another tag"
                    ) from None
                fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
            if (self.dir / MANIFEST_NAME).exists() and self.coordinator.rank == 0:
                # Re-saving a committed tag: un-commit it first, so no reader trusts a manifest
                # whose files are being replaced.
                logger.warning("overwriting committed checkpoint %s: it is incomplete until committed again", self.tag)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / MANIFEST_NAME)
                fsync_dir(self.dir)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed is None:
            self.abort()

    def relpath(self, path: str | os.PathLike) -> str:
        """The path of ``path`` relative to the tag directory (it must lie inside it)."""
        p = Path(path)
        if p.is_absolute():
            try:
                rel = p.resolve().relative_to(self.dir.resolve()).as_posix()
            except ValueError:
                raise InvalidArgumentError(f"{p} is not inside the tag directory {self.dir}") from None
        else:
            rel = p.as_posix()
        return validate_relpath(rel)

    def write(self, relpath: str, obj: Any) -> None:
        """Save ``obj`` as ``relpath`` (torch.save format): atomically, or in the background.

        On many ranks a failed write is raised by :meth:`commit`, on every rank, not here:
        raising on one rank alone would leave the others waiting for it at the commit.
        """
        relpath = self.relpath(relpath)
        if self.coordinator.world_size == 1:
            self._write(relpath, obj)
            return
        try:
            self._write(relpath, obj)
        except Exception as e:  # noqa: BLE001 - raised on every rank by commit()
            logger.error("rank %d: writing %s failed: %s", self.coordinator.rank, relpath, e)
            text = _describe(e)
            message = text if relpath in text else f"writing {relpath} failed: {text}"
            code = getattr(e, "errno", None)
            self._failed.append(WriteError(message) if code is None else WriteError(code, message))

    def _write(self, relpath: str, obj: Any) -> None:
        final = self.dir / relpath
        if not final.parent.resolve().is_relative_to(self.dir.resolve()):
            raise UnsafePathError(f"{relpath!r} leads outside the tag directory {self.dir} (a symbolic link); not "
                                "written")
        final.parent.mkdir(parents=True, exist_ok=True)
        if self.writer is not None:
            self._pending.append(self.writer.submit(final, obj, on_done=lambda w, r=relpath: self._record(r, w),
                                                    on_write=self.on_write))
            return
        from . import serialization

        with atomic_writer(final, on_write=self.on_write) as stream:
            serialization.save(obj, stream)
        self._record(relpath, stream.result)

    def link(self, relpath: str, candidate) -> str | None:
        """Make ``relpath`` the same file as a committed file of the root (``dedup.Candidate``):
        a hard link (or copy) through the same atomic path as :meth:`write`, recorded with the
        candidate's size and checksum. Returns ``"linked"``/``"copied"``, or None when the
        candidate cannot be used (then write the object instead). See :mod:`torchckpt.dedup`."""
        from ._fileio import WrittenFile
        from .dedup import place

        relpath = self.relpath(relpath)
        final = self.dir / relpath
        if not final.parent.resolve().is_relative_to(self.dir.resolve()):
            raise UnsafePathError(f"{relpath!r} leads outside the tag directory {self.dir} (a symbolic link); "
                                  "not written")
        final.parent.mkdir(parents=True, exist_ok=True)
        how = place(final, candidate)
        if how is not None:
            rec = candidate.record
            self._record(relpath, WrittenFile(final, rec.size, rec.checksum))
        return how

    def record_of(self, relpath: str) -> FileRecord | None:
        """The size and checksum of a file this process wrote (synchronously) into the tag."""
        with self._mutex:
            return self._records.get(relpath)

    def _record(self, relpath: str, written) -> None:
        with self._mutex:
            self._records[relpath] = FileRecord(relpath, written.size, written.checksum, self.coordinator.rank)

    def wait(self) -> None:
        """Wait for background writes of this tag; raise the first failure, naming its file."""
        pending, self._pending = self._pending, []
        errors = []
        for handle in pending:
            try:
                handle.result()
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                errors.append(e)
        if errors:
            first = errors[0]
            if isinstance(first, WriteError):
                raise first
            raise WriteError(getattr(first, "errno", None), f"background write failed: {first}") from first

    def commit(self, *, metadata: dict[str, Any] | None = None, save_latest: bool = True) -> Manifest:
        """Make the tag complete: wait for writes, fsync, write the manifest, replace ``latest``.

        On many ranks every rank calls this; it fails on every rank, naming the rank and the
        file, if any rank's writes failed.
        """
        metadata = check_metadata(metadata)
        co = self.coordinator
        local: Exception | None = None
        try:
            self.wait()
            if self._failed:
                raise self._failed[0]
            self._fsync_dirs()
            if co.world_size > 1:
                self._write_rank_part()
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            local = e
        self._raise_if_any(local, "not committed", step="write")

        manifest, local = None, None
        if co.rank == 0:
            try:
                manifest = self._write_manifest(metadata, save_latest=save_latest)
            except Exception as e:  # noqa: BLE001
                local = e
        self._raise_if_any(local, "the manifest could not be written", step="commit")
        self._release()
        self.committed = manifest or Manifest(self.tag, time.time(), dict(self._records), co.world_size)
        logger.info("committed checkpoint %s in %s", self.tag, self.store.root)
        return self.committed

    def _raise_if_any(self, local: Exception | None, what: str, *, step: str) -> None:
        """Tell every rank this rank's outcome at ``step``; if any rank failed, abort and raise."""
        errors = self.coordinator.gather_errors(_describe(local) if local is not None else None, step=step)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if not failed:
            return
        self.abort()
        if len(errors) == 1 and isinstance(local, TorchckptError):
            raise local  # one process: the original, already explicit error (WriteError, StoreLockedError...)
        detail = "; ".join(f"rank {r}: {e}" if len(errors) > 1 else e for r, e in failed)
        raise CommitError(f"checkpoint {self.tag!r} {what}: {detail}; the previous checkpoint is intact",
                          failures={r: e for r, e in failed if e}, step=step) from local

    def _fsync_dirs(self) -> None:
        dirs = {self.dir} | {(self.dir / r).parent for r in self._records}
        for d in sorted(dirs):
            fsync_dir(d)

    def _write_rank_part(self) -> None:
        import json
        from dataclasses import asdict

        part = {"rank": self.coordinator.rank, "files": [asdict(r) for r in self._records.values()]}
        write_bytes_atomic(self.dir / rank_part_name(self.coordinator.rank), json.dumps(part).encode())
        fsync_dir(self.dir)

    def _gather_records(self) -> dict[str, FileRecord]:
        import json

        records = dict(self._records)
        for rank in range(1, self.coordinator.world_size):
            part_path = self.dir / rank_part_name(rank)
            try:
                part = json.loads(part_path.read_text())
            except (OSError, ValueError) as e:
                why = f"its file list {part_path.name} is missing or unreadable: {e}"
                raise CommitError(f"rank {rank}'s file list {part_path.name} is missing or unreadable: {e}",
                                  failures={rank: why}, step="commit") from e
            for entry in part["files"]:
                rec = FileRecord(**entry)
                prior = records.setdefault(rec.path, rec)
                if prior.checksum != rec.checksum:
                    raise CommitError(
                        f"{rec.path} was written by rank {prior.rank} and by rank {rec.rank} with different "
                        "contents; only one rank may write each file (DeepSpeed: is_data_parallel_writer)"
                    )
        # Files DeepSpeed put into the tag without the engine (e.g. NVMe offload copies).
        for rel in scan_files(self.dir):
            if rel not in records:
                size, checksum = checksum_file(self.dir / rel)
                records[rel] = FileRecord(rel, size, checksum, None)
        return records

    def _write_manifest(self, metadata: dict[str, Any], *, save_latest: bool) -> Manifest:
        with self.store.lock():
            manifest = Manifest(
                tag=self.tag,
                created=time.time(),
                files=dict(sorted(self._gather_records().items())),
                world_size=self.coordinator.world_size,
                versions=current_versions(),
                metadata=metadata,
            )
            write_manifest(self.dir, manifest)
            if save_latest:
                try:
                    self.store.set_latest(self.tag)
                except BaseException:
                    # The caller is told the commit failed (disk full while writing `latest`),
                    # so it must not have happened: un-commit, durably.
                    with contextlib.suppress(OSError):
                        os.unlink(self.dir / MANIFEST_NAME)
                        fsync_dir(self.dir)
                    raise
        for rank in range(self.coordinator.world_size):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / rank_part_name(rank))
        return manifest

    def abort(self) -> None:
        """Give up: wait for (and ignore) background writes, leave the tag incomplete."""
        for handle in self._pending:
            with contextlib.suppress(Exception):
                handle.result()
        self._pending = []
        self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
