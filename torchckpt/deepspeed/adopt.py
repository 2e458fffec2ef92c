"""Adopting checkpoints DeepSpeed's own engine wrote: a manifest for a tag that has none.

:func:`adopt` loads every file of such a tag safely (weights-only, zip CRCs checked), then writes
a manifest with their checksums, DeepSpeed's step and world size, so the tag is verified and
loaded like any committed one. Imports neither torch nor DeepSpeed until a file is loaded.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fileio import checksum_file
from ..errors import AdoptError, CheckpointInUseError, TorchckptError
from ..layout import origin
from ..manifest import (
    FileRecord,
    Manifest,
    current_versions,
    read_manifest,
    write_manifest,
)

if TYPE_CHECKING:
    from .. import serialization
    from ..store import CheckpointStore

logger = logging.getLogger(__name__)

__all__ = ["AdoptError", "adopt", "adoptable", "deepspeed_latest"]


def adoptable(store: CheckpointStore) -> list[str]:
    """Tags under the root that DeepSpeed's own engine wrote (no manifest, nothing of torchckpt's)."""
    return [i.tag for i in store.list() if not i.committed and not i.in_flight and origin(i.path) == "deepspeed"]


def deepspeed_latest(store: CheckpointStore) -> str | None:
    """The tag DeepSpeed's own ``latest`` file names, if DeepSpeed's own engine wrote that tag.

    The store resolves ``latest`` to committed tags only; on a root that only DeepSpeed's own
    engine wrote there is none, and this is what ``latest`` means to its user.
    """
    return store.deepspeed_latest()


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
    from ..store import scan_files

    info = store.info(tag)
    tag, tag_dir = info.tag, info.path
    if info.in_flight:
        raise CheckpointInUseError(f"checkpoint {tag!r} is being written by another process; adopt it after that "
                                   "finishes")
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
            raise AdoptError(f"{tag}/{rel} changed while it was being checked; is a job still writing it? Adopt it "
                             "when it is done")
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
            raise AdoptError(f"checkpoint {tag!r} was committed by another process while it was being adopted; "
                             "nothing written")
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
            raise AdoptError(f"{tag}/{rel} is not a readable safetensors file ({e}); remove it or restore it from a "
                             "copy") from e
        return
    from .. import serialization  # imports torch
    from ..store import torn_zip_problem

    if problem := torn_zip_problem(path):
        raise AdoptError(f"{tag}/{rel} is torn: {problem}; restore it from a copy, or move it out of the tag directory")
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
