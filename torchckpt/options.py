"""The notebook API's settings in one place: :class:`CheckpointOptions`.

``Checkpointer(root, options=CheckpointOptions(...))`` takes them; ``%ckpt`` exposes each as a
traitlet (``%config CkptMagics.lock_timeout = 120``, see :mod:`torchckpt.magics`), and the panel
reads ``poll_interval``. This module imports nothing heavy (``%load_ext`` stays fast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError

#: Saves and loads of at least this many bytes show a progress bar when ``progress=None``.
PROGRESS_MIN_BYTES = 256 << 20
#: A save with no names leaves out tensors and arrays larger than this (a data set, not state).
AUTO_MAX_BYTES = 512 << 20


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class CheckpointOptions:
    """How a :class:`~torchckpt.notebook.Checkpointer` (and the panel over it) behaves.

    Args:
        lock_timeout: seconds to wait for another process's lock on the root (it commits or
            deletes) before failing with ``StoreLockedError``.
        progress_min_bytes: with ``progress=None``, saves and loads of at least this many
            bytes show a progress bar (0: every one).
        auto_max_bytes: a save with no names leaves out tensors and arrays larger than this,
            with a note (None: no limit); named objects are saved whatever their size.
        max_inflight_bytes: async saves: cap on snapshot memory not yet written; a save beyond
            it waits for earlier writes (None: no cap).
        pin_memory: async saves: page-lock the snapshot memory for fast copies from the GPU
            (None: when CUDA is available).
        poll_interval: the panel re-reads the root every this many seconds while a save made
            elsewhere is still committing (None: never).
        dedup: a saved file identical to a committed file of the root is stored as a hard link
            to it (see :mod:`torchckpt.dedup`).

    Raises:
        InvalidArgumentError (a ValueError): a value out of range, naming the option and its valid values.
        TypeError: a value of the wrong type.

    Example:
        >>> ckpt = Checkpointer("checkpoints", options=CheckpointOptions(max_inflight_bytes=4 << 30))
    """

    lock_timeout: float = 60.0
    progress_min_bytes: int = PROGRESS_MIN_BYTES
    auto_max_bytes: int | None = AUTO_MAX_BYTES
    max_inflight_bytes: int | None = None
    pin_memory: bool | None = None
    poll_interval: float | None = 2.0
    dedup: bool = True

    def __post_init__(self) -> None:
        _check(self.lock_timeout, "lock_timeout", "a number of seconds >= 0", lambda v: _number(v) and v >= 0)
        _check(self.progress_min_bytes, "progress_min_bytes", "a whole number of bytes >= 0",
               lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
        _check(self.auto_max_bytes, "auto_max_bytes", "a whole number of bytes >= 0, or None (no limit)",
               lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 0)
        _check(self.max_inflight_bytes, "max_inflight_bytes", "a whole number of bytes > 0, or None (no cap)",
               lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v > 0)
        _check(self.pin_memory, "pin_memory", "True, False or None (when CUDA is available)",
               lambda v: v is None or isinstance(v, bool))
        _check(self.poll_interval, "poll_interval", "a number of seconds > 0, or None (never)",
               lambda v: v is None or _number(v) and v > 0)
        _check(self.dedup, "dedup", "True or False", lambda v: isinstance(v, bool))


def _check(value: Any, name: str, valid: str, ok: Any) -> None:
    if ok(value):
        return
    wrong_type = value is not None and not isinstance(value, (int, float, bool))
    error = TypeError if wrong_type else InvalidArgumentError
    raise error(f"{name} must be {valid}, got {value!r}")
