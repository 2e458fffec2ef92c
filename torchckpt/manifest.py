"""The manifest: the commit marker of a tag, and the rules for tag and file names.

A tag directory holds ``torchckpt-manifest.json`` once (and only once) the tag is committed.
Its format is documented in docs/ARCHITECTURE.md; :func:`read_manifest` checks it as untrusted
input (it may have been edited by hand or crafted) before anything uses it.
"""

from __future__ import annotations

import json
import math
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ._fileio import fsync_dir, write_bytes_atomic
from .errors import InvalidTagError, ManifestError
from .layout import LATEST_NAME, MANIFEST_NAME, RESERVED_PREFIX

FORMAT = "torchckpt/1"
MAX_TAG_LENGTH = 200
MAX_METADATA_BYTES = 1 << 20


def validate_tag(tag: object) -> str:
    """Return ``tag`` if it is one safe path component, else raise :class:`InvalidTagError`.

    Refused: non-strings, empty strings, ``.`` and ``..``, path separators, control
    characters, leading/trailing whitespace, names starting with ``.torchckpt`` and the
    reserved name ``latest``.
    """
    if not isinstance(tag, str):
        raise InvalidTagError(f"tag must be a string, got {type(tag).__name__} {tag!r}")
    fix = "use letters, digits, '-', '_' and '.' such as 'step-100'"
    if not tag:
        raise InvalidTagError(f"tag is empty; {fix}")
    if tag in (".", ".."):
        raise InvalidTagError(f"tag {tag!r} is not allowed: it names a directory itself; {fix}")
    if "/" in tag or "\\" in tag or "\0" in tag:
        raise InvalidTagError(f"tag {tag!r} contains a path separator; a tag is one directory name; {fix}")
    if any(unicodedata.category(c).startswith("C") for c in tag):
        raise InvalidTagError(f"tag {tag!r} contains a control character; {fix}")
    if tag != tag.strip():
        raise InvalidTagError(f"tag {tag!r} starts or ends with whitespace; {fix}")
    if len(tag) > MAX_TAG_LENGTH:
        raise InvalidTagError(f"tag is {len(tag)} characters long; at most {MAX_TAG_LENGTH} are allowed")
    if tag == LATEST_NAME or tag.startswith(RESERVED_PREFIX):
        raise InvalidTagError(f"tag {tag!r} is reserved by torchckpt; {fix}")
    return tag


def validate_relpath(relpath: str) -> str:
    """A file path inside a tag directory: relative, normalised, no '..', not reserved."""
    p = PurePosixPath(relpath)
    if not p.parts or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or str(p) != relpath:
        raise ManifestError(f"file path {relpath!r} is not a plain relative path inside the tag directory")
    if any(c in relpath for c in "\\\0") or any(unicodedata.category(c).startswith("C") for c in relpath):
        raise ManifestError(f"file path {relpath!r} contains a backslash or control character")
    if p.name == MANIFEST_NAME or p.parts[0].startswith(RESERVED_PREFIX):
        raise ManifestError(f"file path {relpath!r} uses a name reserved by torchckpt")
    return relpath


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """User metadata must be a JSON object of at most 1 MiB with finite numbers."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ManifestError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        text = json.dumps(metadata, allow_nan=False, default=_reject)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"metadata is not plain JSON (str, int, float, bool, None, list, dict): {e}") from e
    except RecursionError as e:
        raise ManifestError("metadata is nested too deeply to be stored as JSON; flatten it") from e
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise ManifestError(
            f"metadata is {len(text.encode())} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed"
            " - save large values as checkpoint files instead"
        )
    return json.loads(text)


def _reject(obj: object) -> Any:
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors / numpy scalars in metrics
        try:
            value = obj.item()
        except (RuntimeError, ValueError) as e:  # a tensor of several elements
            raise TypeError(f"{type(obj).__name__} of shape {tuple(getattr(obj, 'shape', ()))} is not JSON "
                            f"({e})") from e
        if isinstance(value, (int, float, bool)) and not (isinstance(value, float) and not math.isfinite(value)):
            return value
    raise TypeError(f"{type(obj).__name__} value {obj!r} is not JSON")


# -- the metadata torchckpt itself writes, parsed in one place ------------------------------------
@dataclass(frozen=True)
class SavedObjectMeta:
    """One notebook object as a manifest records it: ``{"kind", "type", "file"}``."""

    kind: str
    file: str | None = None
    type: str = ""


@dataclass(frozen=True)
class CheckpointMeta:
    """The fields of a manifest's metadata that torchckpt writes and reads, typed and checked.

    A manifest is untrusted input: a field of the wrong type reads as absent (its default) and
    ``problems`` says which and why, so no reader trips over a hand-edited or foreign manifest and
    every reader sees the same values. Fields: ``step`` (a whole number), ``metrics`` (name ->
    JSON value), ``note``, ``objects`` (the notebook's saved objects), ``rng`` (the notebook's RNG
    file), ``parent`` (the tag a notebook save branched from), ``format``; ``extra`` keeps every
    other key (DeepSpeed's ``adopted``, a user's own).
    """

    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    objects: dict[str, SavedObjectMeta] = field(default_factory=dict)
    rng: str | None = None
    parent: str | None = None
    format: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    KNOWN = ("step", "metrics", "note", "objects", "rng", "parent", "format")

    @classmethod
    def parse(cls, metadata: Any) -> CheckpointMeta:
        if not isinstance(metadata, dict):
            return cls(problems=(f"metadata is a {type(metadata).__name__}, not an object",) if metadata else ())
        problems: list[str] = []

        def take(key: str, ok: Callable[[Any], bool], want: str) -> Any:
            value = metadata.get(key)
            if value is None or ok(value):
                return value
            problems.append(f"{key} is {type(value).__name__} {str(value)[:40]!r}, not {want}")
            return None

        step = take("step", lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number")
        metrics = take("metrics", lambda v: isinstance(v, dict), "an object of name: value")
        note = take("note", lambda v: isinstance(v, str), "text")
        rng = take("rng", lambda v: isinstance(v, str), "a file name")
        fmt = take("format", lambda v: isinstance(v, str), "text")
        parent = take("parent", lambda v: isinstance(v, str), "a tag")
        if parent is not None:
            try:
                parent = validate_tag(parent)
            except InvalidTagError as e:
                problems.append(f"parent {parent[:40]!r} is not a tag ({e})")
                parent = None
        objects: dict[str, SavedObjectMeta] = {}
        for name, entry in (take("objects", lambda v: isinstance(v, dict), "an object") or {}).items():
            if not (isinstance(entry, dict) and isinstance(entry.get("kind"), str)
                    and isinstance(entry.get("file"), (str, type(None)))):
                problems.append(f"objects[{str(name)[:40]!r}] is not {{kind, type, file}}")
                continue
            objects[str(name)] = SavedObjectMeta(entry["kind"], entry.get("file"), str(entry.get("type") or ""))
        extra = {k: v for k, v in metadata.items() if k not in cls.KNOWN}
        return cls(step, dict(metrics or {}), note, objects, rng, parent, fmt, extra, tuple(problems))


@dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint, as the manifest records it."""

    path: str
    size: int
    checksum: str
    rank: int | None = 0


@dataclass(frozen=True)
class Manifest:
    """The commit record of one tag."""

    tag: str
    created: float
    files: dict[str, FileRecord]
    world_size: int = 1
    versions: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> str:
        doc = asdict(self)
        doc["files"] = [asdict(f) for f in self.files.values()]
        doc["created_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str) -> Manifest:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ManifestError(f"manifest {source} is not valid JSON ({e}); the tag is unusable until it is "
                                "re-saved") from e
        except RecursionError as e:  # a crafted manifest must not break listing the whole root
            raise ManifestError(f"manifest {source} is nested too deeply to be a torchckpt manifest") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError(f"manifest {source} is not a {FORMAT} manifest")
        try:
            files: dict[str, FileRecord] = {}
            for entry in doc["files"]:
                rec = FileRecord(
                    path=validate_relpath(str(entry["path"])),
                    size=int(entry["size"]),
                    checksum=str(entry["checksum"]),
                    rank=None if entry.get("rank") is None else int(entry["rank"]),
                )
                if rec.size < 0:
                    raise ManifestError(f"negative size for {rec.path}")
                files[rec.path] = rec
            return cls(
                tag=validate_tag(doc["tag"]),
                created=float(doc["created"]),
                files=files,
                world_size=int(doc.get("world_size", 1)),
                versions={str(k): str(v) for k, v in dict(doc.get("versions", {})).items()},
                metadata=check_metadata(doc.get("metadata", {})),  # the limits a commit enforces
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"manifest {source} is malformed: {e}") from e


def read_manifest(tag_dir: Path) -> Manifest | None:
    """The manifest in ``tag_dir``, None when absent; raises ManifestError when unreadable."""
    path = tag_dir / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {path} is not UTF-8 text; the tag is unusable until it is re-saved") from e
    manifest = Manifest.from_json(text, source=str(path))
    if manifest.tag != tag_dir.name:
        raise ManifestError(f"manifest {path} names tag {manifest.tag!r}, not {tag_dir.name!r}: it was copied or "
                            "edited")
    return manifest


def write_manifest(tag_dir: Path, manifest: Manifest) -> None:
    """Write the commit marker atomically and durably."""
    write_bytes_atomic(tag_dir / MANIFEST_NAME, manifest.to_json().encode())
    fsync_dir(tag_dir)


def current_versions() -> dict[str, str]:
    import sys

    import torch

    from . import __version__

    versions = {"torch": torch.__version__, "torchckpt": __version__, "python": sys.version.split()[0]}
    ds = sys.modules.get("deepspeed")
    if ds is not None and hasattr(ds, "__version__"):
        versions["deepspeed"] = str(ds.__version__)
    else:
        try:
            from importlib.metadata import version

            versions["deepspeed"] = version("deepspeed")
        except Exception:  # noqa: BLE001 - deepspeed is optional at this point
            pass
    return versions
