"""``torchckpt.enable()``: every DeepSpeed engine created while it is on gets torchckpt's checkpoint engine.

Trainers create the DeepSpeed engine themselves — HF ``Trainer`` through Accelerate, Lightning's
``DeepSpeedStrategy`` — and load the resume checkpoint right after ``deepspeed.initialize``, before
any callback runs. The one moment that is early enough for every one of them is the return of
``deepspeed.initialize`` itself, which Accelerate and Lightning look up on the ``deepspeed`` module
at call time. So ``enable`` replaces ``deepspeed.initialize`` with a wrapper that calls the real
one and installs torchckpt's engine on the result before handing it back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import weakref
from typing import Any

from .engine import EngineOptions, TorchCheckpointEngine, install

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_active: list[Enabled] = []  # innermost last: its options win
_original: Any = None  # the real deepspeed.initialize while ours is in place
_wrapper: Any = None  # ours


def _check_options(options: dict[str, Any]) -> None:
    """Refuse bad engine options now, not at the first ``deepspeed.initialize`` deep inside a trainer."""
    names = {f.name for f in dataclasses.fields(EngineOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))}; the options are: "
                        f"{', '.join(sorted(names))}")
    checked = dict(options)
    if "allow" in checked:
        checked["allow"] = tuple(checked["allow"])
    if "metadata" in checked:
        checked["metadata"] = tuple(dict(checked["metadata"]).items())
    EngineOptions(**checked)


class Enabled:
    """What :func:`enable` returns: the options in force and the engines they were installed on.

    Use it as a context manager to undo the patch on exit (pending async saves of the engines
    created inside are committed first), or call :meth:`disable`.
    """

    def __init__(self, options: dict[str, Any]):
        self.options = dict(options)
        self._engines: weakref.WeakSet = weakref.WeakSet()
        self._on = False

    def __repr__(self) -> str:
        state = "on" if self._on else "off"
        return f"<torchckpt.enable({', '.join(f'{k}={v!r}' for k, v in self.options.items())}): {state}>"

    @property
    def engines(self) -> list[Any]:
        """The DeepSpeed engines torchckpt was installed on while this was the innermost ``enable``."""
        return list(self._engines)

    def __enter__(self) -> Enabled:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for engine in self.engines:
                    _commit_pending(engine, "on leaving torchckpt.enable()")
        finally:
            self.disable()

    def commit_pending(self) -> list[str]:
        """Commit every asynchronous save still waiting for DeepSpeed's next step; the tags committed.

        DeepSpeed commits an ``async_save`` checkpoint at the next optimizer step, so the last one of
        a run (a trainer's final save) would wait for the process to end. Call on every rank.
        """
        return [tag for engine in self.engines if (tag := _commit_pending(engine, "on request")) is not None]

    def disable(self) -> None:
        """Stop installing on new engines (engines already created keep torchckpt). Idempotent."""
        global _original
        with _lock:
            if not self._on:
                return
            self._on = False
            _active.remove(self)
            if not _active and _original is not None:
                import deepspeed

                # Someone wrapped ours in turn: leave theirs; ours passes calls through while off.
                if deepspeed.initialize is _wrapper:
                    deepspeed.initialize = _original
                    _original = None

    def _install(self, ds_engine: Any) -> None:
        install(ds_engine, **self.options)
        self._engines.add(ds_engine)


def _commit_pending(ds_engine: Any, reason: str) -> str | None:
    """Commit ``ds_engine``'s pending async save, as DeepSpeed's next step would; its tag, or None."""
    ckpt = getattr(ds_engine, "checkpoint_engine", None)
    if not isinstance(ckpt, TorchCheckpointEngine):
        return None
    return ckpt.commit_pending(reason=reason)


def _wrap(initialize: Any) -> Any:
    @functools.wraps(initialize)
    def initialize_with_torchckpt(*args: Any, **kwargs: Any) -> Any:
        result = initialize(*args, **kwargs)
        with _lock:
            current = _active[-1] if _active else None
        if current is not None:
            engine = result[0] if isinstance(result, tuple) else result
            current._install(engine)
            logger.info("torchckpt installed on %s", type(engine).__name__)
        return result

    return initialize_with_torchckpt


def enable(**options: Any) -> Enabled:
    """Install torchckpt on every DeepSpeed engine created from now on, before anything is loaded.

    Replaces ``deepspeed.initialize`` with a wrapper that runs it and then calls
    ``torchckpt.install(engine, **options)``: HF ``Trainer``/Accelerate and Lightning resume
    through torchckpt (verified, weights-only) and save through it (atomic, committed). Call it
    on every rank, before the trainer creates its engine (before ``trainer.train()`` /
    ``trainer.fit()``). Code that did ``from deepspeed import initialize`` before this call keeps
    the unwrapped function.

    ``enable()`` stays on for the process; a pending async save is committed when the process
    exits normally (the engine's exit rule). As a context manager it undoes itself on exit, committing those
    saves first. Nested calls: the innermost options apply.

    Args:
        **options: fields of :class:`~torchckpt.deepspeed.engine.EngineOptions` (``async_save``,
            ``map_location``, ``metadata``, ``commit_timeout``, ...), checked now.

    Returns:
        An :class:`Enabled` handle (``disable()``, ``commit_pending()``, ``engines``).

    Raises:
        TypeError: an unknown option.
        ValueError: a bad option value.

    Example:
        >>> torchckpt.enable(async_save=True)
        >>> trainer.train(resume_from_checkpoint=torchckpt.last_committed_checkpoint(args.output_dir))
    """
    global _original, _wrapper
    _check_options(options)
    import deepspeed

    handle = Enabled(options)
    with _lock:
        if _original is None:
            _original = deepspeed.initialize
            _wrapper = deepspeed.initialize = _wrap(_original)
        _active.append(handle)
        handle._on = True
    return handle
