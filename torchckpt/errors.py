"""One base error for torchckpt, with subclasses that also derive from the matching built-in.

Every message says what failed, on which value, and what to do about it.
"""

from __future__ import annotations

import pickle


class TorchckptError(Exception):
    """Base class of every error torchckpt raises on purpose."""


class InvalidTagError(TorchckptError, ValueError):
    """A tag is not one safe path component."""


class TagNotFoundError(TorchckptError, KeyError):
    """No checkpoint with that tag exists under the root."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TagExistsError(TorchckptError, FileExistsError):
    """A save would replace a committed checkpoint without being told to."""


class IncompleteCheckpointError(TorchckptError, RuntimeError):
    """A tag has no manifest: it was never committed (or was written without torchckpt)."""


class CorruptCheckpointError(TorchckptError, RuntimeError):
    """A file of a committed checkpoint does not match its manifest."""


class ManifestError(TorchckptError, ValueError):
    """A manifest cannot be read, or describes something unsafe."""


class UnsafeCheckpointError(TorchckptError, pickle.UnpicklingError):
    """A checkpoint needs globals that are not allowed under safe (weights-only) loading."""

    def __init__(self, message: str, globals_needed: list[str]):
        super().__init__(message)
        self.globals_needed = globals_needed


class DeviceUnavailableError(TorchckptError, RuntimeError):
    """A checkpoint's tensors were saved on a device this machine does not have."""


class CommitError(TorchckptError, RuntimeError):
    """A commit could not make the checkpoint complete; nothing was marked committed."""


class WriteError(TorchckptError, OSError):
    """Writing a checkpoint file failed (disk full, file too large, permission...)."""


class StoreLockedError(TorchckptError, TimeoutError):
    """Another process held the checkpoint root's lock for longer than the timeout."""


class CheckpointInUseError(TorchckptError, RuntimeError):
    """A tag cannot be removed: it is `latest` or is being written."""


class DistributedTimeoutError(TorchckptError, TimeoutError):
    """A rank did not arrive at a collective step of the commit in time."""


class NotCheckpointableError(TorchckptError, TypeError):
    """An object cannot be saved: it is not a module, tensor, plain value or ``Stateful``."""


class ObjectNotFoundError(TorchckptError, KeyError):
    """A name is neither in the notebook namespace nor among a checkpoint's saved objects."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RestoreError(TorchckptError, ValueError):
    """Saved state does not fit the live objects; nothing was changed."""
