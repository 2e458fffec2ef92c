"""``TorchCheckpointEngine``: DeepSpeed's checkpoint engine interface over the checkpoint store.

A drop-in for ``deepspeed.runtime.checkpoint_engine.TorchCheckpointEngine`` that DeepSpeed
drives unchanged, and that adds what DeepSpeed's own engine lacks: atomic durable files, a
manifest with checksums as the commit marker, an atomic ``latest``, verified and safe
(weights-only) loading, ``map_location="auto"`` and optional asynchronous writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine
from deepspeed.utils import log_dist

from ..async_writer import AsyncWriter
from ..errors import CommitError
from ..manifest import MANIFEST_NAME, validate_tag
from ..store import CheckpointStore, Transaction

logger = logging.getLogger(__name__)

ENGINE_NAME = "torchckpt.TorchCheckpointEngine"


@dataclass(frozen=True)
class EngineOptions:
    """How the engine saves and loads. Validated on construction.

    Attributes:
        async_save: write files in the background; DeepSpeed commits at its next step.
        max_inflight_bytes: cap on snapshot memory in async mode (None: no cap).
        verify_on_load: check each file's checksum against the manifest before loading it.
        allow_incomplete: load tags without a manifest (uncommitted, or DeepSpeed's own).
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
            raise ValueError(f"max_inflight_bytes must be positive or None, got {self.max_inflight_bytes!r}")
        if self.commit_timeout <= 0:
            raise ValueError(f"commit_timeout must be positive, got {self.commit_timeout!r}")
        if isinstance(self.map_location, str) and "{" in self.map_location:
            try:
                self.map_location.format(local_rank=0, rank=0)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"map_location {self.map_location!r} may use only {{local_rank}} and {{rank}} as placeholders"
                ) from e
        for name in ("async_save", "verify_on_load", "allow_incomplete", "trusted"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


def _tag_of(info: Any) -> str:
    """create/commit take a CheckpointCommitInfo, or a bare tag as older DeepSpeed versions pass."""
    if isinstance(info, str):
        return info
    if all(hasattr(info, a) for a in ("tag", "save_dir", "save_latest")):
        return info.tag
    raise TypeError(f"expected a CheckpointCommitInfo or a tag string, got {type(info).__name__}")


def _save_dir_of(path: Path, tag: str) -> str:
    """The checkpoint root of a file DeepSpeed saves as ROOT/TAG/.../file."""
    for parent in path.absolute().parents:
        if parent.name == tag:
            return str(parent.parent)
    raise CommitError(f"{path} is not inside a directory named after the tag {tag!r}; save under ROOT/{tag}/")


class TorchCheckpointEngine(CheckpointEngine):
    """DeepSpeed checkpoint engine: crash-safe, verified, safe to load, optionally async.

    DeepSpeed calls, per checkpoint: ``makedirs(save_dir)`` (rank 0), ``create(info)``,
    ``makedirs(tag_dir)``, ``save(state_dict, path)`` once per file on each writing rank,
    ``commit(info)`` (for async engines, at the next optimizer step, via ``get_commit_info``),
    then it rewrites ``latest`` itself; for loading, ``load(path, map_location)`` per file;
    ``cleanup()`` on shutdown.

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
        self._tx: Transaction | None = None
        self._info: CheckpointCommitInfo | None = None
        self._committed: str | None = None
        self._joined: Transaction | None = None  # see joined()
        log_dist(f"[{ENGINE_NAME}] initialized (async_save={self.options.async_save})", ranks=[0])

    # -- the transaction -----------------------------------------------------------------
    def create(self, info: CheckpointCommitInfo | str) -> None:
        tag = validate_tag(_tag_of(info))
        if self._joined is not None:
            if tag != self._joined.tag:
                raise CommitError(f"DeepSpeed began checkpoint {tag!r} inside the save of {self._joined.tag!r}")
            return
        if self._tx is not None and self._writer is not None and self._info is not None:
            self.commit(self._info)  # the previous async save, not yet committed by DeepSpeed
        elif self._tx is not None:
            log_dist(f"[{ENGINE_NAME}] abandoning uncommitted checkpoint {self._tx.tag}", ranks=[0], level=logging.WARNING)
            self._tx.abort()
            self._tx = None
        if isinstance(info, str):
            # Older DeepSpeed passes only the tag: the directory is known at the first save().
            self._info = CheckpointCommitInfo(tag=tag, save_dir="", save_latest=True)
        else:
            self._begin(info)
        log_dist(f"[{ENGINE_NAME}] checkpoint {tag} is about to be saved", ranks=[0])

    def _begin(self, info: CheckpointCommitInfo) -> None:
        store = CheckpointStore(info.save_dir)
        self._tx = store.transaction(info.tag, writer=self._writer, coordinator=self._coordinator())
        self._info = info

    def _coordinator(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            from .._distributed import TorchDistributedCoordinator

            return TorchDistributedCoordinator(timeout=self.options.commit_timeout)
        return None

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        if self._joined is not None:
            self._joined.write(self._joined.relpath(path), state_dict)
            return
        if self._tx is None and self._info is not None and not self._info.save_dir:
            self._begin(CheckpointCommitInfo(self._info.tag, _save_dir_of(Path(path), self._info.tag), True))
        if self._tx is None:
            raise CommitError(
                f"save({path!r}) called outside a checkpoint: call create(info) first "
                "(DeepSpeed's save_checkpoint does this)"
            )
        self._tx.write(self._tx.relpath(path), state_dict)

    @contextlib.contextmanager
    def joined(self, tx: Transaction) -> Iterator[None]:
        """DeepSpeed's ``save_checkpoint`` inside the block writes into ``tx`` (a notebook save, which
        holds other objects too): ``create`` checks the tag, ``save`` writes into ``tx``, ``commit``
        leaves the commit to ``tx``'s owner. Synchronous, so DeepSpeed never defers the commit."""
        if self._tx is not None and self._writer is not None and self._info is not None:
            self.commit(self._info)  # an earlier async save_checkpoint still waiting for its commit
        self._joined = tx
        try:
            yield
        finally:
            self._joined = None

    def commit(self, info: CheckpointCommitInfo | str) -> bool:
        tag = _tag_of(info)
        if self._joined is not None:
            return True  # the joined transaction's owner commits
        save_latest = True if isinstance(info, str) else info.save_latest
        tx = self._tx
        if tx is None or tx.tag != tag:
            if tx is None and tag == self._committed:
                return True  # already committed (cleanup() after DeepSpeed's own deferred commit)
            open_tag = tx.tag if tx is not None else None
            raise CommitError(f"commit({tag!r}) without a matching create() and save(); the open checkpoint is {open_tag!r}")
        try:
            tx.commit(metadata=dict(self.options.metadata), save_latest=save_latest)
            self._committed = tag
        finally:
            self._tx = None
        log_dist(f"[{ENGINE_NAME}] checkpoint {tag} committed", ranks=[0])
        return True

    # -- async (decoupled) protocol --------------------------------------------------------
    def is_decoupled(self) -> bool:
        return self._writer is not None and self._joined is None

    def get_commit_info(self) -> CheckpointCommitInfo | None:
        return self._info if self._tx is not None and self._writer is not None else None

    def set_commit_info(self, info: CheckpointCommitInfo) -> None:
        self._info = info

    def preserves_storage_sharing(self) -> bool:
        # In async mode our snapshot compacts views itself, so DeepSpeed need not clone first.
        writer = self._joined.writer if self._joined is not None else self._writer
        return writer is None

    def cleanup(self) -> None:
        if self._tx is not None and self._writer is not None and self._info is not None:
            self.commit(self._info)
        if self._writer is not None:
            self._writer.close()

    # -- loading ---------------------------------------------------------------------------
    def load(self, path: str, map_location: Any = None) -> Any:
        """Load one file through the store: refused if its tag is incomplete (unless
        ``allow_incomplete``), verified against the manifest (``verify_on_load``), weights-only."""
        tag_dir, relpath = self._locate(Path(path))
        if map_location is None:
            map_location = self.options.map_location
        log_dist(f"[{ENGINE_NAME}] loading {path}", ranks=[0])
        return CheckpointStore(tag_dir.parent).load(
            tag_dir.name,
            relpath,
            map_location=_for_this_rank(map_location),
            verify=self.options.verify_on_load,
            allow=self.options.allow,
            trusted=self.options.trusted,
            allow_incomplete=self.options.allow_incomplete,
        )

    def _locate(self, path: Path) -> tuple[Path, str]:
        """The tag directory holding ``path`` (the nearest ancestor with a manifest, else the parent)."""
        path = path.absolute()
        for parent in path.parents:
            if (parent / MANIFEST_NAME).exists():
                return parent, path.relative_to(parent).as_posix()
        return path.parent, path.name


def _for_this_rank(map_location: Any) -> Any:
    """``"cuda:{local_rank}"`` -> ``"cuda:1"`` on local rank 1 (LOCAL_RANK, as set by the launchers)."""
    if not isinstance(map_location, str) or "{" not in map_location:
        return map_location
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
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
