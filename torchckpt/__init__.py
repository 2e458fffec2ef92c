"""torchckpt: crash-safe, verified, fast PyTorch checkpoints for notebooks and DeepSpeed.

``import torchckpt`` stays light: DeepSpeed is imported only when the engine is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AdoptError,
    CheckpointInUseError,
    ClosedError,
    CommitError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    ExportError,
    FileNotInCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    InvalidTagError,
    ManifestError,
    MissingExtraError,
    NotCheckpointableError,
    NotTorchFileError,
    ObjectNotFoundError,
    RestoreError,
    StoreLockedError,
    TagExistsError,
    TagNotFoundError,
    TorchckptError,
    UnsafeCheckpointError,
    UnsafePathError,
    WriteError,
)

if TYPE_CHECKING:
    from .async_writer import AsyncWriter
    from .deepspeed.enable import Enabled, enable
    from .deepspeed.engine import TorchCheckpointEngine, install
    from .deepspeed.hf import last_committed_checkpoint
    from .deepspeed.lightning import LightningCallback
    from .notebook import Checkpointer
    from .options import CheckpointOptions
    from .panel import CheckpointPanel
    from .pending import PendingSave
    from .state import Stateful
    from .store import (
        CheckpointInfo,
        CheckpointStore,
        LatestFallbackWarning,
        Transaction,
        UnverifiedLoadWarning,
        VerifyReport,
    )

# name -> module that defines it; imported on first access (PEP 562).
_LAZY = {
    "TorchCheckpointEngine": "deepspeed.engine",
    "install": "deepspeed.engine",
    "enable": "deepspeed.enable",
    "Enabled": "deepspeed.enable",
    "last_committed_checkpoint": "deepspeed.hf",
    "LightningCallback": "deepspeed.lightning",
    "CheckpointStore": "store",
    "CheckpointInfo": "store",
    "Transaction": "store",
    "VerifyReport": "store",
    "LatestFallbackWarning": "store",
    "UnverifiedLoadWarning": "store",
    "AsyncWriter": "async_writer",
    "Checkpointer": "notebook",
    "CheckpointOptions": "options",
    "CheckpointPanel": "panel",
    "PendingSave": "pending",
    "Stateful": "state",
}

__all__ = [
    "AdoptError",
    "AsyncWriter",
    "CheckpointInUseError",
    "CheckpointInfo",
    "CheckpointOptions",
    "CheckpointPanel",
    "CheckpointStore",
    "Checkpointer",
    "ClosedError",
    "CommitError",
    "CorruptCheckpointError",
    "DeviceUnavailableError",
    "Enabled",
    "ExportError",
    "FileNotInCheckpointError",
    "IncompleteCheckpointError",
    "InvalidArgumentError",
    "InvalidTagError",
    "LatestFallbackWarning",
    "LightningCallback",
    "ManifestError",
    "MissingExtraError",
    "NotCheckpointableError",
    "NotTorchFileError",
    "ObjectNotFoundError",
    "PendingSave",
    "RestoreError",
    "Stateful",
    "StoreLockedError",
    "TagExistsError",
    "TagNotFoundError",
    "TorchCheckpointEngine",
    "TorchckptError",
    "Transaction",
    "UnsafeCheckpointError",
    "UnsafePathError",
    "UnverifiedLoadWarning",
    "VerifyReport",
    "WriteError",
    "enable",
    "install",
    "last_committed_checkpoint",
]


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext torchckpt``: register the ``%ckpt`` magic."""
    from .magics import load_ipython_extension as load

    load(ip)


def unload_ipython_extension(ip: Any) -> None:
    """``%unload_ext torchckpt``: remove ``%ckpt`` and its hooks."""
    from .magics import unload_ipython_extension as unload

    unload(ip)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchckpt' has no attribute {name!r}")
    import importlib

    try:
        imported = importlib.import_module(f".{module}", __name__)
    except ModuleNotFoundError as e:
        from ._extras import missing

        raise (missing(e, f"torchckpt.{name}") or e) from e
    value = getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
