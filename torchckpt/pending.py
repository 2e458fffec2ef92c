"""The handle of a save that runs in the background: :class:`PendingSave`.

``Checkpointer.save(..., async_save=True)`` (and ``%ckpt save --async``) returns one as soon as
the snapshot is taken. The writer feeds it the bytes it writes; it completes when the tag is
committed (``commit=True``) or written (``commit=False``: commit it with
``Checkpointer.commit(tag)``), or when the save fails::

    handle = ckpt.save("step-100", objects, async_save=True)
    handle                      # step-100: writing 1.2 GiB of 3.4 GiB in the background...
    handle.done()               # False while writing or committing; never blocks
    result = handle.wait()      # the final SaveResult; raises the save's own error if it failed
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import results

if TYPE_CHECKING:
    from .notebook import SavedObject, SaveResult

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


class PendingSave(results.Result):
    """A save writing (and committing) in the background, as :class:`concurrent.futures.Future`.

    Attributes read like the :class:`~torchckpt.notebook.SaveResult` it ends with (``tag``,
    ``status``, ``committed``, ``names``, ``objects``, ``notes``...): while in flight ``status``
    is ``committing`` (commits when written) or ``writing`` (saved with ``commit=False``); then
    the outcome's (``committed``, ``uncommitted``, or ``failed`` with ``error``).

    ``bytes_written`` counts the bytes of the tag's files written so far (fed by the writer as it
    writes them); ``total_bytes`` is the state's size while writing (an estimate: files hold a
    little more than the tensors' bytes) and the bytes written once the save is done.

    Example:
        >>> handle = ckpt.save("step-100", {"model": model}, async_save=True)
        >>> handle.bytes_written, handle.total_bytes
        (402653184, 1073741824)
        >>> handle.wait(timeout=60).committed   # raises WriteError if a write failed
        True
    """

    def __init__(self, tag: str, *, total_bytes: int, commits: bool):
        self.tag = tag
        #: True: the save commits once written; False: it stays uncommitted (``Checkpointer.commit``).
        self.commits = commits
        self.quiet = False
        self._estimate = max(0, int(total_bytes))
        self._written = 0
        self._lock = threading.Lock()
        self._progress_callbacks: list[ProgressCallback] = []
        self._done_callbacks: list[Callable[[PendingSave], None]] = []
        self._snapshot: SaveResult | None = None
        self._future: Future | None = None
        self._committed_later: SaveResult | None = None
        self._started = time.perf_counter()
        #: The save's error reached the caller (wait/result raised it, exception returned it):
        #: ``Checkpointer.close`` does not raise it again.
        self._error_delivered = False

    # -- fed by the Checkpointer and the writer ---------------------------------------------------
    def _add_bytes(self, nbytes: int) -> None:
        """Called by the writer (its own thread) as a file's bytes are written."""
        with self._lock:
            self._written += nbytes
            callbacks = list(self._progress_callbacks)
        if callbacks:
            written, total = self.bytes_written, self.total_bytes
            for fn in callbacks:
                self._call(fn, written, total)

    def _start(self, snapshot: SaveResult, future: Future) -> None:
        """The save returned: ``snapshot`` is its result at that moment, ``future`` its outcome."""
        self._snapshot = snapshot
        self._future = future
        future.add_done_callback(self._finished)

    def _finished(self, _: Future) -> None:
        with self._lock:
            progress, done = list(self._progress_callbacks), list(self._done_callbacks)
        for on_progress in progress:
            self._call(on_progress, self.bytes_written, self.total_bytes)
        for on_done in done:
            self._call(on_done, self)

    def _set_committed(self, result: SaveResult) -> None:
        """A save made with ``commit=False`` was committed later (``Checkpointer.commit``)."""
        self._committed_later = result

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a listener's bug must not fail the save it watches
            logger.exception("a PendingSave callback failed")

    # -- the future -------------------------------------------------------------------------------
    def done(self) -> bool:
        """True once the save is committed (``commit=False``: written) or has failed. Never blocks."""
        return self._future is not None and self._future.done()

    def wait(self, timeout: float | None = None) -> SaveResult:
        """Block until the save is done; return its final :class:`~torchckpt.notebook.SaveResult`.

        Raises:
            TimeoutError: still in flight after ``timeout`` seconds (the save goes on).
            WriteError, CommitError, ...: the save failed; its own error, as raised by the writer
                or the commit (the tag is not committed; the previous checkpoints are intact).
        """
        assert self._future is not None  # set before the Checkpointer returns the handle
        try:
            result = self._future.result(timeout)
        except TimeoutError:
            if not self._future.done():
                raise TimeoutError(f"save {self.tag!r} is still in flight after {timeout:g}s "
                                   f"({self._progress_text()}); wait longer, or call done() to check") from None
            self._error_delivered = True
            raise  # the save's own TimeoutError
        except BaseException:
            self._error_delivered = True
            raise
        return self._committed_later or result

    def result(self, timeout: float | None = None) -> SaveResult:
        """As :meth:`wait` (the name :class:`concurrent.futures.Future` uses)."""
        return self.wait(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The save's error once it is done (None: it succeeded); blocks like :meth:`wait`."""
        assert self._future is not None
        try:
            self._future.exception(timeout)
        except TimeoutError:
            raise TimeoutError(f"save {self.tag!r} is still in flight after {timeout:g}s "
                               f"({self._progress_text()}); wait longer, or call done() to check") from None
        self._error_delivered = self._error_delivered or self.error is not None
        return self.error

    def add_done_callback(self, fn: Callable[[PendingSave], None]) -> None:
        """Call ``fn(handle)`` when the save is done (at once if it is), on the thread that
        finished it. Errors in ``fn`` are logged, never raised into the save."""
        with self._lock:
            if not self.done():
                self._done_callbacks.append(fn)
                return
        self._call(fn, self)

    def add_progress_callback(self, fn: ProgressCallback) -> None:
        """Call ``fn(bytes_written, total_bytes)`` as bytes are written (on the writer's thread)
        and once more when the save is done. Errors in ``fn`` are logged, never raised."""
        with self._lock:
            self._progress_callbacks.append(fn)
        self._call(fn, self.bytes_written, self.total_bytes)

    # -- progress ---------------------------------------------------------------------------------
    @property
    def bytes_written(self) -> int:
        """Bytes of the tag's files written so far."""
        return self._written

    @property
    def total_bytes(self) -> int:
        """The state's size while writing (an estimate); the bytes written once done."""
        if self.done() and self.error is None:
            return self._written
        return max(self._estimate, self._written)

    # -- what the result says ---------------------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        """The save's error once it has failed (None while in flight, or when it succeeded)."""
        if not self.done():
            return None
        assert self._future is not None
        return self._future.exception()

    def _current(self) -> SaveResult:
        """The save's result as of now: the outcome once done, else the snapshot of the save."""
        assert self._snapshot is not None
        if not self.done():
            return self._snapshot
        error = self.error
        if error is not None:
            return replace(self._snapshot, status="failed", error=error)
        return self._committed_later or self._future.result()  # type: ignore[union-attr]

    @property
    def status(self) -> str:
        """``committing``/``writing`` while in flight; then ``committed``, ``uncommitted`` or ``failed``."""
        return self._current().status

    @property
    def committed(self) -> bool:
        return self.status == "committed"

    @property
    def async_save(self) -> bool:
        return True

    @property
    def root(self) -> Path:
        return self._current().root

    @property
    def objects(self) -> list[SavedObject]:
        return self._current().objects

    @property
    def names(self) -> list[str]:
        return self._current().names

    @property
    def notes(self) -> list[str]:
        return self._current().notes

    @property
    def step(self) -> int | None:
        return self._current().step

    @property
    def note(self) -> str | None:
        return self._current().note

    @property
    def metrics(self) -> dict[str, Any]:
        return self._current().metrics

    @property
    def replaced(self) -> bool:
        return self._current().replaced

    @property
    def size(self) -> int | None:
        return self._current().size

    @property
    def checkpoint_size(self) -> int | None:
        return self._current().checkpoint_size

    def to_dict(self) -> dict[str, Any]:
        """The save as plain JSON (see :meth:`torchckpt.results.Result.to_dict`), with its progress."""
        return {**self._current().to_dict(), "status": self.status, "bytes_written": self.bytes_written,
                "total_bytes": self.total_bytes}

    @property
    def parent(self) -> str | None:
        return self._current().parent

    @property
    def linked(self) -> dict[str, str]:
        """name -> the committed tag whose identical file this save shares (see :mod:`torchckpt.dedup`)."""
        return self._current().linked

    @property
    def seconds(self) -> float:
        """Seconds the save took (so far, while in flight)."""
        return self._current().seconds if self.done() else time.perf_counter() - self._started

    # -- rendering --------------------------------------------------------------------------------
    def _progress_text(self) -> str:
        return f"{results.size(self.bytes_written)} of {results.size(self.total_bytes)} written"

    def _phase(self) -> str:
        if self.done():
            status = self.status
            if status == "failed":
                return f"FAILED: {type(self.error).__name__}: {self.error}"
            return "written, not committed" if status == "uncommitted" else status
        if self._written < self._estimate or not self._estimate:
            what = f"writing {results.size(self.bytes_written)} of {results.size(self.total_bytes)}"
        else:
            what = f"written ({results.size(self.bytes_written)}), finishing"
        return what + ("; commits when written" if self.commits else "; not to be committed yet")

    def __repr__(self) -> str:
        return f"<PendingSave {self.tag!r}: {self._phase()}>"

    def _headline(self) -> str:
        if self.done():
            return self._current()._headline()
        how = "commits when written" if self.commits else "not committed (commit it with %ckpt commit)"
        return f"{self.tag}: saving in the background, {self._progress_text()}; {how}"

    def to_html(self) -> str:
        current = self._current()
        return results.html_table(["object", "kind", "type", "size"], current._rows(), title=self._headline()) + (
            results.html_lines([f"note: {n}" for n in current.notes]))

    def to_text(self) -> str:
        current = self._current()
        text = results.text_table(["object", "kind", "type", "size"], current._rows(), title=self._headline())
        return "\n".join([text] + [f"note: {n}" for n in current.notes])
