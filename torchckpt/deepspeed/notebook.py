"""A DeepSpeed engine inside a notebook checkpoint (``%ckpt save``/``load`` of an engine).

The engine saves itself with its own ``save_checkpoint``, through torchckpt's engine joined to the
notebook's transaction: one commit and one manifest for the engine and the other objects alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import RestoreError
from ..store import Transaction
from .engine import TorchCheckpointEngine, install


def ensure_installed(ds_engine: Any) -> TorchCheckpointEngine:
    """torchckpt's engine on ``ds_engine``, installed now if it has another."""
    ours = getattr(ds_engine, "checkpoint_engine", None)
    if not isinstance(ours, TorchCheckpointEngine):
        ours = install(ds_engine)
    return ours


def save_engine(ds_engine: Any, root: Path, tx: Transaction) -> None:
    """``ds_engine.save_checkpoint(root, tx.tag)`` writing its files into ``tx`` (not committed)."""
    ours = ensure_installed(ds_engine)
    with ours.joined(tx):
        ds_engine.save_checkpoint(str(root), tag=tx.tag, save_latest=False)


def load_engine(ds_engine: Any, root: Path, tag: str, *, strict: bool) -> None:
    """``ds_engine.load_checkpoint(root, tag)`` through torchckpt's engine (verified, weights-only)."""
    ensure_installed(ds_engine)
    path, _ = ds_engine.load_checkpoint(str(root), tag=tag, load_module_strict=strict)
    if path is None:
        raise RestoreError(f"DeepSpeed could not load checkpoint {tag!r} from {root}")
