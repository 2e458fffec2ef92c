"""The structure of a checkpoint file — tensor names, shapes, dtypes, saved devices — without its data.

:func:`inspect_file` reads only the pickle of a ``torch.save`` file (``data.pkl`` inside the zip
format; the pickles before the raw storages in the legacy format) and the JSON header of a
safetensors file. Tensor bytes are never read, so a 70 GB checkpoint is described in
milliseconds, and a file whose tensor data is damaged is still described.

It is safe on untrusted files: the unpickler never imports or calls a real global. Every global a
pickle names is replaced by an inert stand-in that records its arguments — torch's tensor-rebuild
functions by ones that record shape, dtype and device; the few standard containers
(``OrderedDict``, ``set`` ...) by the real, side-effect-free types; anything else by a
placeholder named after the global. Nothing here imports torch.

:func:`origin` tells, from file names alone, who wrote a tag directory.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

__all__ = ["FileStructure", "TensorMeta", "ValueMeta", "inspect_file"]

#: Larger pickles are refused rather than parsed (a crafted file could otherwise exhaust memory).
MAX_PICKLE_BYTES = 1 << 30
MAX_SAFETENSORS_HEADER = 100 << 20
_MAX_LEAVES = 1_000_000
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
}  # fmt: skip
_DTYPE_ALIASES = {
    "float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
    "short": "int16", "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32",
}  # fmt: skip
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8", "QInt32Storage": "qint32", "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4", "UntypedStorage": "uint8",
}  # fmt: skip
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}  # fmt: skip



# -- what the inspection returns -----------------------------------------------------------------
@dataclass(frozen=True)
class TensorMeta:
    """One tensor as the file describes it; ``device`` is where it lived when it was saved."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    device: str | None
    storage: str | None = None
    offset: int = 0
    parameter: bool = False
    requires_grad: bool = False
    kind: str = "tensor"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int | None:
        size = _ITEMSIZE.get(self.dtype)
        return None if size is None else self.numel * size


@dataclass(frozen=True)
class ValueMeta:
    """A non-tensor leaf: a number, a string, or an object named by its global."""

    name: str
    type: str
    value: str


@dataclass(frozen=True)
class FileStructure:
    """What :func:`inspect_file` found in one file.

    Attributes:
        format: ``"zip"`` (torch.save's default), ``"legacy"`` (torch.save with
            ``_use_new_zipfile_serialization=False``, as DeepSpeed's own engine writes without a
            config), ``"safetensors"``, or ``"unknown"``.
        tensors: every tensor, named by its path in the saved object (``module.fc.weight``).
        values: every other leaf (numbers, strings, objects of other classes).
        globals: every ``module.Name`` the pickle refers to (what safe loading must allow).
        storages: storage key -> bytes, as recorded in the file.
        notes: what could not be determined, and why.
        error: why the file could not be described (None when it could).
    """

    path: Path
    format: str
    size: int
    tensors: list[TensorMeta] = field(default_factory=list)
    values: list[ValueMeta] = field(default_factory=list)
    globals: list[str] = field(default_factory=list)
    storages: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data the file holds (each storage once)."""
        if self.storages:
            return sum(self.storages.values())
        return sum(t.nbytes or 0 for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "size": self.size,
            "tensor_bytes": self.tensor_bytes,
            "tensors": [
                {
                    "name": t.name, "shape": list(t.shape), "dtype": t.dtype, "device": t.device,
                    "numel": t.numel, "nbytes": t.nbytes, "storage": t.storage, "offset": t.offset,
                    "parameter": t.parameter, "requires_grad": t.requires_grad, "kind": t.kind,
                }
                for t in self.tensors
            ],
            "values": [{"name": v.name, "type": v.type, "value": v.value} for v in self.values],
            "globals": self.globals,
            "notes": self.notes,
            "error": self.error,
        }


# -- the inert unpickler ------------------------------------------------------------------------
class _Stub:
    """An instance of a global we do not import: it records what the pickle gave it."""

    _global = "?"
    # set per instance by __new__ / __setstate__
    _args: tuple[Any, ...]
    _kwargs: dict[str, Any]
    _state: Any
    _mapping: list[tuple[Any, Any]]
    _list: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        obj = object.__new__(cls)
        obj.__dict__.update(_args=args, _kwargs=kwargs, _state=None, _mapping=[], _list=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._mapping.append((key, value))

    def append(self, value: Any) -> None:
        self._list.append(value)

    def extend(self, values: Any) -> None:
        self._list.extend(values)

    def __repr__(self) -> str:
        return f"<{self._global}>"


class _Tensor:
    """A tensor's description, built by the stand-ins for torch's rebuild functions."""

    def __init__(self, shape, dtype, device, storage=None, offset=0, requires_grad=False, kind="tensor"):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.device = device
        self.storage = storage
        self.offset = int(offset)
        self.requires_grad = bool(requires_grad)
        self.parameter = False
        self.kind = kind


@dataclass
class _Storage:
    key: str
    dtype: str
    device: str
    numel: int


@dataclass(frozen=True)
class _Dtype:
    name: str


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> str:
        return _STORAGE_DTYPES.get(self.name, "unknown")


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, _Dtype):
        return dtype.name
    if isinstance(dtype, _StorageType):
        return dtype.dtype
    return "unknown"


def _storage_fields(storage: Any) -> tuple[str, str | None, str | None]:
    if isinstance(storage, _Storage):
        return storage.dtype, storage.device, storage.key
    return "unknown", None, None


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    dtype, device, key = _storage_fields(storage)
    return _Tensor(size, dtype, device, key, storage_offset, requires_grad)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _, device, key = _storage_fields(storage)
    return _Tensor(size, _dtype_name(dtype), device, key, storage_offset, requires_grad)


def _rebuild_qtensor(storage, storage_offset, size, stride, quantizer_params, requires_grad, backward_hooks):
    dtype, device, key = _storage_fields(storage)
    return _Tensor(size, dtype, device, key, storage_offset, requires_grad, kind="quantized")


def _rebuild_meta(dtype, size, stride, requires_grad):
    return _Tensor(size, _dtype_name(dtype), "meta", requires_grad=requires_grad)


def _rebuild_wrapper_subclass(cls, dtype, size, stride, storage_offset, layout, device, requires_grad):
    return _Tensor(size, _dtype_name(dtype), str(device), None, storage_offset, requires_grad, kind=_global_of(cls))


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if isinstance(data, _Tensor):
        data.parameter = True
        data.requires_grad = bool(requires_grad)
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    result = func(*args) if callable(func) else None
    if isinstance(result, _Tensor) and _global_of(new_type) not in ("torch.Tensor", "torch.nn.parameter.Parameter"):
        result.kind = _global_of(new_type)
    return result


def _device(*args):
    return ":".join(str(a) for a in args if a is not None)


def _size(dims=()):
    return tuple(dims)


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles of bytes: _codecs.encode(str, 'latin1'). Nothing else is honoured.
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin-1")
    raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not supported")


_SPECIAL: dict[str, Any] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_qtensor": _rebuild_qtensor,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta,
    "torch._utils._rebuild_wrapper_subclass": _rebuild_wrapper_subclass,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.device": _device,
    "torch.Size": _size,
    "_codecs.encode": _codecs_encode,
    # Standard containers: real, side-effect-free types, so mappings read as mappings.
    "collections.OrderedDict": collections.OrderedDict,
    "collections.defaultdict": collections.defaultdict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "builtins.slice": slice,
}


def _global_of(obj: Any) -> str:
    if isinstance(obj, type) and issubclass(obj, _Stub):
        return obj._global
    if isinstance(obj, _Stub):
        return obj._global
    for name, special in _SPECIAL.items():
        if obj is special:
            return name
    return type(obj).__name__


class _InertUnpickler(pickle.Unpickler):
    """Resolves every global to an inert stand-in; records the names it was asked for."""

    def __init__(self, file, storages: dict[str, _Storage] | None = None, seen: set[str] | None = None):
        super().__init__(file, encoding="utf-8")
        self.storages = storages if storages is not None else {}
        self.seen = seen if seen is not None else set()
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles (torch.save's) spell some names the Python 2 way (__builtin__.set).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        dotted = f"{module}.{name}"
        self.seen.add(dotted)
        if dotted in _SPECIAL:
            return _SPECIAL[dotted]
        if module in ("torch", "torch.cuda", "torch.storage"):
            if name in _ITEMSIZE or name in _DTYPE_ALIASES:
                return _Dtype(_DTYPE_ALIASES.get(name, name))
            if name.endswith("Storage"):
                return _StorageType(name)
        stub = self._stubs.get(dotted)
        if stub is None:
            stub = type(f"_Stub_{len(self._stubs)}", (_Stub,), {"_global": dotted})
            self._stubs[dotted] = stub
        return stub

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        kind = _ascii(pid[0])
        if kind == "storage" and len(pid) >= 5:
            storage_type, key, location, numel = pid[1], _ascii(pid[2]), _ascii(pid[3]), pid[4]
            dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else "unknown"
            if key not in self.storages:
                self.storages[key] = _Storage(key, dtype, location, int(numel))
            storage = self.storages[key]
            view = pid[5] if len(pid) > 5 else None
            if view:  # legacy storage view: (view_key, offset, view_size)
                return _Storage(_ascii(view[0]), storage.dtype, storage.device, int(view[2]))
            return storage
        if kind == "module":  # legacy format: the source of a saved nn.Module class
            return self.find_class("torch.nn", "Module")
        raise pickle.UnpicklingError(f"unexpected persistent id kind {kind!r}")


def _ascii(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


# -- walking the loaded tree -------------------------------------------------------------------
_SCALARS = (int, float, complex, bool, str, bytes, type(None))


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _walk(obj: Any, name: str, seen: set[int]) -> Iterator[TensorMeta | ValueMeta]:
    if isinstance(obj, _Tensor):
        yield TensorMeta(name, obj.shape, obj.dtype, obj.device, obj.storage, obj.offset, obj.parameter,
                         obj.requires_grad, obj.kind)  # fmt: skip
        return
    if isinstance(obj, _SCALARS):
        yield ValueMeta(name, type(obj).__name__, _short(obj))
        return
    if id(obj) in seen:  # shared or cyclic container: described once
        return
    seen.add(id(obj))
    prefix = f"{name}." if name else ""
    if isinstance(obj, dict):
        if not obj:
            yield ValueMeta(name, type(obj).__name__, "{}")
        for key, value in obj.items():
            yield from _walk(value, f"{prefix}{key}", seen)
    elif isinstance(obj, (list, tuple)):
        if not obj:
            yield ValueMeta(name, type(obj).__name__, repr(obj))
        elif all(isinstance(v, (int, float, bool)) for v in obj) and len(obj) > 0:
            yield ValueMeta(name, type(obj).__name__, _short(obj))  # a shape, a list of betas ...
        else:
            for i, value in enumerate(obj):
                yield from _walk(value, f"{prefix}{i}", seen)
    elif isinstance(obj, (set, frozenset)):
        yield ValueMeta(name, type(obj).__name__, f"{len(obj)} items")
    elif isinstance(obj, _Stub):
        parts = [(f"{prefix}{k}", v) for k, v in obj._mapping] + [(f"{prefix}{i}", v) for i, v in enumerate(obj._list)]
        state = obj._state
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots)
        if isinstance(state, dict) and all(isinstance(k, str) for k in state):
            parts += [(f"{prefix}{k}", v) for k, v in state.items()]
        if parts:
            for sub, value in parts:
                yield from _walk(value, sub, seen)
        else:
            args = ", ".join(_short(a, 20) for a in obj._args if isinstance(a, _SCALARS))
            yield ValueMeta(name, obj._global, f"{obj._global}({args})")
    elif isinstance(obj, (_Dtype, _StorageType)):
        yield ValueMeta(name, "torch.dtype", _dtype_name(obj))
    else:
        yield ValueMeta(name, _global_of(obj), _short(obj))


def _describe(root: Any) -> tuple[list[TensorMeta], list[ValueMeta]]:
    tensors: list[TensorMeta] = []
    values: list[ValueMeta] = []
    for i, leaf in enumerate(_walk(root, "", set())):
        if i >= _MAX_LEAVES:
            values.append(ValueMeta("...", "truncated", f"more than {_MAX_LEAVES} leaves; the rest is not listed"))
            break
        cast("list[Any]", tensors if isinstance(leaf, TensorMeta) else values).append(leaf)
    return tensors, values


# -- the formats ---------------------------------------------------------------------------------
def inspect_file(path: str | os.PathLike) -> FileStructure:
    """Describe one checkpoint file without reading its tensor data.

    Never raises for a bad file: a file that cannot be described comes back with ``error`` set
    (and whatever was found before the problem).

    Example:
        >>> s = inspect_file("ckpts/step-100/model.pt")
        >>> [(t.name, t.shape, t.dtype, t.device) for t in s.tensors][:1]
        [('fc.weight', (4, 8), 'float32', 'cuda:0')]
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return FileStructure(path, "unknown", 0, error=f"cannot read {path.name}: {e.strerror or e}")
    try:
        if head.startswith(b"PK\x03\x04"):
            return _inspect_zip(path, size)
        if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
            return _inspect_safetensors(path, size)
        if head[:1] == b"\x80":
            return _inspect_legacy(path, size)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, zipfile.BadZipFile, RecursionError, MemoryError, OSError) as e:  # fmt: skip
        fmt = "zip" if head.startswith(b"PK") else "legacy" if head[:1] == b"\x80" else "unknown"
        return FileStructure(path, fmt, size, error=f"{path.name} is not a readable torch.save file: "
                                                    f"{type(e).__name__}: {e}")
    return FileStructure(
        path, "unknown", size, error=f"{path.name} is neither a torch.save file (zip or legacy) nor a safetensors file"
    )


def _result(path: Path, fmt: str, size: int, root: Any, unpickler: _InertUnpickler, storage_bytes: dict[str, int],
            notes: list[str]) -> FileStructure:  # fmt: skip
    tensors, values = _describe(root)
    return FileStructure(path, fmt, size, tensors, values, sorted(unpickler.seen), storage_bytes, notes)


def _inspect_zip(path: Path, size: int) -> FileStructure:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pkl:
            hint = " (a TorchScript archive? load it with torch.jit.load)" if any("/code/" in n for n in names) else ""
            return FileStructure(path, "zip", size, error=f"{path.name} is a zip file without data.pkl{hint}")
        info = zf.getinfo(pkl[0])
        if info.file_size > MAX_PICKLE_BYTES:
            return FileStructure(path, "zip", size, error=f"{path.name}: data.pkl is {info.file_size} bytes, over "
                                                          "the inspection limit")
        prefix = pkl[0][: -len("data.pkl")]
        unpickler = _InertUnpickler(io.BytesIO(_read_member(zf, path, info)))
        root = unpickler.load()
        storage_bytes = {}
        notes = []
        for key in unpickler.storages:
            try:
                storage_bytes[key] = zf.getinfo(f"{prefix}data/{key}").file_size
            except KeyError:
                notes.append(f"storage {key} is referenced but missing from the archive (truncated file?)")
    return _result(path, "zip", size, root, unpickler, storage_bytes, notes)


def _read_member(zf: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo) -> bytes:
    """One stored member's bytes, read directly: torchckpt's own saves carry no zip CRC-32
    (torch.load never checks it; the manifest's checksum covers the file), which
    ``ZipFile.open`` would report as corruption."""
    if info.compress_type != zipfile.ZIP_STORED:
        with zf.open(info) as f:
            return f.read()
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if header[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"no local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        data = f.read(info.compress_size)
    if len(data) != info.compress_size:
        raise EOFError(f"{info.filename} is cut short")
    return data


def _inspect_legacy(path: Path, size: int) -> FileStructure:
    with open(path, "rb") as f:
        header = _InertUnpickler(f)
        magic = header.load()
        if magic != _LEGACY_MAGIC:
            return FileStructure(path, "unknown", size, error=f"{path.name} is a pickle, not a torch.save file (no "
                                                              "magic number)")
        protocol = header.load()
        if protocol != _LEGACY_PROTOCOL:
            return FileStructure(path, "legacy", size, error=f"{path.name}: unsupported legacy protocol {protocol!r}")
        header.load()  # sys_info: byte order and C type sizes
        unpickler = _InertUnpickler(f)
        root = unpickler.load()
        keys = [_ascii(k) for k in _InertUnpickler(f).load()]
        data_start = f.tell()
    storage_bytes = {}
    for key in keys:
        st = unpickler.storages.get(key)
        if st is not None:
            storage_bytes[key] = st.numel * _ITEMSIZE.get(st.dtype, 1)
    notes = [
        (
            "legacy (non-zip) torch format: it cannot be memory-mapped, so loading it reads the whole file into "
            "memory; storage sizes are computed from element counts, not read from an index"
        )
    ]
    expected = data_start + sum(8 + n for n in storage_bytes.values())
    if expected != size:
        notes.append(f"file is {size} bytes but its storages need {expected}: truncated or padded")
    return _result(path, "legacy", size, root, unpickler, storage_bytes, notes)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= min(size - 8, MAX_SAFETENSORS_HEADER) and head[8:9] == b"{"


def _inspect_safetensors(path: Path, size: int) -> FileStructure:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            return FileStructure(path, "safetensors", size, error=f"{path.name}: header length {n} is impossible "
                                                                  "(truncated file?)")
        header = json.loads(f.read(n))
    tensors, values = [], []
    data_bytes = 0
    for name, entry in header.items():
        if name == "__metadata__":
            values += [ValueMeta(f"__metadata__.{k}", "str", _short(v)) for k, v in (entry or {}).items()]
            continue
        start, end = entry["data_offsets"]
        data_bytes = max(data_bytes, int(end))
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())
        tensors.append(TensorMeta(name, tuple(int(d) for d in entry["shape"]), dtype, None, name, int(start)))
    notes = ["safetensors does not record the device tensors were saved on"]
    if 8 + n + data_bytes != size:
        notes.append(f"file is {size} bytes but its header describes {8 + n + data_bytes}: truncated or padded")
    nbytes = {t.name: t.nbytes or 0 for t in tensors}
    return FileStructure(path, "safetensors", size, tensors, values, [], nbytes, notes)


_TORCH_OWN = {"collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.bytearray", "builtins.set",
              "builtins.complex"}  # fmt: skip


def foreign_globals(structure: FileStructure) -> dict[str, str]:
    """Globals beyond torch's own that a file names, each with how safe loading treats it.

    ``"allowed"``: on torchckpt's shipped allowlist; ``"needs --allow"``: safe loading refuses
    the file unless the caller allows it (``allow=[...]``, ``--allow``) or trusts the file.
    """
    extra = [g for g in structure.globals if not g.startswith("torch.") and g not in _TORCH_OWN]
    if not extra:
        return {}
    from .serialization import DEFAULT_ALLOWLIST  # imports torch

    return {g: "allowed" if g in DEFAULT_ALLOWLIST else "needs --allow" for g in extra}
