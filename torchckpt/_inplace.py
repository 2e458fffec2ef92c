"""Restore saved tensors into the live tensors they replace, in one bulk copy.

``Module.load_state_dict`` copies each loaded tensor into its parameter one ``copy_`` at a time,
and ``Optimizer.load_state_dict`` *adopts* the loaded tensors: the optimizer's own ``exp_avg``,
``exp_avg_sq``... are freed inside the call (for a large optimizer that free is most of the
load), and what replaces them are private mappings of the checkpoint file (page faults on the
next ``step()``, and the file's disk space is held until the state is replaced again).

:func:`prepare` pairs every saved tensor of the modules and optimizers a restore changes with
the live tensor ``load_state_dict`` would leave holding its value — when that is provably the
same result (below) — and :func:`copy_pairs` copies all of them at once: one ``memmove`` per
chunk of at most 4 MiB, on up to ``threads`` threads taking chunks from one queue (a thread the
machine does not schedule leaves its work to the others), each destination's autograd version
bumped as an in-place ``copy_`` would. ``load_state_dict`` then runs as before with the live
tensors in place of the loaded ones: a module's ``copy_`` of a tensor onto itself does nothing
(and bumps its version), and an optimizer keeps its own tensors, whose identity, memory and
device stay as they were.

A pair qualifies only when both tensors are plain, dense, contiguous CPU tensors of the same
dtype and shape, and the object is one whose ``load_state_dict`` is torch's own with no load
or state-dict hooks — for a module, every submodule's ``_load_from_state_dict`` is torch.nn's own, and the
live tensor is the one ``state_dict(keep_vars=True)`` returns for the key (so no state-dict hook
transforms it). Everything else (CUDA tensors, dtype casts, custom modules and optimizers,
destinations that overlap) is left to ``load_state_dict`` itself, unchanged.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: The most bytes one ``memmove`` copies: small enough for threads to share a large tensor.
CHUNK = 4 << 20
#: Below this many bytes in all, one thread copies (a second one costs more than it saves).
MIN_BYTES_PER_THREAD = 16 << 20


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


@dataclass
class InPlaceCopy:
    """The copies of one restore: ``pairs`` (live destination, loaded source) and, per object,
    the state to hand to its ``load_state_dict`` (the loaded one with live tensors put in)."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    states: dict[int, Any] = field(default_factory=dict)  # id(live object) -> substituted state


def _plain(t: Any) -> bool:
    return (
        type(t) in _PLAIN_TYPES
        and t.is_cpu
        and t.layout is torch.strided
        and not t.is_quantized
        and t.is_contiguous()
        and t.numel() > 0
    )


def _pairs_up(dst: Any, src: Any) -> bool:
    return _plain(dst) and _plain(src) and dst.dtype == src.dtype and dst.shape == src.shape


def _torch_nn_loader(module: torch.nn.Module) -> bool:
    method = type(module)._load_from_state_dict
    return (
        getattr(method, "__module__", "").startswith("torch.nn.")
        and not module._load_state_dict_pre_hooks
        and not module._state_dict_hooks
        and not module._state_dict_pre_hooks
    )


def module_state(live: torch.nn.Module, saved: Mapping[str, Any], pairs: list) -> Mapping[str, Any] | None:
    """The state to load into ``live`` with live tensors in place of the loaded ones (their
    copies appended to ``pairs``), or None when the module does not qualify."""
    if type(live).load_state_dict is not torch.nn.Module.load_state_dict:
        return None
    if torch.__future__.get_swap_module_params_on_conversion():  # load_state_dict swaps, not copies
        return None
    if not all(_torch_nn_loader(m) for m in live.modules()):
        return None
    live_sd = live.state_dict(keep_vars=True)
    state = OrderedDict(saved)
    metadata = getattr(saved, "_metadata", None)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]  # versions: load_state_dict reads them
    for key, value in saved.items():
        target = live_sd.get(key)
        if _pairs_up(target, value):
            pairs.append((target, value))
            state[key] = target
    return state


def optimizer_state(live: torch.optim.Optimizer, saved: Mapping[str, Any], pairs: list) -> Mapping[str, Any] | None:
    """As :func:`module_state`, for an optimizer: its state tensors, or new ones where it has no
    state yet (a fresh optimizer), so that none of them is a mapping of the checkpoint file."""
    if type(live).load_state_dict is not torch.optim.Optimizer.load_state_dict:
        return None
    if live._optimizer_load_state_dict_pre_hooks:
        return None
    params: dict[Any, torch.Tensor] = {}
    for group, live_group in zip(saved["param_groups"], live.param_groups, strict=True):
        params.update(zip(group["params"], live_group["params"], strict=True))
    new_state = dict(saved["state"])
    for pid, pstate in saved["state"].items():
        param = params.get(pid)
        if param is None or not isinstance(pstate, Mapping):
            continue
        current = live.state.get(param) or {}
        substituted = dict(pstate)
        for key, value in pstate.items():
            target = current.get(key)
            if target is None and _plain(value):  # no state yet: memory of its own, not a mapping of the file
                target = torch.empty_like(value)
            if _pairs_up(target, value):
                pairs.append((target, value))
                substituted[key] = target
        new_state[pid] = substituted
    return {**saved, "state": new_state}


def prepare(objects: list[tuple[str, Any, Any]]) -> InPlaceCopy | None:
    """Pair the saved tensors of ``(kind, live, saved)`` modules and optimizers with the live
    tensors they restore. None when destinations overlap other than as the very same tensor
    (tied weights are one copy): then ``load_state_dict`` decides, as it always did."""
    plan = InPlaceCopy()
    for kind, live, saved in objects:
        fn = module_state if kind == "module" else optimizer_state if kind == "optimizer" else None
        if fn is None:
            continue
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        state = fn(live, saved, pairs)
        if state is not None:
            plan.pairs += pairs
            plan.states[id(live)] = state
    unique: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for dst, src in plan.pairs:
        key = (dst.data_ptr(), dst.nbytes)
        seen = unique.get(key)
        if seen is not None and (seen[1].data_ptr(), seen[1].nbytes) != (src.data_ptr(), src.nbytes):
            return None  # one live tensor, two different saved values
        unique[key] = (dst, src)
    end = 0
    for start, nbytes in sorted(unique):
        if start < end:
            return None
        end = start + nbytes
    plan.pairs = list(unique.values())
    return plan


def copy_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]], threads: int = 1) -> None:
    """Copy each source into its destination (same dtype, shape, contiguous CPU tensors)."""
    work: deque[tuple[int, int, int]] = deque()
    total = 0
    for dst, src in pairs:
        d, s, n = dst.data_ptr(), src.data_ptr(), dst.nbytes
        total += n
        for off in range(0, n, CHUNK):
            work.append((d + off, s + off, min(CHUNK, n - off)))
    threads = max(1, min(threads, os.cpu_count() or 1, total // MIN_BYTES_PER_THREAD))
    errors: list[BaseException] = []

    def drain() -> None:
        try:
            while True:
                try:
                    d, s, n = work.popleft()
                except IndexError:
                    return
                ctypes.memmove(d, s, n)  # releases the GIL
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            errors.append(e)

    helpers = [threading.Thread(target=drain, name="torchckpt-restore", daemon=True) for _ in range(threads - 1)]
    for t in helpers:
        t.start()
    drain()
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]
    if pairs:
        torch.autograd.graph.increment_version([dst for dst, _ in pairs])  # one call for all of them
