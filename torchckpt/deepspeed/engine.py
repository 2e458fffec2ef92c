"""``TorchCheckpointEngine``: DeepSpeed's checkpoint engine interface over the checkpoint store.

A drop-in for ``deepspeed.runtime.checkpoint_engine.TorchCheckpointEngine`` that DeepSpeed
drives unchanged, and that adds what DeepSpeed's own engine lacks: atomic durable files, a
manifest with checksums as the commit marker, an atomic ``latest``, verified and safe
(weights-only) loading, ``map_location="auto"`` and optional asynchronous writes.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch

try:
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
        CheckpointCommitInfo,
        CheckpointEngine,
    )
except ImportError as e:  # DeepSpeed <= 0.17.0: create(tag)/commit(tag), no CheckpointCommitInfo
    raise ImportError(
        f"torchckpt's DeepSpeed engine needs deepspeed>=0.17.1 (its checkpoint-engine API with "
        f"CheckpointCommitInfo); this is deepspeed {getattr(deepspeed, '__version__', '?')}: "
        "pip install 'deepspeed>=0.17.1'"
    ) from e
from deepspeed.utils import log_dist

from .._fileio import atomic_writer, fsync_dir
from ..async_writer import AsyncWriter
from ..errors import CommitError, InvalidArgumentError, TorchckptError
from ..layout import MANIFEST_NAME
from ..manifest import validate_tag
from ..store import CheckpointStore, Transaction, load_unmanaged

logger = logging.getLogger(__name__)

ENGINE_NAME = "torchckpt.TorchCheckpointEngine"


@dataclass(frozen=True)
class EngineOptions:
    """How the engine saves and loads. Validated on construction.

    Attributes:
        async_save: write files in the background; DeepSpeed commits at its next step.
        max_inflight_bytes: cap on snapshot memory in async mode (None: no cap).
        verify_on_load: check each file's checksum against the manifest before loading it.
        allow_incomplete: also load tags torchckpt began and never committed (interrupted saves);
            tags DeepSpeed's own engine wrote load without it, unverified, with a warning.
        allow: extra globals to allow in safe loading ("module.Name" or objects).
        trusted: load with weights_only=False (runs arbitrary pickled code).
        map_location: used when DeepSpeed passes none (None: as saved; "auto"; "cpu"; ...);
            ``{local_rank}`` and ``{rank}`` in a string are this rank's (``"cuda:{local_rank}"``).
        metadata: user metadata recorded in every manifest (step, note, ...).
        commit_timeout: seconds every rank waits for the others at commit.
    """

    async_save: bool = False
    max_inflight_bytes: int | None = None
    verify_on_load: bool = True
    allow_incomplete: bool = False
    allow: tuple = ()
    trusted: bool = False
    map_location: Any = None
    metadata: tuple = ()
    commit_timeout: float = 600.0

    def __post_init__(self):
        if self.max_inflight_bytes is not None and self.max_inflight_bytes <= 0:
            raise InvalidArgumentError(f"max_inflight_bytes must be positive or None, got {self.max_inflight_bytes!r}")
        if self.commit_timeout <= 0:
            raise InvalidArgumentError(f"commit_timeout must be positive, got {self.commit_timeout!r}")
        if isinstance(self.map_location, str) and "{" in self.map_location:
            try:
                self.map_location.format(local_rank=0, rank=0)
            except (KeyError, IndexError, ValueError) as e:
                raise InvalidArgumentError(
                    f"map_location {self.map_location!r} may use only {{local_rank}} and {{rank}} as placeholders"
                ) from e
        for name in ("async_save", "verify_on_load", "allow_incomplete", "trusted"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be True or False, got {getattr(self, name)!r}")


def _tag_of(info: Any) -> str:
    """create/commit take a CheckpointCommitInfo, or a bare tag as older DeepSpeed versions pass."""
    if isinstance(info, str):
        return info
    if all(hasattr(info, a) for a in ("tag", "save_dir", "save_latest")):
        return info.tag
    raise TypeError(f"expected a CheckpointCommitInfo or a tag string, got {type(info).__name__}")


@dataclass
class _OpenCheckpoint:
    """One checkpoint between ``create`` and ``commit``.

    Nothing touches the disk at ``create``: the tag's transaction begins at the first file saved
    into ``save_dir/tag/`` (DeepSpeed's ``save_16bit_model`` calls ``create`` and then writes only
    ``save_dir/pytorch_model.bin``, outside the tag). Files saved elsewhere are written on their own,
    atomically and durably.
    """

    tag: str
    save_dir: str  # "" until known: older DeepSpeed passes create() the tag alone
    save_latest: bool
    coordinator: Any = None  # TorchDistributedCoordinator on many ranks, else None
    tx: Transaction | None = None

    @property
    def tag_dir(self) -> Path | None:
        return Path(self.save_dir).absolute() / self.tag if self.save_dir else None

    def holds(self, path: Path) -> bool:
        """Whether ``path`` lies inside this checkpoint's tag directory (learning ``save_dir`` from
        it when DeepSpeed gave only the tag)."""
        path = path.absolute()
        if not self.save_dir:
            for parent in path.parents:
                if parent.name == self.tag:
                    self.save_dir = str(parent.parent)
                    break
        tag_dir = self.tag_dir
        return tag_dir is not None and path.is_relative_to(tag_dir)

    @property
    def info(self) -> CheckpointCommitInfo:
        return CheckpointCommitInfo(tag=self.tag, save_dir=self.save_dir, save_latest=self.save_latest)


#: Engines whose asynchronous saves may still wait for their commit (see _commit_at_exit).
_live_engines: weakref.WeakSet[TorchCheckpointEngine] = weakref.WeakSet()


class TorchCheckpointEngine(CheckpointEngine):
    """DeepSpeed checkpoint engine: crash-safe, verified, safe to load, optionally async.

    DeepSpeed calls, per checkpoint: ``makedirs(save_dir)`` (rank 0), ``create(info)``,
    ``makedirs(tag_dir)``, ``save(state_dict, path)`` once per file on each writing rank,
    ``commit(info)`` (for async engines, at the next optimizer step, via ``get_commit_info``),
    then it rewrites ``latest`` itself; for loading, ``load(path, map_location)`` per file;
    ``cleanup()`` on ``destroy()``. Everything DeepSpeed's own engine accepts works here too:
    files saved outside a tag directory (``save_16bit_model``) and ``save``/``load`` outside any
    ``create``/``commit`` are single atomic, durable files; files without a manifest (checkpoints
    DeepSpeed's own engine wrote) load weights-only, checked for tears, with a warning.

    Install it after ``deepspeed.initialize``::

        engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=...)
        torchckpt.install(engine)                 # or: async_save=True, map_location="auto"
        engine.save_checkpoint("checkpoints", tag="step-100")

    Args:
        config_params: DeepSpeed's config (unused, accepted for compatibility).
        **options: fields of :class:`EngineOptions`.
    """

    def __init__(self, config_params: Any = None, **options: Any):
        super().__init__(config_params)
        self.name = ENGINE_NAME
        if "allow" in options:
            options["allow"] = tuple(options["allow"])
        if "metadata" in options:
            options["metadata"] = tuple(dict(options["metadata"]).items())
        self.options = EngineOptions(**options)
        # keep_device=False: files hold CPU tensors, as after DeepSpeed's own clone_tensors_for_torch_save
        # (which it skips for us: preserves_storage_sharing() is False in async mode).
        self._writer = (
            AsyncWriter(max_inflight_bytes=self.options.max_inflight_bytes, keep_device=False)
            if self.options.async_save
            else None
        )
        self._open: _OpenCheckpoint | None = None
        self._committed: str | None = None
        self._joined: Transaction | None = None  # see joined()
        if self._writer is not None:
            _live_engines.add(self)
        log_dist(f"[{ENGINE_NAME}] initialized (async_save={self.options.async_save})", ranks=[0])

    # -- the transaction -----------------------------------------------------------------
    def create(self, info: CheckpointCommitInfo | str) -> None:
        tag = validate_tag(_tag_of(info))
        if self._joined is not None:
            if tag != self._joined.tag:
                raise CommitError(f"DeepSpeed began checkpoint {tag!r} inside the save of {self._joined.tag!r}")
            return
        self._settle_previous()
        if isinstance(info, str):
            self._open = _OpenCheckpoint(tag, "", True, self._coordinator())
        else:
            self._open = _OpenCheckpoint(tag, str(info.save_dir), bool(info.save_latest), self._coordinator())
        log_dist(f"[{ENGINE_NAME}] checkpoint {tag} is about to be saved", ranks=[0])

    def _settle_previous(self) -> None:
        """Before a new checkpoint: commit the previous async one DeepSpeed has not committed yet;
        abandon a synchronous one that was never committed (its save failed)."""
        previous = self._open
        if previous is None:
            return
        if self._writer is not None:
            self.commit(previous.info)
            return
        self._open = None
        if previous.tx is not None:
            log_dist(f"[{ENGINE_NAME}] abandoning uncommitted checkpoint "
                     f"{previous.tag}", ranks=[0], level=logging.WARNING)
            previous.tx.abort()

    def _coordinator(self):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from .._distributed import TorchDistributedCoordinator

            return TorchDistributedCoordinator(timeout=self.options.commit_timeout)
        return None

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        if self._joined is not None:
            self._joined.write(self._joined.relpath(path), state_dict)
            return
        target, current = Path(path), self._open
        try:
            if current is not None and current.holds(target):
                if current.tx is None:
                    current.tx = self._begin(current)
                current.tx.write(current.tx.relpath(target), state_dict)
            else:
                _save_file(state_dict, target)
        except Exception as e:
            if current is not None:
                self._fail(current, e)
            raise

    def _begin(self, current: _OpenCheckpoint) -> Transaction:
        store = CheckpointStore(current.save_dir)
        return store.transaction(current.tag, writer=self._writer, coordinator=current.coordinator)

    def _fail(self, current: _OpenCheckpoint, error: Exception) -> None:
        """A save failed here: the checkpoint is abandoned, and on many ranks the others learn it now
        (at the step where they would otherwise wait for this rank), not at their deadline."""
        if self._open is current:
            self._open = None
        if current.tx is not None:
            current.tx.abort()
        if current.coordinator is not None:
            report = {"tag": current.tag, "save_dir": current.save_dir, "wrote": False, "error": _describe(error)}
            current.coordinator.exchange(report, step="start")

    @contextlib.contextmanager
    def joined(self, tx: Transaction) -> Iterator[None]:
        """DeepSpeed's ``save_checkpoint`` inside the block writes into ``tx`` (a notebook save, which
        holds other objects too): ``create`` checks the tag, ``save`` writes into ``tx``, ``commit``
        leaves the commit to ``tx``'s owner. Synchronous, so DeepSpeed never defers the commit."""
        if self._open is not None and self._writer is not None:
            self.commit(self._open.info)  # an earlier async save_checkpoint still waiting for its commit
        self._joined = tx
        try:
            yield
        finally:
            self._joined = None

    def commit(self, info: CheckpointCommitInfo | str) -> bool:
        tag = _tag_of(info)
        if self._joined is not None:
            return True  # the joined transaction's owner commits
        current = self._open
        if current is None or current.tag != tag:
            if current is None and tag == self._committed:
                return True  # already committed (cleanup() after DeepSpeed's own deferred commit)
            open_tag = current.tag if current is not None else None
            raise CommitError(f"commit({tag!r}) without a matching create(); the open checkpoint is {open_tag!r}")
        self._open = None
        if not isinstance(info, str):
            current.save_latest = bool(info.save_latest)
        if current.coordinator is not None:
            committed = self._agree(current)
        elif current.tx is None:
            committed = False  # nothing was saved into the tag directory
        else:
            current.tx.commit(metadata=dict(self.options.metadata), save_latest=current.save_latest)
            committed = True
        if committed:
            self._committed = tag
            log_dist(f"[{ENGINE_NAME}] checkpoint {tag} committed", ranks=[0])
        else:
            log_dist(f"[{ENGINE_NAME}] {tag}: no file was saved into the tag directory; nothing to commit", ranks=[0])
        return True

    def _agree(self, current: _OpenCheckpoint) -> bool:
        """Many ranks: agree on the tag and on whether any rank saved into it, then commit on every
        rank (a rank that saved nothing there takes part with an empty file list)."""
        report = {"tag": current.tag, "save_dir": current.save_dir, "wrote": current.tx is not None, "error": None}
        values, missing = current.coordinator.exchange(report, step="start")
        failures = {
            r: str(why or (v or {}).get("error"))
            for r, (v, why) in enumerate(zip(values, missing, strict=False))
            if why or (v or {}).get("error")
        }
        if failures:
            if current.tx is not None:
                current.tx.abort()
            detail = "; ".join(f"rank {r}: {why}" for r, why in failures.items())
            raise CommitError(f"checkpoint {current.tag!r} not committed: {detail}; the previous checkpoint is intact",
                              failures=failures, step="start")
        tags = [v["tag"] for v in values]
        if len(set(tags)) > 1:
            if current.tx is not None:
                current.tx.abort()
            by_rank = ", ".join(f"rank {r}: {t!r}" for r, t in enumerate(tags))
            log_dist(
                f"[{ENGINE_NAME}] checkpoint not committed: the ranks saved under different tags ({by_rank}), so "
                "no tag holds a whole checkpoint; each rank's files are durable in its own tag directory. Save "
                "with one tag on every rank (DeepSpeed's checkpoint.tag_validation \"FAIL\" refuses this up front)",
                ranks=[-1],
                level=logging.WARNING,
            )
            return False
        if not any(v["wrote"] for v in values):
            return False
        if current.tx is None:
            current.save_dir = current.save_dir or next(v["save_dir"] for v in values if v["save_dir"])
            current.tx = self._begin(current)
        current.tx.commit(metadata=dict(self.options.metadata), save_latest=current.save_latest)
        return True

    # -- async (decoupled) protocol --------------------------------------------------------
    def is_decoupled(self) -> bool:
        return self._writer is not None and self._joined is None

    def get_commit_info(self) -> CheckpointCommitInfo | None:
        return self._open.info if self._open is not None and self._writer is not None else None

    def set_commit_info(self, info: CheckpointCommitInfo) -> None:
        if self._open is not None and self._open.tag == info.tag:
            self._open.save_dir, self._open.save_latest = str(info.save_dir), bool(info.save_latest)

    def preserves_storage_sharing(self) -> bool:
        # In async mode our snapshot compacts views itself, so DeepSpeed need not clone first.
        writer = self._joined.writer if self._joined is not None else self._writer
        return writer is None

    def commit_pending(self, *, reason: str = "on request") -> str | None:
        """Commit the async checkpoint DeepSpeed has not committed yet (it commits at the next
        optimizer step); returns its tag, or None when nothing was pending."""
        current = self._open
        if current is None or self._writer is None:
            return None
        # At exit or destroy() a user should see it (DeepSpeed shows warnings by default, not info).
        log_dist(f"[{ENGINE_NAME}] committing pending checkpoint {current.tag} "
                 f"{reason}", ranks=[0], level=logging.WARNING)
        self.commit(current.info)
        return current.tag

    def cleanup(self) -> None:
        """DeepSpeed's ``destroy()``: commit a pending async checkpoint, stop the background writer."""
        self.commit_pending(reason="at destroy()")
        if self._writer is not None:
            self._writer.close()
        _live_engines.discard(self)

    # -- loading ---------------------------------------------------------------------------
    def load(self, path: str, map_location: Any = None) -> Any:
        """Load one file. In a committed tag: verified against the manifest (``verify_on_load``),
        weights-only. In a tag torchckpt began and never committed: refused (unless
        ``allow_incomplete``). Anything else (DeepSpeed's own checkpoints, bare files):
        weights-only, checked for tears, with a warning."""
        if map_location is None:
            map_location = self.options.map_location
        location = _for_this_rank(map_location)
        log_dist(f"[{ENGINE_NAME}] loading {path}", ranks=[0])
        found = _tag_dir_of(Path(path))
        if found is None:
            return load_unmanaged(
                path,
                map_location=location,
                allow=self.options.allow,
                trusted=self.options.trusted,
                allow_incomplete=self.options.allow_incomplete,
            )
        tag_dir, relpath = found
        return CheckpointStore(tag_dir.parent).load(
            tag_dir.name,
            relpath,
            map_location=location,
            verify=self.options.verify_on_load,
            allow=self.options.allow,
            trusted=self.options.trusted,
        )


def _tag_dir_of(path: Path) -> tuple[Path, str] | None:
    """The committed tag directory holding ``path`` (the nearest ancestor with a manifest), and the
    path inside it; None when no manifest covers it."""
    path = path.absolute()
    for parent in path.parents:
        if (parent / MANIFEST_NAME).exists():
            return parent, path.relative_to(parent).as_posix()
    return None


def _save_file(state: Any, path: Path) -> None:
    """A file outside any tag (``save_16bit_model``'s export, a bare ``save``): atomic and durable,
    with zip CRC-32s so it checks itself where no manifest covers it."""
    from .. import serialization

    with atomic_writer(path) as stream:
        serialization.save(state, stream, crc32=True)
    fsync_dir(path.parent)
    log_dist(f"[{ENGINE_NAME}] saved {path}", ranks=[0])


def _describe(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"{type(e).__name__}: {text}" if not isinstance(e, TorchckptError) else text


@atexit.register
def _commit_at_exit() -> None:
    """A process that exits normally never leaves its last async checkpoint uncommitted: DeepSpeed
    commits at the next optimizer step, and a run that ends right after a save has none."""
    for engine in list(_live_engines):
        try:
            engine.commit_pending(reason="at exit")
        except Exception as e:  # noqa: BLE001 - reported; the checkpoint stays incomplete, never torn
            logger.error("[%s] the pending checkpoint could not be committed at exit: %s", ENGINE_NAME, e)


def _for_this_rank(map_location: Any) -> Any:
    """``"cuda:{local_rank}"`` -> ``"cuda:1"`` on local rank 1 (LOCAL_RANK, as set by the launchers)."""
    if not isinstance(map_location, str) or "{" not in map_location:
        return map_location
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return map_location.format(local_rank=int(os.environ.get("LOCAL_RANK", "0")), rank=rank)


def _adopt_writer_roles(ds_engine: Any, engine: TorchCheckpointEngine) -> None:
    """Recompute which ranks write the model-states file, with the new engine's rule.

    DeepSpeed decided at ``initialize``, asking the engine it had then; an engine whose every
    data-parallel rank writes (DeepSpeed's fast writer) would make every rank write the same file.
    Mirrors ``DeepSpeedEngine._configure_checkpointing``.
    """
    needed = ("use_node_local_storage", "zero_optimization_partition_weights", "local_rank")
    if not all(hasattr(ds_engine, name) for name in needed):
        return
    from deepspeed.utils import groups

    dp_rank = groups._get_sequence_data_parallel_rank()
    rank = ds_engine.local_rank if ds_engine.use_node_local_storage() else dp_rank
    writes = engine.is_data_parallel_writer(rank) or (
        ds_engine.zero_optimization_partition_weights() and ds_engine.is_first_weights_partition_group()
    )
    ds_engine.save_non_zero_checkpoint = bool(writes)


def install(ds_engine: Any, **options: Any) -> TorchCheckpointEngine:
    """Replace a DeepSpeed engine's checkpoint engine with torchckpt's.

    Call after ``deepspeed.initialize`` on every rank; options as :class:`EngineOptions`. The
    ranks that write the model-states file are chosen again with this engine's
    ``is_data_parallel_writer`` (data-parallel rank 0, as DeepSpeed's own engine).
    """
    old = getattr(ds_engine, "checkpoint_engine", None)
    if old is not None and old.is_decoupled():
        old.cleanup()
    engine = TorchCheckpointEngine(getattr(ds_engine, "_config", None), **options)
    ds_engine.checkpoint_engine = engine
    _adopt_writer_roles(ds_engine, engine)
    return engine
