"""A weights-only load of torch's zip format at the speed of the C unpickler, or a refusal to try.

torch's weights-only unpickler (``torch/_weights_only_unpickler.py``) checks every opcode in
Python, ~50 µs per tensor. This module runs CPython's C unpickler instead, after one pass over
the opcodes (:func:`scan`) that proves the C unpickler will do nothing the weights-only one
would refuse:

- only opcodes torch's unpickler implements, protocol 2 (what ``torch.save`` writes);
- only globals of :data:`FAST_GLOBALS`, a subset of torch's own allowlist (rebuild functions,
  storage types, dtypes, ``OrderedDict``, ``Counter``, ``torch.Size``, ``torch.device``, …);
- ``REDUCE`` only on such a global with a tuple; no ``NEWOBJ`` at all;
- ``APPEND``/``APPENDS`` only onto a list, ``SETITEM``/``SETITEMS`` only into a dict,
  ``OrderedDict`` or ``Counter`` (pairs only), ``BUILD`` only of an ``OrderedDict`` with a dict
  (``state_dict()``'s ``_metadata``) — the pass tracks what each stack and memo slot holds;
- ``BINPERSID`` only with a tuple, which :meth:`_Loader.persistent_load` checks as torch does
  (``("storage", type, key, location, numel)``, a record that exists, bytes inside the file).

Tensors are rebuilt by :func:`_rebuild_tensor_v2` / :func:`_rebuild_parameter`, which call
torch's own steps (``set_`` checks the storage bounds) and refuse anything but plain
arguments: an empty ``OrderedDict`` of backward hooks, no metadata.

Two things torch's unpickler loads are refused (:class:`Refused`): tensors with backward hooks
(``torch.save`` never writes them) and a storage larger than its zip record (torch would map
the bytes of the records after it).

Whatever else this module does not handle — NEWOBJ (dataclasses, ``argparse.Namespace``: DeepSpeed's
files), other globals, legacy files, a fake or meta map location, big-endian data — raises
:class:`Decline` before anything outside the objects being built is touched, and the caller
loads the file with torch's weights-only unpickler instead, which then accepts or refuses it.
So a file loads here only if torch's weights-only load would load it to the same objects;
``tests/test_safe_load_differential.py`` checks that on a corpus of benign and hostile pickles.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import sys
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch


class Decline(Exception):
    """The fast path does not handle this file; load it with torch's weights-only unpickler."""


class Refused(Exception):
    """Something ``torch.save`` never writes and torch's weights-only unpickler would still load:
    tensors with backward hooks, a storage larger than its record (it would read other records)."""


def _fast_globals() -> dict[str, Any]:
    from _codecs import encode

    from torch.serialization import StorageType

    table: dict[str, Any] = {
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "collections.OrderedDict": OrderedDict,
        "collections.Counter": Counter,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "_codecs.encode": encode,
        "builtins.set": set,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "torch.storage.UntypedStorage": torch.UntypedStorage,
    }
    for dtype in (*torch.storage._dtype_to_storage_type_map(), *torch.storage._new_dtypes()):
        table[str(dtype)] = dtype
    for storage in torch._storage_classes:
        if storage not in (torch.storage.TypedStorage, torch.storage.UntypedStorage):
            table[f"{storage.__module__}.{storage.__name__}"] = StorageType(storage.__name__)
    return table


_GLOBALS: dict[str, Any] | None = None


def fast_globals() -> dict[str, Any]:
    """``"module.name"`` → the object the fast path gives the pickle for that global."""
    global _GLOBALS
    if _GLOBALS is None:
        table = _fast_globals()
        # Every name must be one torch's weights-only unpickler allows too (checked, not assumed).
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = _get_allowed_globals()
        _GLOBALS = {name: obj for name, obj in table.items() if name in allowed}
    return _GLOBALS


def global_name(module: str, name: str) -> str:
    """The dotted name torch's weights-only unpickler gives a GLOBAL (Python 2 names mapped)."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


# -- the opcode pass ---------------------------------------------------------------------------
# What a stack or memo slot holds, as far as the checks below need to know.
_PRIM, _TUPLE, _LIST, _DICT, _ODICT, _COUNTER, _SET, _OTHER = range(8)
_MAX_PICKLE = 1 << 30
_MAPPINGS = (_DICT, _ODICT, _COUNTER)
_REDUCED = {"collections.OrderedDict": _ODICT, "collections.Counter": _COUNTER}
#: Opcodes that push an int, float, bool or None: the number of argument bytes (-1: another opcode).
_PRIM_ARGS = [-1] * 256
for _op, _n in ((0x4B, 1), (0x4D, 2), (0x4A, 4), (0x47, 8), (0x89, 0), (0x88, 0), (0x4E, 0)):  # BININT1/2, BININT,
    _PRIM_ARGS[_op] = _n  # BINFLOAT, NEWFALSE, NEWTRUE, NONE


def scan(data: bytes, allowed: dict[str, Any]) -> None:
    """Raise :class:`Decline` unless the C unpickler may run ``data`` (see the module docstring).

    A global is pushed as its dotted name (a ``str``), everything else as one of the kinds above.
    Malformed input (truncation, a missing memo entry, a stack underflow) declines too.
    """
    try:
        _scan(data, allowed)
    except Decline:
        raise
    except (IndexError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise Decline(f"malformed pickle: {type(e).__name__}") from None


def _scan(data: bytes, allowed: dict[str, Any]) -> None:
    if len(data) > _MAX_PICKLE:
        raise Decline("pickle over 1 GiB")
    if data[:2] != b"\x80\x02":
        raise Decline("not pickle protocol 2")
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    push = stack.append
    frombytes = int.from_bytes
    prim_args = _PRIM_ARGS
    limit = len(data)  # a pickle has fewer memo entries than bytes
    i = 2
    while True:  # torch's weights-only opcodes; a read past the end raises IndexError
        op = data[i]
        i += 1
        if op == 0x72:  # LONG_BINPUT
            index = frombytes(data[i : i + 4], "little")
            if index > limit:  # the C unpickler's memo is an array: index 2**32-1 would fill 64 GiB
                raise Decline("memo index beyond the pickle's length")
            memo[index] = stack[-1]
            i += 4
            continue
        skip = prim_args[op]
        if skip >= 0:  # an int, float, bool or None
            push(_PRIM)
            i += skip
        elif op == 0x68:  # BINGET
            push(memo[data[i]])
            i += 1
        elif op == 0x28:  # MARK
            metastack.append(stack)
            stack = []
            push = stack.append
        elif op == 0x52:  # REDUCE
            args = stack.pop()
            func = stack[-1]
            if args != _TUPLE or func.__class__ is not str:
                raise Decline("REDUCE of something other than an allowed global with a tuple")
            stack[-1] = _REDUCED.get(func, _OTHER)
        elif op == 0x74:  # TUPLE
            stack = metastack.pop()
            push = stack.append
            push(_TUPLE)
        elif op == 0x29:  # EMPTY_TUPLE
            push(_TUPLE)
        elif op == 0x58:  # BINUNICODE
            i += 4 + frombytes(data[i : i + 4], "little")
            push(_PRIM)
        elif op == 0x51:  # BINPERSID
            if stack.pop() != _TUPLE:
                raise Decline("BINPERSID of something other than a tuple")
            push(_OTHER)
        elif op == 0x85:  # TUPLE1
            stack[-1] = _TUPLE
        elif op == 0x6A:  # LONG_BINGET
            push(memo[frombytes(data[i : i + 4], "little")])
            i += 4
        elif op == 0x86:  # TUPLE2
            if len(stack) < 2:
                raise Decline("stack underflow")
            stack[-2:] = [_TUPLE]
        elif op == 0x87:  # TUPLE3
            if len(stack) < 3:
                raise Decline("stack underflow")
            stack[-3:] = [_TUPLE]
        elif op == 0x7D:  # EMPTY_DICT
            push(_DICT)
        elif op == 0x75:  # SETITEMS
            items = stack
            stack = metastack.pop()
            push = stack.append
            if len(items) % 2 or stack[-1] not in _MAPPINGS:
                raise Decline("SETITEMS into something other than a dict")
        elif op == 0x73:  # SETITEM
            stack.pop()
            stack.pop()
            if stack[-1] not in _MAPPINGS:
                raise Decline("SETITEM into something other than a dict")
        elif op == 0x71:  # BINPUT
            memo[data[i]] = stack[-1]
            i += 1
        elif op == 0x5D:  # EMPTY_LIST
            push(_LIST)
        elif op == 0x61:  # APPEND
            stack.pop()
            if stack[-1] != _LIST:
                raise Decline("APPEND to something other than a list")
        elif op == 0x65:  # APPENDS
            stack = metastack.pop()
            push = stack.append
            if stack[-1] != _LIST:
                raise Decline("APPENDS to something other than a list")
        elif op == 0x8A or op == 0x55:  # LONG1, SHORT_BINSTRING
            i += 1 + data[i]
            push(_PRIM)
        elif op == 0x8F:  # EMPTY_SET
            push(_SET)
        elif op == 0x63:  # GLOBAL
            end1 = data.index(b"\n", i)
            end2 = data.index(b"\n", end1 + 1)
            name = global_name(data[i:end1].decode("utf-8"), data[end1 + 1 : end2].decode("utf-8"))
            if name not in allowed:
                raise Decline(f"global {name}")
            i = end2 + 1
            push(name)
        elif op == 0x62:  # BUILD
            state = stack.pop()
            if stack[-1] != _ODICT or state != _DICT:
                raise Decline("BUILD of something other than an OrderedDict's attributes")
        elif op == 0x2E:  # STOP
            if len(stack) != 1 or metastack or i > len(data):
                raise Decline("unbalanced pickle")
            return
        else:
            raise Decline(f"opcode {op:#04x}")


# -- tensors -----------------------------------------------------------------------------------
def _refuse_hooks(backward_hooks) -> None:
    if backward_hooks and backward_hooks.__class__ in (OrderedDict, dict):
        raise Refused("a tensor with backward hooks")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """torch._utils._rebuild_tensor_v2 for plain arguments only (no hooks, no metadata)."""
    _refuse_hooks(backward_hooks)
    if (
        storage.__class__ is not torch.storage.TypedStorage
        or storage_offset.__class__ is not int
        or size.__class__ is not tuple  # set_ checks the elements, and the bounds
        or stride.__class__ is not tuple
        or requires_grad.__class__ is not bool
        or backward_hooks.__class__ is not OrderedDict
        or backward_hooks
        or metadata is not None
    ):
        raise Decline("a tensor rebuilt from unusual arguments")
    untyped = storage._untyped_storage
    tensor = torch.empty((0,), dtype=storage.dtype, device=untyped.device).set_(untyped, storage_offset, size, stride)
    tensor.requires_grad = requires_grad
    tensor._backward_hooks = backward_hooks
    return tensor


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """torch._utils._rebuild_tensor_v3 (dtypes without a storage class) for plain arguments only."""
    _refuse_hooks(backward_hooks)
    if (
        storage.__class__ is not torch.storage.TypedStorage
        or storage_offset.__class__ is not int
        or size.__class__ is not tuple
        or stride.__class__ is not tuple
        or requires_grad.__class__ is not bool
        or backward_hooks.__class__ is not OrderedDict
        or backward_hooks
        or dtype.__class__ is not torch.dtype
        or metadata is not None
    ):
        raise Decline("a tensor rebuilt from unusual arguments")
    untyped = storage._untyped_storage
    tensor = torch.empty((0,), dtype=dtype, device=untyped.device, requires_grad=requires_grad)
    tensor.set_(untyped, storage_offset, size, stride)
    tensor._backward_hooks = backward_hooks
    return tensor


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """torch._utils._rebuild_parameter for plain arguments only (no hooks)."""
    _refuse_hooks(backward_hooks)
    if (
        data.__class__ is not torch.Tensor
        or requires_grad.__class__ is not bool
        or backward_hooks.__class__ is not OrderedDict
        or backward_hooks
    ):
        raise Decline("a parameter rebuilt from unusual arguments")
    param = torch.nn.Parameter(data, requires_grad)
    param._backward_hooks = backward_hooks
    return param


class _Loader(pickle.Unpickler):
    """The C unpickler, with globals from :func:`fast_globals` and storages from the mapped file."""

    def __init__(self, data: bytes, reader, overall, file_size: int, restore_location, globals_: dict[str, Any]):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._reader = reader
        self._overall = overall
        self._file_size = file_size
        self._restore = restore_location
        self._globals = globals_
        self._storages: dict[str, torch.storage.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._globals[global_name(module, name)]
        except KeyError:
            raise Decline(f"global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if pid.__class__ is not tuple or len(pid) != 5 or pid[0].__class__ is not str or pid[0] != "storage":
            raise Decline("a persistent id other than a storage")
        _, storage_type, key, location, numel = pid
        if storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        elif storage_type.__class__ is torch.serialization.StorageType:
            dtype = storage_type.dtype
        else:
            raise Decline("a storage of an unknown type")
        if key.__class__ is not str or location.__class__ is not str or numel.__class__ is not int or numel < 0:
            raise Decline("a storage with unusual arguments")
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        name = f"data/{key}"
        nbytes = numel * torch._utils._element_size(dtype)
        try:
            offset = self._reader.get_record_offset(name)
            record_size = self._reader.get_record_size(name)
        except RuntimeError:
            raise Decline(f"no record {name}") from None
        if nbytes > record_size or offset + nbytes > self._file_size:
            raise Refused(f"a storage ({key}) of {nbytes} bytes, larger than its record ({record_size} bytes)")
        storage = self._restore(self._overall[offset : offset + nbytes], location)
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        if typed._data_ptr() != 0:
            self._storages[key] = typed
        return typed


def _plain_location(map_location) -> bool:
    return map_location is None or (isinstance(map_location, (str, torch.device)) and str(map_location) == "cpu")


def load(path: str | Path, map_location: Any) -> Any:
    """Load a torch zip file weights-only through the C unpickler, or raise :class:`Decline`."""
    if sys.byteorder != "little":
        raise Decline("big-endian machine")
    if torch._guards.detect_fake_mode(None) is not None or torch.serialization._serialization_tls.skip_data:
        raise Decline("fake tensor mode or skip_data")
    if not _plain_location(map_location) and (
        torch.serialization._is_meta_location(map_location) or not isinstance(map_location, (str, torch.device))
    ):
        raise Decline("map_location is a function, a dict or meta")
    path = os.fspath(path)
    try:
        reader = torch._C.PyTorchFileReader(path)
    except RuntimeError as e:
        raise Decline(f"not a zip file torch reads: {e}") from None
    # torch's stub omits PyTorchFileReader.has_record, which the C++ reader has
    if reader.has_record("constants.pkl") or not reader.has_record("data.pkl"):  # type: ignore[attr-defined]
        raise Decline("TorchScript archive or no data.pkl")
    if reader.has_record("byteorder") and reader.get_record("byteorder") != b"little":  # type: ignore[attr-defined]
        raise Decline("big-endian data")
    data = reader.get_record("data.pkl")
    globals_ = fast_globals()
    scan(data, globals_)
    file_size = os.path.getsize(path)
    # torch.load(mmap=True)'s own mapping: private (copy-on-write), the whole file.
    shared = torch.serialization.get_default_mmap_options() == getattr(mmap, "MAP_SHARED", None)
    overall = torch.UntypedStorage.from_file(path, shared, file_size)
    restore = torch.serialization._get_restore_location(map_location)
    loader = _Loader(data, reader, overall, file_size, restore, globals_)
    try:
        return loader.load()
    except (Decline, Refused):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the C unpickler or torch refused, torch decides
        raise Decline(f"{type(e).__name__}: {e}") from None
