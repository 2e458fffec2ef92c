"""Checkpoints in and out of torchckpt as safetensors.

- :func:`export_safetensors` writes a tag's model weights as a ``.safetensors`` file (no pickle,
  shareable); :func:`import_safetensors` commits such a file as a new tag.

Adopting DeepSpeed's own checkpoints is :mod:`torchckpt.deepspeed.adopt`.

Every function works over a :class:`~torchckpt.store.CheckpointStore` and its manifest machinery;
the CLI (``torchckpt export|import|adopt``) is a shell over them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import serialization
from ._fileio import fsync_dir, fsync_file
from .errors import ExportError
from .file_structure import inspect_file
from .layout import object_file, tmp_name
from .manifest import (
    CheckpointMeta,
    Manifest,
    read_manifest,
    validate_tag,
)

if TYPE_CHECKING:
    from .store import CheckpointStore

logger = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "ExportResult",
    "export_safetensors",
    "import_safetensors",
]

_DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
_ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


# -- export / import -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_safetensors` wrote."""

    path: Path
    tag: str
    source: str
    tensors: int
    nbytes: int
    skipped: list[str] = field(default_factory=list)


def _files_of(store: CheckpointStore, tag: str) -> list[str]:
    from .store import scan_files

    manifest = read_manifest(store.root / tag)
    return sorted(manifest.files) if manifest is not None else scan_files(store.root / tag)


def find_weights(store: CheckpointStore, tag: str, key: str = "model") -> tuple[str, list[str]]:
    """Where a tag keeps the object ``key``: ``(file, path inside the file)``.

    Looked for, in order: the notebook object ``key`` (``objects/model.pt``); a file named
    ``key`` (``model.pt``, ``model.safetensors`` ...);
    DeepSpeed's ``mp_rank_00_model_states.pt`` (its ``module``) when ``key`` is ``model`` or
    ``module``; a file whose top level has the entry ``key`` (read with :func:`inspect_file`,
    no tensor data is loaded).
    """
    files = _files_of(store, tag)
    manifest = read_manifest(store.root / tag)
    listed = CheckpointMeta.parse(manifest.metadata).objects if manifest is not None else {}
    objects = {n: o.file for n, o in listed.items() if o.file in files}
    if key in objects:  # a notebook save: objects/<key>.pt
        return objects[key], []
    by_name = [f for f in files if f == key or (Path(f).stem == key and Path(f).suffix in _WEIGHT_SUFFIXES)]
    if len(by_name) == 1:
        return by_name[0], []
    if len(by_name) > 1:
        raise ExportError(f"checkpoint {tag!r} has several files named {key!r}: {', '.join(by_name)}; pass the full "
                          "file name as --key")
    if key in ("model", "module"):
        if any(_ZERO3_MODEL_FILE.match(Path(f).name) for f in files):
            raise ExportError(_zero3_message(tag))
        ds = [f for f in files if f.endswith("model_states.pt") and "optim" not in f]
        if _DEEPSPEED_MODEL_FILE in ds and len(ds) == 1:
            return _DEEPSPEED_MODEL_FILE, ["module"]
        if len(ds) > 1:
            raise ExportError(
                f"checkpoint {tag!r} splits the model over {len(ds)} files ({', '.join(ds[:3])}...: tensor or pipeline "
                "parallel); export handles one model file - consolidate the checkpoint first"
            )
    if objects:  # a notebook save: its objects are what there is to export
        raise ExportError(f"checkpoint {tag!r} has no object {key!r}; --key can be one of: "
                          f"{', '.join(sorted(objects))}")
    holders = []
    tops: set[str] = set()
    for f in files:
        structure = inspect_file(store.root / tag / f)
        top = {t.name.split(".", 1)[0] for t in structure.tensors}
        tops |= top
        if key in top:
            holders.append(f)
    if len(holders) == 1:
        return holders[0], [key]
    if len(holders) > 1:
        raise ExportError(f"checkpoint {tag!r} has {key!r} in several files ({', '.join(holders)}); name one as "
                          "--key FILE")
    names = sorted({Path(f).stem for f in files} | tops)
    raise ExportError(f"checkpoint {tag!r} has no {key!r} weights; --key can be one of: {', '.join(names) or '(none)'}")


def _zero3_message(tag: str) -> str:
    return (
        f"checkpoint {tag!r} was saved with ZeRO stage 3: its weights are partitioned over the optimizer files; "
        "consolidate them with DeepSpeed's zero_to_fp32.py (in the checkpoint root) into a safetensors file "
        "(--safe_serialization) and `torchckpt import` that"
    )


def flatten_tensors(obj: Any, prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """Tensors of a nested mapping, keyed by dotted path; and the names of non-tensor leaves."""
    import torch

    tensors: dict[str, Any] = {}
    skipped: list[str] = []
    if isinstance(obj, torch.Tensor):
        return {prefix or "tensor": obj}, []
    if not isinstance(obj, Mapping):
        return {}, [prefix or type(obj).__name__]
    for k, v in obj.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, torch.Tensor):
            tensors[name] = v
        elif isinstance(v, Mapping):
            sub, skip = flatten_tensors(v, name)
            tensors.update(sub)
            skipped += skip
        else:
            skipped.append(name)
    return tensors, skipped


def _independent(tensors: dict[str, Any]) -> dict[str, Any]:
    """Contiguous, dense CPU tensors with no shared memory (safetensors refuses aliasing)."""
    import torch

    out: dict[str, Any] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        t = t.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        storage = t.untyped_storage()
        ident = (storage.data_ptr(), storage.nbytes())
        if ident in seen or t.numel() * t.element_size() != storage.nbytes():
            t = t.contiguous().clone()  # tied weights, views: an own copy each
        else:
            seen.add(ident)
            t = t.contiguous()
        out[name] = t
    return out


def export_safetensors(
    store: CheckpointStore,
    tag: str,
    out: str | os.PathLike,
    *,
    key: str = "model",
    allow: serialization.Allow = (),
    trusted: bool = False,
    allow_incomplete: bool = False,
) -> ExportResult:
    """Write the model weights of a tag as a safetensors file (atomically).

    Args:
        store: the checkpoint root.
        tag: the tag (``"latest"`` allowed).
        out: the ``.safetensors`` file to write.
        key: which object: a file name (``model`` finds ``model.pt``), DeepSpeed's module
            (``model``), or a top-level entry of a file (see :func:`find_weights`).
        allow, trusted: as for :meth:`CheckpointStore.load`.
        allow_incomplete: export from a tag without a manifest (not verified).

    Returns:
        An :class:`ExportResult`; non-tensor entries are left out and listed in ``skipped``.

    Raises:
        ExportError: no such weights, no tensors, or ZeRO-3 partitioned weights.
    """
    out = Path(out)
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise ExportError(f"{out.parent} {what}; create it first (nothing was written)")
    tag = store.resolve(tag, allow_incomplete=allow_incomplete)
    rel, inner = find_weights(store, tag, key)
    if rel.endswith(".safetensors"):
        from safetensors.torch import load_file

        _verify_one(store, tag, rel)
        obj: Any = load_file(str(store.root / tag / rel), device="cpu")
    else:
        obj = store.load(tag, rel, map_location="cpu", allow=allow, trusted=trusted, allow_incomplete=allow_incomplete)
    if inner == ["module"] and isinstance(obj, Mapping):
        stage = ((obj.get("ds_config") or {}).get("zero_optimization") or {}).get("stage")
        if stage == 3:
            raise ExportError(_zero3_message(tag))
    for part in inner:
        obj = obj[part]
    tensors, skipped = flatten_tensors(obj)
    if not tensors:
        raise ExportError(f"{tag}/{rel}{'[' + key + ']' if inner else ''} holds no tensors; choose another --key")
    tensors = _independent(tensors)
    source = f"{rel}:{'.'.join(inner)}" if inner else rel
    metadata = {"format": "pt", "torchckpt.tag": tag, "torchckpt.source": source}
    manifest = read_manifest(store.root / tag)
    step = CheckpointMeta.parse(manifest.metadata).step if manifest is not None else None
    if step is not None:
        metadata["torchckpt.step"] = str(step)
    _save_safetensors_atomic(tensors, out, metadata)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    logger.info("exported %d tensors from %s/%s to %s", len(tensors), tag, source, out)
    return ExportResult(out, tag, source, len(tensors), nbytes, skipped)


def _verify_one(store: CheckpointStore, tag: str, rel: str) -> None:
    from .errors import CorruptCheckpointError
    from .store import _check_file

    manifest = read_manifest(store.root / tag)
    rec = manifest.files.get(rel) if manifest is not None else None
    if rec is not None and (problem := _check_file(store.root / tag, rec)):
        raise CorruptCheckpointError(f"checkpoint {tag!r} is corrupt: {problem}; restore it from a copy")


def _save_safetensors_atomic(tensors: dict[str, Any], out: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = tmp_name(out)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # a file to share: the mode any other tool would give it
        fsync_file(tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(out.parent)


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def import_safetensors(
    store: CheckpointStore,
    src: str | os.PathLike,
    tag: str,
    *,
    key: str = "model",
    note: str | None = None,
    save_latest: bool = True,
) -> Manifest:
    """Commit a safetensors file as a new tag, as the notebook saves a module: ``objects/<key>.pt``.

    The tensors are loaded on CPU and saved in torch's format as a plain state dict, recorded
    as the notebook object ``key`` of kind ``module``: ``%ckpt load TAG model`` (or
    ``Checkpointer.load(TAG, names=["model"])``) loads them into a live module, and
    ``store.load(tag, "objects/model.pt")`` reads them. The safetensors metadata
    ``torchckpt.step`` (written by :func:`export_safetensors`) becomes the tag's step.

    Raises:
        ExportError: the tag exists already, or ``src`` is not a safetensors file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .notebook import FORMAT as NOTEBOOK_FORMAT

    src = Path(src)
    tag = validate_tag(tag)
    if not key.isidentifier():
        raise ExportError(f"--key {key!r} is not a Python name; the notebook restores objects by name, e.g. 'model'")
    if (store.root / tag).exists():
        raise ExportError(f"checkpoint {tag!r} exists already in {store.root}; choose another tag, or remove it first")
    structure = inspect_file(src)
    if structure.format != "safetensors" or structure.error:
        raise ExportError(f"{src} is not a safetensors file ({structure.error or structure.format}); export one with "
                          "`torchckpt export`")
    with safe_open(str(src), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(src), device="cpu")
    relpath = object_file(key)
    metadata: dict[str, Any] = {
        "format": NOTEBOOK_FORMAT,
        "note": note if note is not None else f"imported from {src.name}",
        "imported_from": src.name,
        "objects": {key: {"kind": "module", "type": "safetensors", "file": relpath}},
    }
    step = meta.get("torchckpt.step")
    if step is not None and step.lstrip("-").isdigit():
        metadata["step"] = int(step)
    with store.transaction(tag) as tx:
        tx.write(relpath, tensors)
        return tx.commit(metadata=metadata, save_latest=save_latest)
