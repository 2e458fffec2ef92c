"""How the ranks of one commit agree: through torch.distributed's key-value store, with deadlines.

:meth:`torchckpt.store.Transaction.commit` asks every rank for its outcome twice: at step
``"write"`` (are my files durable, is my part of the manifest written?) and at step ``"commit"``
(did rank 0 write the manifest and ``latest``?). Before that, the DeepSpeed engine exchanges one
report per rank at step ``"start"`` (its tag, whether it saved into the tag, a save that failed).
:class:`TorchDistributedCoordinator` answers on every rank with every rank's error, or fails clearly, naming the rank:

1. every rank publishes its outcome under ``torchckpt/<restart>/<commit>/<step>/r<rank>``;
2. rank 0 waits for all of them, then publishes the decision (the list of every rank's error,
   with a missing rank's entry saying why it is missing) under ``.../<step>/decision``;
3. the other ranks wait for the decision.

Why the store rather than a collective (``all_gather_object``, ``monitored_barrier``):

- giving up never leaves the process group out of step: a collective that times out on one
  rank desynchronises the next collective of every rank, a key that never appears does not;
- it works over NCCL and gloo alike, with no side group to create (a collective call in itself);
- the missing ranks are known by name, so the error names them;
- every wait has a deadline (``timeout``), and a rank whose process died *on this host* is seen
  dead within a fraction of a second (its pid and start time are published once per process),
  rather than at the deadline.

Every rank must create its coordinators in the same order (the engine does: one per
``create``): the n-th coordinator of every rank forms one commit.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from .errors import InvalidArgumentError

logger = logging.getLogger(__name__)

#: Seconds the other ranks wait beyond ``timeout`` for rank 0's decision: rank 0's own deadline
#: starts when it arrives, and its decision (naming the late ranks) should reach them first.
_GRACE_MIN, _GRACE_FRACTION, _GRACE_MAX = 2.0, 0.1, 60.0
_POLL_MAX = 0.2
_LIVENESS_EVERY = 0.2

_sequence = itertools.count()
_published: set[int] = set()  # id() of stores this process has published its liveness record in
_stale_decisions: dict[int, str] = {}  # id(store) -> the last decision key, dropped once all have read it


class TorchDistributedCoordinator:
    """Every rank's outcome of one commit step, on every rank; never waits past the deadline.

    Args:
        timeout: seconds rank 0 waits for the other ranks at a step (the others wait a little
            longer for its decision). The engine passes ``commit_timeout``.
        store: the key-value store (default: torch.distributed's default store).
        rank: this process's rank (default: ``torch.distributed.get_rank()``).
        world_size: the number of ranks (default: ``torch.distributed.get_world_size()``).
        key: this commit's name in the store, the same on every rank (default: a per-process
            count of coordinators, which agrees across ranks that create them in one order).

    Raises:
        ValueError: ``timeout`` is not positive, or ``rank``/``world_size`` do not fit.
        RuntimeError: torch.distributed is not initialised and no ``store`` was given.
    """

    def __init__(
        self,
        *,
        timeout: float = 600.0,
        store: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        key: str | None = None,
    ):
        if not timeout or timeout <= 0:
            raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if store is None or rank is None or world_size is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise InvalidArgumentError(
                    "TorchDistributedCoordinator needs torch.distributed to be initialised "
                    "(deepspeed.init_distributed() or torch.distributed.init_process_group()) "
                    "or an explicit store, rank and world_size"
                )
            store = store if store is not None else dist.distributed_c10d._get_default_store()
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout = float(timeout)
        # A restarted torchrun worker group must not see the keys of the previous attempt.
        self._root = f"torchckpt/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self._base = f"{self._root}/{next(_sequence) if key is None else key}"
        self._peers: dict[int, dict | None] = {}
        self._publish_liveness()

    def __repr__(self) -> str:
        return f"TorchDistributedCoordinator(rank={self.rank}, world_size={self.world_size}, timeout={self.timeout:g})"

    # -- the protocol ----------------------------------------------------------------------
    def gather_errors(self, error: str | None, *, step: str) -> list[str | None]:
        """Publish this rank's ``error`` (None: fine) for ``step``; return every rank's.

        A rank that does not arrive within the deadline, or whose process is seen dead, gets
        an error entry saying so; losing the store itself (its host died) is reported as this
        rank's error. Never raises for what other ranks do, never waits past the deadline.
        """
        values, missing = self.exchange(error, step=step)
        return [why if why is not None else (None if v is None else str(v))
                for v, why in zip(values, missing, strict=False)]

    def exchange(self, value: Any, *, step: str) -> tuple[list[Any], list[str | None]]:
        """Publish this rank's JSON-able ``value`` for ``step``; return every rank's value, and for
        each rank why it is missing (None: it arrived), as :meth:`gather_errors` does for errors."""
        key = f"{self._base}/{step}"
        try:
            self.store.set(f"{key}/r{self.rank}", json.dumps(value).encode())
            if self.rank == 0:
                return self._decide(key, step)
            return self._await_decision(key, step)
        except (RuntimeError, OSError) as e:  # DistStoreError, DistNetworkError: the store's host is gone
            logger.warning("rank %d lost the torch.distributed store at commit step %r: %s", self.rank, step, e)
            return self._own_error(
                f"lost contact with the other ranks at commit step {step!r}: the torch.distributed store "
                f"failed ({_first_line(e)}); the process hosting it (rank 0 or the launcher) probably died"
            )

    def _decide(self, key: str, step: str) -> tuple[list[Any], list[str | None]]:
        keys = [f"{key}/r{r}" for r in range(self.world_size)]
        late = self._wait(lambda: self.store.check(keys), dict(enumerate(keys)), self.timeout, step)
        values: list[Any] = [None] * self.world_size
        missing: list[str | None] = [None] * self.world_size
        present = [r for r in range(self.world_size) if r not in late]
        for r, raw in zip(present, self._get_many([keys[r] for r in present]), strict=False):
            try:
                values[r] = json.loads(raw)
            except ValueError:
                missing[r] = f"published an unreadable outcome {raw[:60]!r}"
        for r, died in late.items():
            missing[r] = died or _late(step, self.timeout)
        self.store.set(f"{key}/decision", json.dumps({"values": values, "missing": missing}).encode())
        for r in present:
            _quietly(self.store.delete_key, keys[r])
        if late:
            logger.warning("commit step %r: %s", step, "; ".join(f"rank {r} {missing[r]}" for r in late))
        else:
            # Every rank has arrived here, so each has read the previous decision: drop it.
            stale = _stale_decisions.pop(id(self.store), None)
            if stale is not None:
                _quietly(self.store.delete_key, stale)
            _stale_decisions[id(self.store)] = f"{key}/decision"
        return values, missing

    def _await_decision(self, key: str, step: str) -> tuple[list[Any], list[str | None]]:
        decision = f"{key}/decision"
        grace = min(_GRACE_MAX, max(_GRACE_MIN, _GRACE_FRACTION * self.timeout))
        late = self._wait(lambda: self.store.check([decision]), {0: decision}, self.timeout + grace, step)
        if not late:
            try:
                got = json.loads(self.store.get(decision))
                values, missing = list(got["values"]), list(got["missing"])
            except (ValueError, TypeError, KeyError):
                values, missing = [], []
            if len(values) != self.world_size or len(missing) != self.world_size:
                return self._own_error(f"rank 0's decision at commit step {step!r} is unreadable")
            return values, missing
        # No decision: name the ranks that never arrived, as far as the store still shows it.
        missing = [None] * self.world_size
        for r in range(self.world_size):
            if r != self.rank and not self.store.check([f"{key}/r{r}"]):
                missing[r] = _late(step, self.timeout)
        if late[0]:
            missing[0] = late[0]
        elif missing[0] is None:
            missing[0] = (
                f"arrived at commit step {step!r} but published no decision within "
                f"{self.timeout + grace:g}s (it is hung, or died)"
            )
        return [None] * self.world_size, missing

    def _own_error(self, message: str) -> tuple[list[Any], list[str | None]]:
        missing: list[str | None] = [None] * self.world_size
        missing[self.rank] = message
        return [None] * self.world_size, missing

    # -- waiting ------------------------------------------------------------------------------
    def _wait(self, done: Callable[[], bool], keys: dict[int, str], timeout: float, step: str) -> dict[int, str | None]:
        """Poll ``done`` until true; return the ranks whose key never came: {rank: why it died, or None}.

        ``keys[rank]`` is the key that rank publishes. Returns early as soon as every rank still
        missing is known dead; otherwise at the deadline, with every rank still missing.
        """
        start = time.monotonic()
        deadline = start + timeout
        # Each liveness round asks the store about every missing rank: rarer on large jobs.
        every = _LIVENESS_EVERY * max(1.0, len(keys) / 64)
        next_liveness = start + every
        interval = 0.0005
        while not done():
            now = time.monotonic()
            if now >= next_liveness or now >= deadline:
                missing = [r for r, k in keys.items() if not self.store.check([k])]
                if not missing:
                    continue
                dead = {r: self._dead(r, step) for r in missing}
                if all(dead.values()) or now >= deadline:
                    return dead
                next_liveness = now + every
            time.sleep(min(interval, max(0.0, deadline - now)))
            interval = min(_POLL_MAX, interval * 1.5, max(0.001, (time.monotonic() - start) / 10))
        return {}

    def _get_many(self, keys: list[str]) -> list[bytes]:
        if not keys:
            return []
        multi_get = getattr(self.store, "multi_get", None)
        if multi_get is not None:
            return list(multi_get(keys))
        return [self.store.get(k) for k in keys]

    # -- liveness -----------------------------------------------------------------------------
    def _publish_liveness(self) -> None:
        if id(self.store) in _published:
            return
        record = {"host": _host_id(), "pid": os.getpid(), "start": _start_time(os.getpid())}
        self.store.set(f"{self._root}/proc/r{self.rank}", json.dumps(record).encode())
        _published.add(id(self.store))

    def _dead(self, rank: int, step: str) -> str | None:
        """Why ``rank`` is known dead (its process ran on this host and is gone), else None."""
        record = self._peers.get(rank)
        if record is None:
            key = f"{self._root}/proc/r{rank}"
            if not self.store.check([key]):
                return None  # it never published: not yet started, or gone before; wait
            try:
                record = dict(json.loads(self.store.get(key)))
                record["pid"] = int(record["pid"])
            except (ValueError, TypeError, KeyError):
                return None  # unreadable: no opinion, the deadline decides
            self._peers[rank] = record
        if record.get("host") != _host_id() or not _process_gone(record["pid"], record.get("start")):
            return None
        return f"died (its process, pid {record['pid']} on this host, is gone) before reaching commit step {step!r}"


def _late(step: str, timeout: float) -> str:
    return (
        f"did not reach commit step {step!r} within {timeout:g}s: its process hung, or was killed before "
        "its saves finished; raise commit_timeout if its saves are only slow"
    )




def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - tidying the store is best effort
        logger.debug("could not tidy the torch.distributed store: %s", e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@functools.cache
def _host_id() -> str:
    """This host and pid namespace: pids are comparable only within the same one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, ns = "", 0
    return f"{socket.gethostname()}/{boot}/{ns}"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), telling a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _process_gone(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie: dead, not yet reaped by its parent
        return True
    return start is not None and int(fields[19]) != start
