"""Asynchronous saves: snapshot into reused host buffers, write in the background.

:meth:`AsyncWriter.submit` blocks only while the tensors of a state are copied ("snapshotted")
into host buffers; serialising and writing the file happen on a background thread. The caller
may change or free its tensors as soon as ``submit`` returns: the file holds the values of the
moment of the snapshot.

- Buffers come from a pool keyed by size and are reused by the next save of the same shapes
  (fresh host memory is several times slower to fill than warm memory: first-touch faults);
  on CUDA they are pinned, and device-to-host copies are issued non-blocking and synchronised
  once per snapshot.
- Storage sharing is kept: tensors that are views of one storage stay views of one snapshot
  buffer, which holds only the span of the storage they use (so a view of a huge flat buffer
  does not drag the whole buffer into the file).
- Saved device locations are kept: a CUDA tensor snapshotted to host memory is still recorded
  as ``cuda:N`` in the file, so ``map_location=None`` loads it where it was.
- ``max_inflight_bytes`` bounds the snapshot memory: a save that would exceed it waits for
  earlier writes to finish (back-pressure). A single state larger than the cap still proceeds
  once nothing else is in flight.
"""

from __future__ import annotations

import copy
import enum
import logging
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import serialization
from ._fileio import atomic_writer

logger = logging.getLogger(__name__)

_IMMUTABLE = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size, enum.Enum)

# data_ptr of a snapshot buffer -> the location tag of the storage it copies ("cuda:0").
_SNAPSHOT_LOCATIONS: dict[int, str] = {}
_registered = False
_register_lock = threading.Lock()


def _snapshot_location_tag(storage) -> str | None:
    if _SNAPSHOT_LOCATIONS:
        return _SNAPSHOT_LOCATIONS.get(storage.data_ptr())
    return None


def _never_deserialize(storage, location):  # the built-in deserialisers handle every tag we emit
    return None


def _register_location_tagger() -> None:
    global _registered
    with _register_lock:
        if not _registered:
            torch.serialization.register_package(0, _snapshot_location_tag, _never_deserialize)
            _registered = True


class _BufferPool:
    """Host byte buffers, reused by exact size."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()
        self.allocated_bytes = 0

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
            self.allocated_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free[buf.numel()].append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self.allocated_bytes = 0


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) of the tensor's storage that the tensor addresses."""
    if t.numel() == 0:
        start = t.storage_offset() * t.element_size()
        return start, start
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return start, start + (last + 1) * t.element_size()


def _plain(t: torch.Tensor) -> bool:
    return (
        t.layout == torch.strided
        and not t.is_quantized
        and not t.is_nested
        and t.device.type in ("cpu", "cuda")
        and type(t) in (torch.Tensor, torch.nn.Parameter)
    )


@dataclass
class Snapshot:
    """A copy of a state whose tensors live in pooled host buffers."""

    obj: Any
    buffers: list[torch.Tensor]
    nbytes: int


class AsyncWriter:
    """Background writer with snapshot buffers and bounded memory.

    Args:
        max_inflight_bytes: cap on snapshot bytes not yet written (None: no cap).
        pin_memory: pin host buffers (default: when CUDA is available).
        workers: background writer threads.
    """

    def __init__(self, *, max_inflight_bytes: int | None = None, pin_memory: bool | None = None, workers: int = 1):
        if max_inflight_bytes is not None and max_inflight_bytes <= 0:
            raise ValueError(f"max_inflight_bytes must be positive or None, got {max_inflight_bytes!r}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self.max_inflight_bytes = max_inflight_bytes
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._pool = _BufferPool(pin)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchckpt-writer")
        self._inflight = 0
        self._cond = threading.Condition()
        self._futures: set[Future] = set()
        _register_location_tagger()

    # -- snapshot -------------------------------------------------------------------------
    def snapshot(self, obj: Any) -> Snapshot:
        """Copy every tensor of ``obj`` into pooled host buffers; rebuild the containers."""
        tensors: dict[int, torch.Tensor] = {}
        _collect(obj, tensors)
        groups: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        for t in tensors.values():
            if _plain(t):
                groups[(str(t.device), t.untyped_storage().data_ptr())].append(t)
        copies: dict[int, torch.Tensor] = {}
        buffers: list[torch.Tensor] = []
        nbytes = 0
        cuda_used = False
        for (device, _), members in groups.items():
            spans = [_span(t) for t in members]
            lo = min(s for s, _ in spans)
            hi = max(e for _, e in spans)
            # Align so the rebased storage offset stays a whole number of elements for every dtype.
            lo -= lo % 16
            size = hi - lo
            buf = self._pool.take(max(size, 1))
            buffers.append(buf)
            nbytes += buf.numel()
            if size:
                storage = members[0].untyped_storage()
                src = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),))
                buf[:size].copy_(src[lo:hi], non_blocking=storage.device.type == "cuda")
                cuda_used |= storage.device.type == "cuda"
            if not device.startswith("cpu"):
                _SNAPSHOT_LOCATIONS[buf.data_ptr()] = device
            new_storage = buf.untyped_storage()
            for t in members:
                elem = t.element_size()
                offset = (t.storage_offset() * elem - lo) // elem
                new = torch.empty(0, dtype=t.dtype).set_(new_storage, offset, t.shape, t.stride())
                if isinstance(t, torch.nn.Parameter):
                    new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                elif t.requires_grad:
                    new.requires_grad_(True)
                copies[id(t)] = new
        if cuda_used:
            torch.cuda.synchronize()
        for key, t in tensors.items():
            if key not in copies:  # sparse, quantized, meta, subclasses: a plain detached copy
                copies[key] = t.detach().clone()
        return Snapshot(_rebuild(obj, copies), buffers, nbytes)

    def _release(self, snap: Snapshot) -> None:
        for buf in snap.buffers:
            _SNAPSHOT_LOCATIONS.pop(buf.data_ptr(), None)
            self._pool.give(buf)
        with self._cond:
            self._inflight -= snap.nbytes
            self._cond.notify_all()

    # -- writing ----------------------------------------------------------------------------
    def submit(self, final: Path, obj: Any, *, on_done: Callable[[Any], None] | None = None) -> Future:
        """Snapshot ``obj`` now; write it to ``final`` atomically in the background."""
        snap = self.snapshot(obj)
        self._reserve(snap.nbytes)
        future = self._executor.submit(self._write, Path(final), snap, on_done)
        with self._cond:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def _reserve(self, nbytes: int) -> None:
        with self._cond:
            cap = self.max_inflight_bytes
            while cap is not None and self._inflight and self._inflight + nbytes > cap:
                logger.debug("waiting for %d in-flight bytes before snapshotting %d more", self._inflight, nbytes)
                self._cond.wait()
            self._inflight += nbytes

    def _forget(self, future: Future) -> None:
        with self._cond:
            self._futures.discard(future)

    def _write(self, final: Path, snap: Snapshot, on_done) -> Any:
        try:
            with atomic_writer(final) as stream:
                serialization.save(snap.obj, stream)
            if on_done is not None:
                on_done(stream.result)
            return stream.result
        finally:
            self._release(snap)

    @property
    def inflight_bytes(self) -> int:
        return self._inflight

    @property
    def pooled_bytes(self) -> int:
        return self._pool.allocated_bytes

    def wait(self) -> None:
        """Wait for every write submitted so far (errors stay with their futures)."""
        with self._cond:
            pending = list(self._futures)
        for f in pending:
            f.exception()

    def close(self) -> None:
        """Finish pending writes and release every buffer."""
        self.wait()
        self._pool.clear()

    def shutdown(self) -> None:
        self.close()
        self._executor.shutdown(wait=True)


def _collect(obj: Any, out: dict[int, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.setdefault(id(obj), obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, out)


def _rebuild(obj: Any, copies: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return copies[id(obj)]
    if isinstance(obj, _IMMUTABLE):
        return obj
    if isinstance(obj, (OrderedDict, defaultdict)) or type(obj) is dict:
        new = copy.copy(obj)
        for k, v in obj.items():
            new[k] = _rebuild(v, copies)
        return new
    if isinstance(obj, dict):
        return type(obj)((k, _rebuild(v, copies)) for k, v in obj.items())
    if isinstance(obj, list):
        return type(obj)(_rebuild(v, copies) for v in obj) if type(obj) is not list else [_rebuild(v, copies) for v in obj]
    if isinstance(obj, tuple):
        items = [_rebuild(v, copies) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return copy.deepcopy(obj)
