"""How torchckpt turns objects into bytes and back: torch.save's zip format, safe loading.

Saving always uses torch's zip format (readable by plain ``torch.load`` and memory-mappable).
Loading is ``weights_only=True`` unless the caller says ``trusted=True``; globals a checkpoint
needs beyond torch's own are allowed only when they are on :data:`DEFAULT_ALLOWLIST` (DeepSpeed's
and the standard library's harmless objects that DeepSpeed checkpoints contain) or named by the
caller in ``allow``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Union

import torch

from . import _safe_unpickle
from .errors import DeviceUnavailableError, NotTorchFileError, TorchckptError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

MapLocation = Union[None, str, torch.device, dict, Callable]  # noqa: UP007 - a runtime alias
Allow = Iterable[str | type | Callable]

#: Globals found in checkpoints that DeepSpeed itself writes (ZeRO stages 0-3, fp16/bf16,
#: schedulers), each a plain enum, dataclass-like value or container with no side effects.
DEFAULT_ALLOWLIST: tuple[str, ...] = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "argparse.Namespace",
    "collections.defaultdict",
    "collections.OrderedDict",
    "builtins.set",
    "builtins.frozenset",
    "builtins.slice",
    "builtins.complex",
    "builtins.bytes",  # pickle protocol 2 (torch.save's) writes b"" as bytes()
    "builtins.bytearray",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Float32DType",
    "numpy.dtypes.Int64DType",
    "numpy.dtypes.Int32DType",
    "numpy.dtypes.UInt32DType",
    "numpy.dtypes.BoolDType",
)


def save(obj: Any, stream, *, crc32: bool = False) -> None:
    """Serialise ``obj`` into a binary stream in torch's zip format, readable by plain torch.load.

    As ``torch.save``, except that by default the zip records carry no CRC-32: torch.load never
    checks it, our manifest's xxh3-128 covers every byte of the file, and computing it costs
    ~0.35 s per GiB on one core here (a third of a synchronous save). Zip tools (``unzip -t``,
    Python's ``zipfile``) report CRC errors for these files; ``torch.load`` does not. Files no
    manifest will cover (exports outside a tag) pass ``crc32=True``.
    """
    if not _fast_save_available():
        torch.save(obj, stream, _use_new_zipfile_serialization=True)
        return
    # torch.save's own steps, with a writer of our own instead of the global crc32 setting
    # (a process-wide flag that other threads' torch.save calls would see).
    writer = torch._C.PyTorchFileWriter(stream, crc32, torch.serialization._get_storage_alignment())
    try:
        torch.serialization._save(obj, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False)
    except BaseException:
        # An unfinished C++ writer finishes the zip in its destructor; after a failed write
        # (disk full, file too large) that throws inside the destructor, and std::terminate
        # aborts the whole process - a dead kernel. Finishing it now, ignoring its own error,
        # marks it finished, so the original error reaches the caller instead.
        with contextlib.suppress(Exception):
            writer.write_end_of_file()
        raise
    writer.write_end_of_file()
    stream.flush()


_FAST_SAVE: bool | None = None


def _fast_save_available() -> bool:
    """Whether torch's private save steps have the shape :func:`save` relies on (checked once)."""
    global _FAST_SAVE
    if _FAST_SAVE is None:
        try:
            params = list(inspect.signature(torch.serialization._save).parameters)
            _FAST_SAVE = params == ["obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"]
            _FAST_SAVE = _FAST_SAVE and callable(torch.serialization._get_storage_alignment)
            # the (buffer, crc32, alignment) constructor; torch's stub wants IO[bytes], C++ takes any .write()
            torch._C.PyTorchFileWriter(_NullSink(), False, 64)  # type: ignore[call-overload]
        except (AttributeError, TypeError, ValueError):
            _FAST_SAVE = False
        if not _FAST_SAVE:
            logger.info("torch %s: saving with torch.save (zip CRC-32 computed)", torch.__version__)
    return _FAST_SAVE


class _NullSink:
    def write(self, data) -> int:
        return len(memoryview(data))

    def flush(self) -> None:
        pass


def resolve_global(dotted: str) -> Any:
    """Import ``module.Name`` (nested attributes allowed) and return the object."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise ImportError(f"cannot import {dotted!r}")


def _allowed_globals(needed: list[str], allow: Allow) -> tuple[list[Any], list[str]]:
    """The safe-globals entries for ``needed``, and the names that stay disallowed."""
    by_name: dict[str, Any] = {}
    names = set(DEFAULT_ALLOWLIST)
    for item in allow:
        if isinstance(item, str):
            names.add(item)
        else:
            by_name[f"{item.__module__}.{item.__qualname__}"] = item
    entries, missing = [], []
    for name in needed:
        if name in by_name:
            entries.append((by_name[name], name))
        elif name in names:
            try:
                entries.append((resolve_global(name), name))
            except ImportError:
                missing.append(name)
        else:
            missing.append(name)
    return entries, missing


def _unsafe_error(path: Path, missing: list[str]) -> UnsafeCheckpointError:
    shown = ", ".join(missing)
    return UnsafeCheckpointError(
        f"{path} needs globals that safe loading does not allow: {shown}. "
        f"If you trust them, pass allow=[{', '.join(repr(m) for m in missing)}] "
        "(or the objects themselves); if you trust the whole file, pass trusted=True "
        "(this runs arbitrary pickled code)",
        missing,
    )


def resolve_map_location(map_location: MapLocation) -> MapLocation:
    """``"auto"`` becomes the current CUDA device when there is one, else ``"cpu"``."""
    if isinstance(map_location, str) and map_location == "auto":
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if isinstance(map_location, str) and map_location.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"map_location={map_location!r} but CUDA is not available here; use map_location='cpu' or 'auto'"
        )
    return map_location


def load(
    path: str | Path,
    *,
    map_location: MapLocation = None,
    allow: Allow = (),
    trusted: bool = False,
    mmap: bool = True,
) -> Any:
    """Load one file written by torch.save, safely by default.

    Args:
        path: the file.
        map_location: anything ``torch.load`` accepts, or ``"auto"``.
        allow: extra globals to allow, as objects or ``"module.Name"`` strings.
        trusted: load with ``weights_only=False`` (runs arbitrary pickled code).
        mmap: memory-map the file (zip format only) instead of reading it into memory first.

    A safe load of a memory-mapped zip file runs CPython's C unpickler when one pass over the
    pickle proves it does only what torch's weights-only unpickler would (``_safe_unpickle``);
    other files go through torch's weights-only unpickler.

    Raises:
        UnsafeCheckpointError: the file needs globals that are not allowed, or holds what
            ``torch.save`` never writes (tensors with backward hooks, a storage larger than its
            record).
        DeviceUnavailableError: tensors were saved on a device this machine lacks.
    """
    path = Path(path)
    location = resolve_map_location(map_location)
    is_zip = _is_zip(path)
    if not is_zip and not _is_pickle(path):
        raise NotTorchFileError(f"{path} is not a torch.save file (zip or legacy) nor safetensors")
    use_mmap = mmap and is_zip
    if trusted:
        return _torch_load(path, location, weights_only=False, mmap=use_mmap)
    if use_mmap:  # the C unpickler, where it provably does only what the weights-only one would
        try:
            return _safe_unpickle.load(path, location)
        except _safe_unpickle.Decline as e:
            logger.debug("%s: loading with torch's weights-only unpickler (%s)", path, e)
        except _safe_unpickle.Refused as e:
            raise UnsafeCheckpointError(
                f"{path} holds {e}, which torch.save never writes: it is corrupt or crafted; "
                "if you trust the whole file, pass trusted=True (this runs arbitrary pickled code)",
                [],
            ) from None
    entries: list[Any] = []
    if is_zip:  # the zip format lets us list every global up front, without unpickling
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        entries, missing = _allowed_globals(needed, allow)
        if missing:
            raise _unsafe_error(path, missing)
    while True:  # the legacy format reveals its globals one refusal at a time
        try:
            with torch.serialization.safe_globals(entries):
                return _torch_load(path, location, weights_only=True, mmap=use_mmap)
        except Exception as e:
            text = str(e)
            if "Unsupported global" not in text and "Weights only load failed" not in text:
                if is_zip or isinstance(e, TorchckptError):
                    raise
                # A pickle stream torch's unpickler chokes on (IndexError, KeyError, UnicodeDecodeError...)
                raise NotTorchFileError(
                    f"{path} is not a torch.save file (zip or legacy) nor safetensors "
                    f"(its pickle stream is damaged: {type(e).__name__})"
                ) from e
            needed = _globals_from_message(text)
            more, missing = _allowed_globals(needed, allow)
            if not needed:  # refused for a reason that is no global: not a file torch wrote
                import re

                reason = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
                raise NotTorchFileError(
                    f"{path} is not a torch.save file (zip or legacy) nor safetensors"
                    + (f" ({reason.group(1).strip()})" if reason and reason.group(1).strip() else "")
                ) from e
            if missing or any(m in entries for m in more):
                raise _unsafe_error(path, missing or needed or ["<unknown>"]) from e
            entries += more


def _torch_load(path: Path, location: MapLocation, *, weights_only: bool, mmap: bool) -> Any:
    try:
        return torch.load(str(path), map_location=location, weights_only=weights_only, mmap=mmap)
    except RuntimeError as e:
        text = str(e)
        if "torch.cuda.is_available() is False" in text or "CUDA device" in text and "not available" in text:
            raise DeviceUnavailableError(
                f"{path} holds tensors saved on a CUDA device and CUDA is not available here; "
                "load with map_location='cpu' (or 'auto')"
            ) from e
        if "Attempting to deserialize object on CUDA device" in text:
            raise DeviceUnavailableError(
                f"{path} holds tensors saved on a CUDA device this machine does not have ({text.splitlines()[0]}); "
                "load with map_location='cuda:0', 'cpu' or 'auto'"
            ) from e
        raise


def _globals_from_message(text: str) -> list[str]:
    import re

    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", text)))


def _is_pickle(path: Path) -> bool:
    """Whether the file starts as a pickle of protocol 2 or later (how legacy torch.save files start)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
