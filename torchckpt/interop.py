"""Checkpoints in and out of torchckpt: safetensors export/import, adopting DeepSpeed's own.

- :func:`export_safetensors` writes a tag's model weights as a ``.safetensors`` file (no pickle,
  shareable); :func:`import_safetensors` commits such a file as a new tag.
- :func:`adopt` gives a tag written without torchckpt (DeepSpeed's own engine writes no manifest)
  a manifest, after loading every file safely to check it, so that it can be verified and loaded
  like any committed tag.

Every function works over a :class:`~torchckpt.store.CheckpointStore` and its manifest machinery;
the CLI (``torchckpt export|import|adopt``) is a shell over them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import serialization
from ._fileio import checksum_file, fsync_dir, tmp_name
from .errors import CheckpointInUseError, TorchckptError
from .inspect import inspect_file, origin
from .manifest import (
    LATEST_NAME,
    FileRecord,
    Manifest,
    current_versions,
    read_manifest,
    validate_tag,
    write_manifest,
)

if TYPE_CHECKING:
    from .store import CheckpointStore

logger = logging.getLogger(__name__)

__all__ = [
    "AdoptError",
    "ExportError",
    "ExportResult",
    "adopt",
    "adoptable",
    "deepspeed_latest",
    "export_safetensors",
    "import_safetensors",
]

_DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
_ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class AdoptError(TorchckptError, ValueError):
    """A tag cannot be adopted: already committed, empty, or a file does not load."""


class ExportError(TorchckptError, ValueError):
    """The weights to export (or import) cannot be found or are not plain tensors."""


# -- adopt ---------------------------------------------------------------------------------------
def adoptable(store: CheckpointStore) -> list[str]:
    """Tags under the root that DeepSpeed's own engine wrote (no manifest, nothing of torchckpt's)."""
    return [i.tag for i in store.list() if not i.committed and not i.in_flight and origin(i.path) == "deepspeed"]


def deepspeed_latest(store: CheckpointStore) -> str | None:
    """The tag DeepSpeed's own ``latest`` file names, if DeepSpeed's own engine wrote that tag.

    The store resolves ``latest`` to committed tags only; on a root that only DeepSpeed's own
    engine wrote there is none, and this is what ``latest`` means to its user.
    """
    try:
        tag = validate_tag((store.root / LATEST_NAME).read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return tag if origin(store.root / tag) == "deepspeed" else None


def adopt(
    store: CheckpointStore,
    tag: str,
    *,
    allow: serialization.Allow = (),
    trusted: bool = False,
    note: str | None = None,
) -> Manifest:
    """Write a manifest for a tag that has none, after checking that every file loads.

    Each file is checksummed, then loaded (weights-only with the allowlist, on CPU, one at a
    time) and dropped; a file that changed in between, or does not load, fails the adoption
    and nothing is written. The manifest records the checksums, DeepSpeed's step and world size
    when the files carry them, and ``metadata["adopted"]``. ``latest`` is left as it is.

    Args:
        store: the checkpoint root.
        tag: the tag directory to adopt.
        allow: extra globals safe loading may allow (as :func:`torchckpt.serialization.load`).
        trusted: load with ``weights_only=False`` (runs arbitrary pickled code).
        note: the manifest's note (default: where the checkpoint came from).

    Returns:
        The manifest written.

    Raises:
        AdoptError: the tag is committed already, has no files, or a file does not load.
        CheckpointInUseError: a torchckpt process is writing the tag.
        TagNotFoundError: no such tag.

    Example:
        >>> adopt(CheckpointStore("checkpoints"), "global_step100").metadata["step"]
        100
    """
    from .store import scan_files

    info = store.info(tag)
    tag, tag_dir = info.tag, info.path
    if info.in_flight:
        raise CheckpointInUseError(f"checkpoint {tag!r} is being written by another process; adopt it after that finishes")
    if info.committed:
        raise AdoptError(f"checkpoint {tag!r} is committed already (it has a manifest); nothing to adopt")
    if info.problem:
        raise AdoptError(
            f"checkpoint {tag!r} has an unreadable manifest ({info.problem}); if its files are good, "
            f"delete {tag}/torchckpt-manifest.json and adopt again"
        )
    files = scan_files(tag_dir)
    if not files:
        raise AdoptError(f"checkpoint {tag!r} has no files to adopt; remove it with `torchckpt rm`")

    records: dict[str, FileRecord] = {}
    found: dict[str, Any] = {}
    newest = 0.0
    for rel in files:
        path = tag_dir / rel
        before = os.stat(path)
        size, checksum = checksum_file(path)
        _check_loads(tag, rel, path, allow=allow, trusted=trusted, found=found)
        after = os.stat(path)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or size != after.st_size:
            raise AdoptError(f"{tag}/{rel} changed while it was being checked; is a job still writing it? Adopt it when it is done")
        records[rel] = FileRecord(rel, size, checksum, None)
        newest = max(newest, after.st_mtime)

    kind = origin(tag_dir)
    adopted = {"origin": kind, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files_loaded": len(records)}
    metadata: dict[str, Any] = {"adopted": adopted}
    if found.get("step") is not None:
        metadata["step"] = found["step"]
    ds_version = found.get("ds_version")
    metadata["note"] = note if note is not None else (
        f"adopted: written by DeepSpeed {ds_version}" if ds_version else f"adopted: written without torchckpt ({kind})"
    )
    versions = current_versions()
    if ds_version:
        versions["deepspeed"] = str(ds_version)
    manifest = Manifest(
        tag=tag,
        created=newest or time.time(),
        files=records,
        world_size=int(found.get("world_size") or 1),
        versions=versions,
        metadata=metadata,
    )
    with store.lock():
        if read_manifest(tag_dir) is not None:
            raise AdoptError(f"checkpoint {tag!r} was committed by another process while it was being adopted; nothing written")
        write_manifest(tag_dir, manifest)
    logger.info("adopted checkpoint %s in %s (%d files)", tag, store.root, len(records))
    return manifest


def _check_loads(tag: str, rel: str, path: Path, *, allow: serialization.Allow, trusted: bool, found: dict) -> None:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    f.get_slice(name)
        except Exception as e:  # noqa: BLE001 - any failure means the file is not adoptable
            raise AdoptError(f"{tag}/{rel} is not a readable safetensors file ({e}); remove it or restore it from a copy") from e
        return
    try:
        obj = serialization.load(path, map_location="cpu", allow=allow, trusted=trusted)
    except TorchckptError as e:
        raise AdoptError(f"{tag}/{rel} does not load: {e}") from e
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise AdoptError(
            f"{tag}/{rel} does not load ({type(e).__name__}: {e}); it is damaged or not a torch.save file - "
            "restore it from a copy, or move it out of the tag directory"
        ) from e
    if isinstance(obj, Mapping):  # DeepSpeed's model states carry the step and the world size
        if isinstance(obj.get("global_steps"), int):
            found.setdefault("step", obj["global_steps"])
        if isinstance(obj.get("ds_version"), str):
            found.setdefault("ds_version", obj["ds_version"])
        dp, mp = obj.get("dp_world_size"), obj.get("mp_world_size")
        if isinstance(dp, int) and isinstance(mp, int):
            found.setdefault("world_size", dp * mp)
    del obj


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
    listed = manifest.metadata.get("objects") if manifest is not None else None
    objects = {n: o["file"] for n, o in listed.items() if isinstance(o, dict) and o.get("file") in files} if isinstance(listed, dict) else {}
    if key in objects:  # a notebook save: objects/<key>.pt
        return objects[key], []
    by_name = [f for f in files if f == key or (Path(f).stem == key and Path(f).suffix in _WEIGHT_SUFFIXES)]
    if len(by_name) == 1:
        return by_name[0], []
    if len(by_name) > 1:
        raise ExportError(f"checkpoint {tag!r} has several files named {key!r}: {', '.join(by_name)}; pass the full file name as --key")
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
        raise ExportError(f"checkpoint {tag!r} has no object {key!r}; --key can be one of: {', '.join(sorted(objects))}")
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
        raise ExportError(f"checkpoint {tag!r} has {key!r} in several files ({', '.join(holders)}); name one as --key FILE")
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
    if manifest is not None and manifest.metadata.get("step") is not None:
        metadata["torchckpt.step"] = str(manifest.metadata["step"])
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
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
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
        raise ExportError(f"{src} is not a safetensors file ({structure.error or structure.format}); export one with `torchckpt export`")
    with safe_open(str(src), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(src), device="cpu")
    relpath = f"objects/{key}.pt"
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
