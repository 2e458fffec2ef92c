"""The notebook API: save and restore the live objects of a namespace, by tag.

:class:`Checkpointer` is what ``%ckpt`` and the panel call; anything either can do, this class
can do. One tag holds one file per saved object (``objects/<name>.pt``) and ``rng.pt``; the
manifest's metadata records each object's kind, the step, metrics and a note::

    ROOT/TAG/objects/model.pt      model.state_dict()
    ROOT/TAG/objects/opt.pt        opt.state_dict()
    ROOT/TAG/objects/step.pt       a plain value
    ROOT/TAG/rng.pt                Python, NumPy, torch CPU and CUDA generator states
    ROOT/TAG/mp_rank_00_*.pt       a DeepSpeed engine's own files (engine.save_checkpoint)
    ROOT/TAG/torchckpt-manifest.json
        metadata: {"format": "torchckpt-notebook/1", "step": 100, "metrics": {...}, "note": ...,
                   "objects": {"model": {"kind": "module", "file": "objects/model.pt",
                                         "type": "torch.nn.modules.linear.Linear"}, ...},
                   "rng": "rng.pt"}

Loading reads only the files of the objects asked for, each verified against the manifest and
loaded weights-only; then every object is checked against its saved state before any is
changed (see :mod:`torchckpt.state`).
"""

from __future__ import annotations

import builtins
import contextlib
import difflib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import dedup, state
from .errors import (
    CheckpointInUseError,
    ClosedError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    NotCheckpointableError,
    ObjectNotFoundError,
    RestoreError,
    TagExistsError,
    TorchckptError,
)
from .layout import RNG_FILE, object_file
from .lineage import PARENT_KEY, LineageLog, build_log, check_parent, parent_of
from .manifest import check_metadata, validate_tag
from .options import CheckpointOptions
from .results import (
    LoadedObject,
    LoadResult,
    RemoveResult,
    SavedObject,
    SaveResult,
    TagDetails,
    TagList,
    VerifyResult,
    _objects_of,
)
from .store import CheckpointInfo, CheckpointStore, GcPlan, Transaction

if TYPE_CHECKING:
    from .async_writer import AsyncWriter
    from .dedup import Candidates
    from .diff import CheckpointDiff
    from .pending import PendingSave
    from .plots import DiffPlot, MetricPlot

logger = logging.getLogger(__name__)

FORMAT = "torchckpt-notebook/1"
#: Saves and loads of at least this many bytes show a progress bar when ``progress=None``
#: (``CheckpointOptions.progress_min_bytes``' default).
PROGRESS_MIN_BYTES = CheckpointOptions.progress_min_bytes
_UNSET: Any = object()
#: save()'s default parent: the Checkpointer's head.
_HEAD = object()


# -- progress -----------------------------------------------------------------------------------
class _Progress:
    """A tqdm.auto bar (or a callback) over bytes; silent for small work."""

    def __init__(self, progress: Any, total: int, desc: str, min_bytes: int):
        self.total, self.done = total, 0
        self.callback = progress if callable(progress) else None
        self.bar = None
        if self.callback is None and (progress is True or (progress is None and total >= min_bytes)):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the checkpointer ---------------------------------------------------------------------------
@dataclass
class _Pending:
    tx: Transaction
    metadata: dict[str, Any]
    result: SaveResult
    started: float
    future: Future | None = None  # an async save's background work: its commit, or (commit=False) its writes
    handle: PendingSave | None = None  # what the async save returned, over ``future``

    @property
    def commits(self) -> bool:
        """An async save that commits in the background once written."""
        return self.handle is not None and self.handle.commits


class Checkpointer:
    """Saves and restores the live objects of a notebook under one checkpoint root.

    Args:
        root: the checkpoint root (created on first save).
        options: the settings (:class:`~torchckpt.options.CheckpointOptions`: lock timeout,
            progress threshold, ``auto_max_bytes``, async memory cap and pinning, the panel's
            poll interval, linked re-saves); assign :attr:`options` to change them later.
        progress_min_bytes, auto_max_bytes, dedup: the options of those names, over ``options``.

    Example:
        >>> ckpt = Checkpointer("checkpoints")
        >>> ckpt.save("warmup", {"model": model, "opt": opt}, metrics={"loss": 0.31})
        >>> ckpt.load("warmup", globals())              # restores model, opt and the RNGs in place
        >>> ckpt.diff("warmup", "latest")
    """

    def __init__(self, root: str | os.PathLike, *, options: CheckpointOptions | None = None,
                 progress_min_bytes: int = _UNSET, auto_max_bytes: int | None = _UNSET, dedup: bool = _UNSET):
        options = _checked_options(options)
        given: dict[str, Any] = {"progress_min_bytes": progress_min_bytes, "auto_max_bytes": auto_max_bytes,
                                 "dedup": dedup}
        given = {k: v for k, v in given.items() if v is not _UNSET}
        if given:
            options = replace(options, **given)  # validated again
        self.store = CheckpointStore(root, lock_timeout=options.lock_timeout)
        self._options = options
        self._pending: dict[str, _Pending] = {}
        self._finished: list[SaveResult] = []
        self._failed: dict[str, SaveResult] = {}
        self._lock = threading.RLock()
        self._writer: AsyncWriter | None = None
        self._committer: ThreadPoolExecutor | None = None
        self._closed = False
        #: The tag the namespace's objects were last loaded from or saved to: the next save's parent.
        self.head: str | None = None

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def options(self) -> CheckpointOptions:
        """The settings; assigning new ones applies them from the next operation on (the lock
        timeout, the async writer's memory cap and pinning included)."""
        return self._options

    @options.setter
    def options(self, options: CheckpointOptions) -> None:
        options = _checked_options(options)
        self._options = options
        self.store.lock_timeout = options.lock_timeout
        if self._writer is not None:
            self._writer.max_inflight_bytes = options.max_inflight_bytes
            self._writer.pin_memory = options.pin_memory

    @property
    def progress_min_bytes(self) -> int:
        return self._options.progress_min_bytes

    @progress_min_bytes.setter
    def progress_min_bytes(self, value: int) -> None:
        self.options = replace(self._options, progress_min_bytes=value)

    @property
    def dedup(self) -> bool:
        """Share files identical to a committed file of the root as hard links (see :mod:`torchckpt.dedup`)."""
        return self._options.dedup

    @dedup.setter
    def dedup(self, value: bool) -> None:
        self.options = replace(self._options, dedup=value)

    @property
    def auto_max_bytes(self) -> int | None:
        return self._options.auto_max_bytes

    @auto_max_bytes.setter
    def auto_max_bytes(self, value: int | None) -> None:
        self.options = replace(self._options, auto_max_bytes=value)

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.root)!r})"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self!r} is closed; create a new Checkpointer")

    # -- discovery ---------------------------------------------------------------------------
    def checkpointable(self, namespace: Mapping[str, Any]) -> dict[str, Any]:
        """The objects a save with no names includes: see :func:`torchckpt.state.discover`."""
        return self.discover(namespace)[0]

    def discover(self, namespace: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """``(objects, left_out)``: what a save with no names includes, and name -> why each other
        object was left out (see :func:`torchckpt.state.discover`). Pass ``left_out`` to
        :meth:`save` so that its result says so."""
        return state.discover(namespace, max_bytes=self.auto_max_bytes)

    def kinds(self, objects: Mapping[str, Any]) -> dict[str, str]:
        """name -> kind for each object; raises NotCheckpointableError for the first that is not."""
        return {name: state.require_kind(name, obj) for name, obj in objects.items()}

    def default_tag(self, step: int | None = None) -> str:
        """``step-<step>`` when the step is known, else ``ckpt-<YYYYmmdd-HHMMSS>`` (local time);
        ``-2``, ``-3``… is appended if that tag exists."""
        base = f"step-{step}" if step is not None else time.strftime("ckpt-%Y%m%d-%H%M%S")
        tag, n = base, 1
        while (self.root / tag).exists() or tag in self._pending:
            n += 1
            tag = f"{base}-{n}"
        return tag

    # -- saving ------------------------------------------------------------------------------
    def save_namespace(
        self,
        tag: str | None,
        namespace: Mapping[str, Any],
        names: Iterable[str] | None = None,
        *,
        step: int | None = None,
        **options: Any,
    ) -> SaveResult | PendingSave:
        """Save from a namespace, as ``%ckpt save`` and the panel's Save do: the variables
        ``names`` (each must exist), or with no names every checkpointable object
        (:meth:`discover`: what it leaves out, and why, is in the result's notes). ``step`` is
        inferred from the namespace (a ``step``/``global_step``... variable) when not given.
        Every other keyword goes to :meth:`save`.

        Raises:
            ObjectNotFoundError: a name is not in the namespace (the message offers close names).
            NotCheckpointableError: no name given and nothing checkpointable found.
        """
        left_out: dict[str, str] = {}
        if names:
            names = list(names)
            missing = [n for n in names if n not in namespace]
            if missing:
                close = difflib.get_close_matches(missing[0], list(namespace), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ObjectNotFoundError(f"no variable {missing[0]!r} in the notebook{hint}")
            objects = {n: namespace[n] for n in names}
        else:
            objects, left_out = self.discover(namespace)
            if not objects:
                why = f" ({'; '.join(f'{n}: {w}' for n, w in left_out.items())})" if left_out else ""
                raise NotCheckpointableError("nothing to save: the notebook has no modules, optimizers, tensors or "
                                             f"other checkpointable objects yet{why}")
        if step is None:
            step = state.infer_step(namespace)
        return self.save(tag, objects, step=step, left_out=left_out, **options)

    def save(
        self,
        tag: str | None,
        objects: Mapping[str, Any],
        *,
        async_save: bool = False,
        commit: bool = True,
        note: str | None = None,
        metrics: dict | None = None,
        step: int | None = None,
        progress: bool | Callable[[int, int], None] | None = None,
        overwrite: bool = False,
        left_out: Mapping[str, str] | None = None,
        parent: str | None | object = _HEAD,
    ) -> SaveResult | PendingSave:
        """Save ``objects`` (name -> live object) as ``tag``, with the RNG states.

        Args:
            tag: the tag; None picks :meth:`default_tag`. An incomplete tag (a failed or
                abandoned save) is replaced; a committed one only with ``overwrite=True``.
            objects: modules, optimizers, schedulers, GradScalers, any ``Stateful``, tensors,
                NumPy arrays, torch Generators, plain values, DeepSpeed engines.
            async_save: copy tensors to host buffers now, write them in the background.
            commit: commit when written (async: in the background). With False the tag stays
                uncommitted until :meth:`commit`.
            note, metrics, step: recorded in the manifest's metadata.
            progress: True/False for a progress bar, None for one when the save is large, or a
                callable ``(done_bytes, total_bytes)``.
            left_out: name -> reason for objects the caller chose not to save (from
                :meth:`discover`); the result's notes list them.
            parent: the tag this save branches from, recorded in the metadata (default:
                :attr:`head`, the tag last loaded or saved here; None: a new root).

        An object whose state is byte-for-byte the one a committed tag of the root holds is not
        written again: the tag gets a hard link to that file (see :mod:`torchckpt.dedup`), and
        the result says so (``linked``, ``notes``).

        Returns:
            A :class:`SaveResult`; for async saves a :class:`~torchckpt.pending.PendingSave`, the
            handle of the background work (``done()``, ``wait()``, ``bytes_written``...), whose
            status is ``committing`` or ``writing`` until it is done. :meth:`poll` also reports
            the outcome, and :meth:`commit` waits for it.

        Raises:
            NotCheckpointableError: an object cannot be saved (nothing was written).
            InvalidTagError, ManifestError: a bad tag or metadata (nothing was written).
            CheckpointInUseError: another process is writing that tag.
            WriteError, CommitError: the disk failed; no file of the tag is visible.
        """
        self._check_open()
        if not objects:
            raise NotCheckpointableError("nothing to save: no objects were given (and none found)")
        kinds = self.kinds(objects)
        step = int(step) if step is not None else None
        metrics = dict(metrics or {})
        if tag is None:
            tag = self.default_tag(step)
        validate_tag(tag)
        parent = check_parent(self.head if parent is _HEAD else parent)
        if parent == tag:  # re-saving the tag itself (overwrite): it keeps its own parent
            parent = self._parent_of(tag)
        files = _file_names(n for n, k in kinds.items() if k != "deepspeed")
        metadata = check_metadata({
            "format": FORMAT, "step": step, "metrics": metrics, "note": note, "rng": RNG_FILE, PARENT_KEY: parent,
            "objects": {name: {"kind": kind, "type": state.type_name(objects[name]), "file": files.get(name)}
                        for name, kind in kinds.items()},
        })
        started = time.perf_counter()
        payloads = {name: state.capture(objects[name], kind) for name, kind in kinds.items() if kind != "deepspeed"}
        for name, payload in payloads.items():
            state.check_picklable(name, payload, objects[name])
        rng = state.capture_rng()  # the generators as of this moment, like every other object
        replaced = self._clear_tag(tag, overwrite=overwrite)
        writer = self._async_writer() if async_save else None
        total = sum(state.payload_bytes(p) for p in payloads.values())
        bar = _Progress(progress, total, f"save {tag}", self.progress_min_bytes)
        handle = None
        if async_save:
            from .pending import PendingSave

            handle = PendingSave(tag, total_bytes=total + state.payload_bytes(rng), commits=commit)
        tx = None
        keys: dict[str, str] = {}
        linked: dict[str, tuple[str, str]] = {}  # name -> (tag, how)
        try:
            candidates = self._candidates(tag) if self.dedup else None
            tx = self.store.transaction(tag, writer=writer, on_write=handle._add_bytes if handle else None)
            for name, kind in kinds.items():
                if kind == "deepspeed":
                    from .deepspeed.notebook import save_engine  # imports DeepSpeed

                    save_engine(objects[name], self.root, tx)
            for name, payload in list(payloads.items()) + [("rng", rng)]:
                file = files.get(name, RNG_FILE)
                if candidates is not None:
                    key = dedup.content_key(payload)
                    if key is not None:
                        keys[file] = key
                        cand = candidates.by_key.get(key)
                        if cand is not None and (how := tx.link(file, cand)):
                            linked[name] = (cand.tag, how)
                            bar.advance(state.payload_bytes(payload) if name in payloads else 0)
                            continue
                if name not in payloads:
                    tx.write(RNG_FILE, rng)
                    continue
                try:
                    tx.write(files[name], payload)
                    if writer is None and (rec := tx.record_of(files[name])) is not None:
                        dedup.confirm(tx.dir / files[name], rec.checksum)  # hashed as it was written
                except TorchckptError:
                    raise
                except Exception as e:
                    raise NotCheckpointableError(
                        f"could not save {name!r} ({state.type_name(objects[name])}): {e}; its state_dict() must "
                        "hold only tensors, plain Python values and containers of them"
                    ) from e
                bar.advance(state.payload_bytes(payload))
            if candidates is not None and writer is None:
                # Written anyway (no key, or a new one) but identical to a committed file: share it.
                for name, file in list(files.items()) + [("rng", RNG_FILE)]:
                    rec = tx.record_of(file) if name not in linked else None
                    cand = candidates.by_sum.get((rec.size, rec.checksum)) if rec is not None else None
                    if cand is not None and (how := tx.link(file, cand)):
                        linked[name] = (cand.tag, how)
        except BaseException:
            bar.close()
            if tx is not None:
                tx.abort()
            self._discard(tag)
            raise
        bar.close()
        saved = [SavedObject(n, k, state.type_name(objects[n]), files.get(n)) for n, k in kinds.items()]
        if keys:
            metadata[dedup.KEYS_FIELD] = keys
        notes = [f"{name}: unchanged since {src}, {how}" for name, (src, how) in linked.items() if name != "rng"]
        notes += [f"left out {name}: {why}" for name, why in (left_out or {}).items()]
        notes += [f"metric {k}={v!r} is text, not a number; kept as text (numbers look like {k}=0.12)"
                  for k, v in metrics.items() if isinstance(v, str)]
        result = SaveResult(tag, self.root, saved, "uncommitted", async_save=async_save, step=step, note=note,
                            metrics=metrics, replaced=replaced, notes=notes, parent=parent,
                            linked={n: src for n, (src, _) in linked.items() if n != "rng"})
        pending = _Pending(tx, metadata, result, started)
        if commit and not async_save:
            committed = self._commit_now(pending)
            self.head = tag
            return committed
        self.head = tag
        if async_save:
            result.status = "committing" if commit else "writing"
        else:
            self._fill_sizes(result, None)
        result.seconds = time.perf_counter() - started
        with self._lock:
            self._pending[tag] = pending
            if handle is not None:
                pending.handle = handle  # before the work starts: it reads pending.commits
                pending.future = self._background().submit(self._finish_async, pending)
                handle._start(replace(result), pending.future)
        return handle if handle is not None else replace(result)

    def _parent_of(self, tag: str) -> str | None:
        """The parent recorded by a committed ``tag`` (None if it has none or is not committed)."""
        with contextlib.suppress(TorchckptError, OSError):
            info = self.store.info(tag)
            if info.committed:
                return parent_of(info.metadata)[0]
        return None

    def _candidates(self, tag: str) -> Candidates | None:
        """The root's committed files a new save of ``tag`` may share (None: sharing is off)."""
        try:
            return dedup.Candidates(self.store.list(), exclude=tag)
        except (TorchckptError, OSError) as e:  # an unreadable root: save without sharing
            logger.warning("not looking for identical files in %s: %s", self.root, e)
            return None

    def log(self, tag: str | None = None) -> LineageLog:
        """The lineage tree of the root (:func:`torchckpt.lineage.build_log`); with ``tag``, only
        its ancestors and descendants."""
        self._check_open()
        return build_log(self.store, tag)

    def _clear_tag(self, tag: str, *, overwrite: bool) -> bool:
        """Make room for a new save of ``tag``; True if a previous one was replaced."""
        if not overwrite and (self.root / tag).is_dir():
            info = self.store.info(tag)
            if info.committed or info.problem:
                raise TagExistsError(
                    f"checkpoint {tag!r} already exists in {self.root}; choose another tag, or save with "
                    "overwrite=True to replace it"
                )
        with self._lock:
            old = self._pending.pop(tag, None)
            self._failed.pop(tag, None)
        if old is not None:
            if old.future is not None:
                with contextlib.suppress(Exception):
                    old.future.result()  # its outcome is superseded by this save
            if not old.commits:
                old.tx.abort()
        if (self.root / tag).is_dir():
            self.store.delete(tag, allow_latest=True)
            return True
        return False

    def _discard(self, tag: str) -> None:
        """Remove what a failed save left (it was never committed)."""
        try:
            if (self.root / tag).is_dir():
                self.store.delete(tag, allow_latest=True)
        except (TorchckptError, OSError) as e:
            logger.warning("could not remove the failed save %s: %s (gc removes it later)", tag, e)

    def _async_writer(self) -> AsyncWriter:
        with self._lock:  # saves from several threads share one writer
            if self._writer is None:
                from .async_writer import AsyncWriter

                self._writer = AsyncWriter(max_inflight_bytes=self._options.max_inflight_bytes,
                                           pin_memory=self._options.pin_memory)
            return self._writer

    def _background(self) -> ThreadPoolExecutor:
        with self._lock:  # one committer: commits run one at a time
            if self._committer is None:
                self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchckpt-commit")
            return self._committer

    def _commit_now(self, pending: _Pending) -> SaveResult:
        tag = pending.result.tag
        try:
            manifest = pending.tx.commit(metadata=pending.metadata)
        except BaseException:
            self._discard(tag)
            raise
        result = replace(pending.result, status="committed", seconds=time.perf_counter() - pending.started)
        self._fill_sizes(result, manifest)
        return result

    def _finish_async(self, pending: _Pending) -> SaveResult:
        """An async save's background work: wait for its writes, then commit (unless it was saved
        with ``commit=False``). Errors stay with the future: the handle, poll and commit report them."""
        if pending.commits:
            return self._commit_now(pending)
        try:
            pending.tx.wait()
        except BaseException:
            pending.tx.abort()
            self._discard(pending.result.tag)
            raise
        result = replace(pending.result, status="uncommitted", seconds=time.perf_counter() - pending.started)
        self._fill_sizes(result, None)
        return result

    def _fill_sizes(self, result: SaveResult, manifest: Any) -> None:
        result.objects = [replace(o) for o in result.objects]
        if manifest is not None:
            result.checkpoint_size = manifest.size
        for obj in result.objects:
            if obj.file is None:
                continue
            if manifest is not None and obj.file in manifest.files:
                obj.size = manifest.files[obj.file].size
            else:
                with contextlib.suppress(OSError):
                    obj.size = (self.root / result.tag / obj.file).stat().st_size

    def commit(self, tag: str, *, note: str | None = None, metrics: dict | None = None) -> SaveResult:
        """Commit a tag saved with ``commit=False``, or wait for an async save's commit
        (its :class:`~torchckpt.pending.PendingSave`'s ``wait()``).

        Args:
            tag: a tag this Checkpointer saved. A tag that is already committed is left as is.
            note, metrics: replace the ones given at save time.

        Raises:
            CommitError, WriteError: the save (or its background writes) failed; the tag is
                not committed, the previous checkpoints are intact.
            IncompleteCheckpointError: the tag is incomplete and was not saved by this
                Checkpointer (a kernel that died?); save it again.
            TagNotFoundError: no such tag (the message names the nearest ones).
        """
        self._check_open()
        with self._lock:
            failed = self._failed.pop(tag, None)
            pending = self._pending.get(tag)
        if failed is not None:
            assert failed.error is not None
            raise failed.error
        if pending is None:
            info = self.store.info(tag)
            if info.committed:
                return self._result_from_info(info, quiet=False)
            raise IncompleteCheckpointError(
                f"checkpoint {tag!r} is incomplete and was not saved by this kernel (an interrupted save?); "
                "save it again, or remove it with rm or gc"
            )
        try:
            if pending.commits:
                assert pending.handle is not None
                result = pending.handle.wait()
            else:
                if pending.handle is not None:
                    pending.handle.wait()  # the background writes; raises their error
                if note is not None:
                    pending.metadata["note"] = note
                if metrics is not None:
                    pending.metadata["metrics"] = check_metadata({"m": dict(metrics)})["m"]
                result = self._commit_now(pending)
                if pending.handle is not None:
                    pending.handle._set_committed(result)
        finally:
            with self._lock:
                if self._pending.get(tag) is pending:
                    del self._pending[tag]
        if note is not None and pending.commits:
            logger.warning("note for %s ignored: its async save was committed with the note given at save time", tag)
        return result

    def pending(self) -> list[str]:
        """Tags saved by this Checkpointer and not yet committed (async ones included)."""
        with self._lock:
            running = [t for t, p in self._pending.items()
                       if not p.commits or p.future is None or not p.future.done()
                       or p.future.exception() is not None]
            return running + [t for t in self._failed if t not in running]

    def poll(self) -> list[SaveResult]:
        """Async saves that finished since the last poll: committed, or ``failed`` with the error.

        A failed save's error is also raised by :meth:`commit` of its tag.
        """
        done = []
        with self._lock:
            for tag, p in list(self._pending.items()):
                if not p.commits or p.future is None or not p.future.done():
                    continue
                del self._pending[tag]
                error = p.future.exception()
                if error is None:
                    done.append(p.future.result())
                else:
                    failed = replace(p.result, status="failed", error=error)
                    self._failed[tag] = failed
                    done.append(failed)
        return done

    def wait(self) -> list[SaveResult]:
        """Wait for every async save's background commit; return their outcomes (as :meth:`poll`)."""
        with self._lock:
            futures = [p.future for p in self._pending.values() if p.future is not None]
        for f in futures:
            f.exception()
        return self.poll()

    # -- loading -----------------------------------------------------------------------------
    def load(
        self,
        tag: str | None,
        namespace: MutableMapping[str, Any],
        names: Iterable[str] | None = None,
        *,
        map_location: Any = None,
        strict: bool = True,
        into: str | None = None,
        progress: bool | Callable[[int, int], None] | None = None,
        rng: bool | None = None,
        allow: Iterable[Any] = (),
        trusted: bool = False,
        verify: bool = True,
    ) -> LoadResult:
        """Restore saved objects into ``namespace``: all checked first, then all applied.

        Args:
            tag: a tag, ``"latest"`` or None (the newest committed tag).
            namespace: where the live objects are (a notebook's ``globals()``).
            names: the objects to restore (default: every saved object).
            map_location: where tensors are loaded (``"cpu"``, ``"cuda:1"``, ``"auto"``…);
                objects restored in place keep their own devices.
            strict: missing/unexpected keys and dtype changes are errors, not warnings.
            into: restore the single named object into this new variable instead (a module is
                deep-copied from the live one; anything else is the saved state itself).
            progress: as for :meth:`save`.
            rng: restore the RNG states (default: yes, unless ``into`` is given; ``into`` never
                restores them). The result says which happened.
            allow, trusted: for states holding other classes, as :func:`torchckpt.serialization.load`.
            verify: check each file read against the manifest's size and checksum (False: read
                a damaged checkpoint anyway, at your risk).

        Raises:
            TagNotFoundError, IncompleteCheckpointError: no such committed tag.
            ObjectNotFoundError: a name is not in the checkpoint.
            RestoreError: saved state does not fit the live objects (every problem listed).
            CorruptCheckpointError, UnsafeCheckpointError, DeviceUnavailableError: from loading.
            In every case no live object has been changed.
        """
        self._check_open()
        from ._devices import check_map_location

        check_map_location(map_location)
        if into is not None and rng:
            raise RestoreError("rng=True with into=: loading into a new variable never changes the RNG states; "
                               "load in place to restore them")
        started = time.perf_counter()
        if tag is not None and tag != "latest":
            with self._lock:
                pending = self._pending.get(tag)
            if pending is not None and pending.commits:
                self.commit(tag)  # an async save of this tag: load it once committed
        tag = self.store.resolve(tag)
        info = self.store.info(tag)
        saved = _objects_of(info)
        if not saved:
            raise IncompleteCheckpointError(
                f"checkpoint {tag!r} was not saved from a notebook (its manifest lists no objects); "
                "load its files with CheckpointStore.load"
            )
        wanted = list(saved) if names is None else list(dict.fromkeys(names))
        for name in wanted:
            if name not in saved:
                close = difflib.get_close_matches(name, list(saved), n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
                raise ObjectNotFoundError(
                    f"checkpoint {tag!r} has no object {name!r}; {hint}it has: {', '.join(saved)}"
                )
        # Tags made by `torchckpt import` (or other tools) carry no RNG states: nothing to restore.
        rng_file = info.meta.rng  # None: tags made by `torchckpt import` (or other tools)
        has_rng = rng_file is not None
        restore_rng = has_rng and into is None and rng is not False
        if into is not None:
            rng_reason = "loading into a new variable never changes them"
        elif not has_rng:
            rng_reason = "the checkpoint has none"
        elif rng is False:
            rng_reason = "not asked for"
        else:
            rng_reason = ""
        sizes: dict[Any, int] = {rec.path: rec.size for rec in info.manifest.files.values()} if info.manifest else {}
        files = [saved[n].get("file") for n in wanted if saved[n].get("file")]
        if restore_rng:
            files.append(rng_file)
        total = sum(sizes.get(f, 0) for f in files)
        bar = _Progress(progress, total, f"load {tag}", self.progress_min_bytes)
        try:
            for name in wanted:
                if (kind := saved[name].get("kind")) not in state.KINDS:
                    raise RestoreError(f"{name}: unknown kind {kind!r} in the manifest of {tag!r}")
            rng_state = None
            if restore_rng:
                assert rng_file is not None
                rng_state = self.store.load(tag, rng_file, map_location="cpu", verify=verify)
                bar.advance(sizes.get(rng_file, 0))
            plans: list[state.RestorePlan] = []

            def plan_restore(payloads: dict[str, Any]) -> None:
                entries: dict[str, tuple[str, Any]] = {}
                for name in wanted:
                    kind, file = saved[name]["kind"], saved[name].get("file")
                    payload = payloads[file] if file else None
                    entries[name] = (kind, payload.cpu() if kind == "ndarray" and payload is not None else payload)
                plans.append(state.plan_restore(entries, namespace, strict=strict, into=into, rng=rng_state))

            # every file at once: their checksums are computed while they are unpickled and planned
            self.store.load_files(
                tag, [saved[n]["file"] for n in wanted if saved[n].get("file")], map_location=map_location,
                allow=allow, trusted=trusted, verify=verify, on_loaded=lambda f: bar.advance(sizes.get(f, 0)),
                while_verifying=plan_restore)
            plan = plans[0]
        finally:
            bar.close()
        if any(step.kind == "deepspeed" for step in plan.steps):
            from .deepspeed.notebook import load_engine  # imports DeepSpeed

            plan.load_engine = lambda step: load_engine(step.live, self.root, tag, strict=step.strict)
        notes = plan.warnings + plan.apply()
        if into is None:
            self.head = tag  # the namespace's objects now come from this tag: the next save branches from it
        for note in notes:
            logger.info("load %s: %s", tag, note)
        actions = {"restore": "restored", "assign": "assigned", "into": "into"}
        loaded = [LoadedObject(s.name, s.kind, actions[s.action], s.target or s.name) for s in plan.steps]
        return LoadResult(tag, self.root, loaded, rng=rng_state is not None,
                          seconds=time.perf_counter() - started, size=total, notes=notes, rng_reason=rng_reason,
                          checkpoint_size=info.size)

    # -- inspecting and removing -----------------------------------------------------------------
    def list(self) -> TagList:
        """Every tag under the root, oldest first (with this Checkpointer's pending ones marked)."""
        self._check_open()
        return TagList(self.root, self.store.list(), self.pending())

    def tags(self) -> builtins.list[str]:
        """Every tag under the root, oldest first."""
        return self.store.tags()

    def info(self, tag: str) -> TagDetails:
        """One tag's status, metadata, objects and files (``"latest"`` allowed: on a root only
        DeepSpeed's own engine wrote, the tag its ``latest`` file names)."""
        self._check_open()
        return TagDetails(self.store.info(self.store.lookup(tag)[0]))

    def verify(self, tag: str) -> VerifyResult:
        """Re-check every file of a tag against its manifest."""
        self._check_open()
        return VerifyResult(self.store.verify(tag))

    def diff(self, a: str, b: str, *, map_location: Any = "cpu") -> CheckpointDiff:
        """What changed from tag ``a`` to tag ``b``: see :func:`torchckpt.diff.diff_tags`."""
        self._check_open()
        from ._devices import check_map_location
        from .diff import diff_tags

        check_map_location(map_location)
        return diff_tags(self.store, a, b, map_location=map_location)

    def plot(self, metrics: Iterable[str] | None = None) -> MetricPlot:
        """Each metric against step across the root's tags, one line per lineage branch
        (:func:`torchckpt.plots.metric_plot`; default: every numeric metric)."""
        from .plots import metric_plot

        return metric_plot(self.log(), list(metrics) if metrics else None)

    def diff_plot(self, a: str, b: str, *, map_location: Any = "cpu") -> DiffPlot:
        """:meth:`diff`, with each module parameter's relative change ‖B−A‖/‖A‖ as a bar chart."""
        from .plots import diff_plot

        result = self.diff(a, b, map_location=map_location)
        saved = _objects_of(self.store.info(result.a))
        kinds = {n: str(o.get("kind")) for n, o in saved.items() if isinstance(o, dict)}
        return diff_plot(result, kinds)

    def remove(self, tags: str | builtins.list[str], *, force: bool = False) -> RemoveResult:
        """Remove one tag or several, all or nothing. ``latest`` only with ``force``; never a tag
        being written (or saved here and not committed yet)."""
        self._check_open()
        tags = [tags] if isinstance(tags, str) else list(tags)
        with self._lock:
            for tag in tags:
                if tag in self._pending:
                    raise CheckpointInUseError(
                        f"checkpoint {tag!r} was saved by this kernel and is not committed yet; commit it first"
                    )
        removed = self.store.delete_all(tags, allow_latest=force)
        with self._lock:
            for tag in removed:
                self._failed.pop(tag, None)
        return RemoveResult(removed)

    def gc(self, *, keep_last: int | None = None, dry_run: bool = False) -> RemoveResult:
        """Remove incomplete tags and leftovers and, with ``keep_last``, all but the newest N
        committed tags. Never removes ``latest`` or a tag being written (or pending here)."""
        self._check_open()
        plan: GcPlan = self.store.gc(keep_last=keep_last, dry_run=dry_run)
        return RemoveResult(plan.committed + plan.incomplete, plan.kept, len(plan.leftovers), dry_run)

    def _result_from_info(self, info: CheckpointInfo, *, quiet: bool) -> SaveResult:
        objs = _objects_of(info)
        sizes: dict[Any, int] = {rec.path: rec.size for rec in info.manifest.files.values()} if info.manifest else {}
        saved = [SavedObject(n, str(o.get("kind")), str(o.get("type")), o.get("file"), sizes.get(o.get("file")))
                 for n, o in objs.items() if isinstance(o, dict)]
        meta = info.meta
        return SaveResult(info.tag, self.root, saved, info.status, step=meta.step, note=meta.note,
                          metrics=meta.metrics, quiet=quiet, checkpoint_size=info.size)

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for async saves to commit; leave uncommitted tags incomplete; free the buffers.

        Raises the first error of an async save that was never reported (by :meth:`poll`,
        :meth:`commit`, or its handle's ``wait()``/``result()``/``exception()``).
        """
        if self._closed:
            return
        with self._lock:
            handles = {t: p.handle for t, p in self._pending.items() if p.handle is not None}
        outcomes = self.wait()
        with self._lock:
            for p in self._pending.values():
                p.tx.abort()
            self._pending.clear()
        self._closed = True
        if self._writer is not None:
            self._writer.shutdown()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        failed = [r for r in outcomes if r.error is not None
                  and not (r.tag in handles and handles[r.tag]._error_delivered)]
        if failed:
            assert failed[0].error is not None  # failed holds only results with an error
            raise failed[0].error

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked_options(options: Any) -> CheckpointOptions:
    if options is None:
        return CheckpointOptions()
    if not isinstance(options, CheckpointOptions):
        raise TypeError(f"options must be a CheckpointOptions, got {type(options).__name__}: "
                        "Checkpointer(root, options=CheckpointOptions(lock_timeout=120, ...))")
    return options


def _file_names(names: Iterable[str]) -> dict[str, str]:
    """``objects/<name>.pt``, unique even on case-insensitive file systems."""
    files, taken = {}, set()
    for name in names:
        stem, n = name, 1
        while stem.lower() in taken:
            n += 1
            stem = f"{name}-{n}"
        taken.add(stem.lower())
        files[name] = object_file(stem)
    return files


def parse_metrics(items: Iterable[str]) -> dict[str, Any]:
    """``["loss=0.12", "acc=91", "opt=adam"]`` -> ``{"loss": 0.12, "acc": 91, "opt": "adam"}``."""
    metrics: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidArgumentError(f"metric {item!r} is not key=value, e.g. loss=0.12")
        parsed: Any = value
        for cast in (int, float):
            try:
                parsed = cast(value)
                break
            except ValueError:
                continue
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise InvalidArgumentError(f"metric {item!r} is not a finite number")
        metrics[key.strip()] = parsed
    return metrics
