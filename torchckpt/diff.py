"""What changed between two checkpoints: keys, shapes, dtypes, per-tensor max |Δ|, metadata.

Used by ``%ckpt diff``, the panel and ``torchckpt diff``. Notebook tags are compared object by
object (``model/fc.weight``); other tags (DeepSpeed's) file by file
(``mp_rank_00_model_states.pt/fc.weight``). Keys are normalised first — a leading ``module.``
(DDP, DeepSpeed) and any ``_orig_mod.`` (``torch.compile``) are dropped — so a compiled or
wrapped model compares with a plain one (pytorch#94575). One object's files are loaded at a
time (weights-only, verified, memory-mapped), so memory stays near the largest object.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import results
from .state import normalise_key
from .store import CheckpointInfo, CheckpointStore

#: Tensors are compared in slices of this many elements, so a diff needs little extra memory.
_CHUNK = 1 << 24
#: How many rows of each kind the rendered diff shows (the result object holds them all).
SHOW = 20
_META_SKIP = frozenset({"objects", "format", "rng", "parent", "content_keys"})  # bookkeeping, not results


@dataclass
class CheckpointDiff(results.Result):
    """The differences from tag ``a`` to tag ``b``.

    Attributes:
        objects_added, objects_removed: saved objects (or files) only in ``b`` / only in ``a``.
        keys_added, keys_removed: ``object/key`` entries only in ``b`` / only in ``a``.
        shape_changes, dtype_changes: ``(key, in a, in b)``.
        deltas: ``key -> max |b - a|`` for every tensor compared (0.0 when equal).
        relative: ``key -> ‖b - a‖ / ‖a‖`` (2-norms) for every tensor compared, in the order of the
            saved state (a module's: module order); ``inf`` when ``a`` is all zeros and ``b`` is not.
        value_changes: non-tensor entries that differ, ``(key, repr in a, repr in b)``.
        metadata_changes: step, metrics, note, versions..., ``(key, in a, in b)``.
    """

    a: str
    b: str
    objects_added: list[str] = field(default_factory=list)
    objects_removed: list[str] = field(default_factory=list)
    keys_added: list[str] = field(default_factory=list)
    keys_removed: list[str] = field(default_factory=list)
    shape_changes: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    dtype_changes: list[tuple[str, str, str]] = field(default_factory=list)
    deltas: dict[str, float] = field(default_factory=dict)
    relative: dict[str, float] = field(default_factory=dict)
    value_changes: list[tuple[str, str, str]] = field(default_factory=list)
    metadata_changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    quiet: bool = field(default=False, repr=False, compare=False)

    @property
    def changed_tensors(self) -> dict[str, float]:
        """Tensors whose values differ, largest change first."""
        return dict(sorted(((k, d) for k, d in self.deltas.items() if d != 0), key=lambda kv: (-kv[1], kv[0])))

    @property
    def max_delta(self) -> float:
        return max(self.deltas.values(), default=0.0)

    @property
    def identical(self) -> bool:
        """No difference in objects, keys, shapes, dtypes, values or tensors (metadata aside)."""
        return not (self.objects_added or self.objects_removed or self.keys_added or self.keys_removed
                    or self.shape_changes or self.dtype_changes or self.value_changes or self.changed_tensors)

    def summary(self) -> str:
        parts = []
        if self.objects_added or self.objects_removed:
            parts.append(f"objects +{len(self.objects_added)}/-{len(self.objects_removed)}")
        parts.append(f"{len(self.changed_tensors)} of {len(self.deltas)} tensors changed"
                     + (f" (max |Δ| {self.max_delta:.3g})" if self.changed_tensors else ""))
        for label, items in (("keys added", self.keys_added), ("keys removed", self.keys_removed),
                             ("shape changes", self.shape_changes), ("dtype changes", self.dtype_changes),
                             ("values changed", self.value_changes), ("metadata changes", self.metadata_changes)):
            if items:
                parts.append(f"{len(items)} {label}")
        return f"{self.a} → {self.b}: " + ", ".join(parts)

    def __repr__(self) -> str:
        return f"<CheckpointDiff {self.summary()}>"

    def _sections(self) -> list[tuple[str, list[str], list[list[str]]]]:
        sections = []
        changed = list(self.changed_tensors.items())
        if changed:
            sections.append(("tensors changed", ["key", "max |Δ|"], [[k, f"{d:.3g}"] for k, d in changed]))
        if self.objects_added or self.objects_removed:
            rows = [[o, "added"] for o in self.objects_added] + [[o, "removed"] for o in self.objects_removed]
            sections.append(("objects", ["object", "change"], rows))
        if self.keys_added or self.keys_removed:
            rows = [[k, "added"] for k in self.keys_added] + [[k, "removed"] for k in self.keys_removed]
            sections.append(("keys", ["key", "change"], rows))
        if self.shape_changes or self.dtype_changes:
            rows = [[k, "shape", str(tuple(x)), str(tuple(y))] for k, x, y in self.shape_changes]
            rows += [[k, "dtype", x, y] for k, x, y in self.dtype_changes]
            sections.append(("shapes and dtypes", ["key", "what", self.a, self.b], rows))
        if self.value_changes:
            sections.append(("values", ["key", self.a, self.b], [list(v) for v in self.value_changes]))
        if self.metadata_changes:
            rows = [[k, results.short(x), results.short(y)] for k, x, y in self.metadata_changes]
            sections.append(("metadata", ["key", self.a, self.b], rows))
        return [(title, headers, _cut(rows, len(headers))) for title, headers, rows in sections]

    def to_html(self) -> str:
        parts = [results.html_lines([self.summary()])]
        parts += [results.html_table(h, rows, title=t) for t, h, rows in self._sections()]
        return "".join(parts)

    def to_text(self) -> str:
        parts = [self.summary()]
        parts += [results.text_table(h, rows, title=t) for t, h, rows in self._sections()]
        return "\n\n".join(parts)


def _cut(rows: list[list[str]], width: int) -> list[list[str]]:
    if len(rows) <= SHOW:
        return rows
    return rows[:SHOW] + [[f"… {len(rows) - SHOW} more"] + [""] * (width - 1)]


def diff_tags(store: CheckpointStore, a: str, b: str, *, map_location: Any = "cpu") -> CheckpointDiff:
    """Compare two committed tags of ``store`` (``"latest"`` allowed).

    Raises:
        TagNotFoundError, IncompleteCheckpointError: a tag does not exist or is not committed.
        CorruptCheckpointError, UnsafeCheckpointError: from loading a file.
    """
    tag_a, tag_b = store.resolve(a), store.resolve(b)
    info_a, info_b = store.info(tag_a), store.info(tag_b)
    result = CheckpointDiff(tag_a, tag_b)
    units_a, units_b = _units(info_a), _units(info_b)
    result.objects_removed = [u for u in units_a if u not in units_b]
    result.objects_added = [u for u in units_b if u not in units_a]
    for unit in (u for u in units_a if u in units_b):
        left = _flatten_normalised(store.load(tag_a, units_a[unit], map_location=map_location))
        right = _flatten_normalised(store.load(tag_b, units_b[unit], map_location=map_location))
        _compare(unit, left, right, result)
        del left, right
    result.metadata_changes = _metadata_changes(info_a, info_b)
    return result


def _units(info: CheckpointInfo) -> dict[str, str]:
    """What is compared: notebook objects (name -> file), else the tag's files (path -> path)."""
    meta = info.meta
    if meta.objects:
        units = {n: o.file for n, o in meta.objects.items() if o.file}
        if info.manifest is not None:  # a DeepSpeed engine's files are compared file by file
            owned = set(units.values()) | {meta.rng}
            units.update({p: p for p in info.manifest.files if p not in owned})
        return units
    return {p: p for p in info.manifest.files} if info.manifest is not None else {}


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, leaf)`` for every leaf of nested dicts, lists and tuples."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1] if prefix else "", obj


def _flatten_normalised(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flatten(obj):
        norm = normalise_key(key)
        out[norm if norm not in out else key] = value
    return out


def _compare(unit: str, left: dict[str, Any], right: dict[str, Any], result: CheckpointDiff) -> None:
    name = (lambda k: f"{unit}/{k}") if left.keys() != {""} else (lambda k: unit)
    result.keys_removed += [name(k) for k in left if k not in right]
    result.keys_added += [name(k) for k in right if k not in left]
    for key in (k for k in left if k in right):
        x, y = left[key], right[key]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                result.shape_changes.append((name(key), tuple(x.shape), tuple(y.shape)))
                continue
            if x.dtype != y.dtype:
                result.dtype_changes.append((name(key), str(x.dtype), str(y.dtype)))
            result.deltas[name(key)], result.relative[name(key)] = _change(x, y)
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or not _same(x, y):
            result.value_changes.append((name(key), results.short(_plain(x)), results.short(_plain(y))))


def _plain(v: Any) -> Any:
    return f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else v


def _same(x: Any, y: Any) -> bool:
    try:
        return bool(type(x) is type(y) and x == y)
    except Exception:  # noqa: BLE001 - objects whose == is not a bool compare by repr
        return repr(x) == repr(y)


def max_abs_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``max |y - x|`` over all elements (0.0 for empty tensors), in slices to bound memory.

    Floating tensors are compared in float64 (or complex128), integers exactly, booleans as
    0/1. NaN in the same place on both sides counts as equal; elsewhere it makes the result NaN.
    """
    return _change(x, y)[0]


def _change(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(max |y - x|, ‖y - x‖ / ‖x‖)`` in one pass of slices (see :func:`max_abs_diff`)."""
    if x.numel() == 0:
        return 0.0, 0.0
    fx, fy = x.reshape(-1), y.reshape(-1)
    complex_ = x.is_complex() or y.is_complex()
    worst, diff_sq, base_sq = 0.0, 0.0, 0.0
    for start in range(0, fx.numel(), _CHUNK):
        a, b = fx[start:start + _CHUNK], fy[start:start + _CHUNK]
        if complex_:
            d = (b.to(torch.complex128) - a.to(torch.complex128)).abs()
        elif x.dtype == torch.bool and y.dtype == torch.bool:
            d = (a != b).to(torch.float64)
        else:
            d = (b.to(torch.float64) - a.to(torch.float64)).abs()
            both_nan = torch.isnan(a.to(torch.float64)) & torch.isnan(b.to(torch.float64))
            d = d.masked_fill(both_nan, 0.0)
        if torch.isnan(d).any():
            return float("nan"), float("nan")
        worst = max(worst, float(d.max()))
        diff_sq += float((d * d).sum())
        base = a.to(torch.complex128).abs() if complex_ else a.to(torch.float64)
        base_sq += float((base * base).nansum())
    if diff_sq == 0.0:
        return worst, 0.0
    return worst, (diff_sq ** 0.5) / (base_sq ** 0.5) if base_sq > 0 else float("inf")


def _metadata_changes(a: CheckpointInfo, b: CheckpointInfo) -> list[tuple[str, Any, Any]]:
    def flat(info: CheckpointInfo) -> dict[str, Any]:
        md = {k: v for k, v in info.metadata.items() if k not in _META_SKIP}
        out = {k: v for k, v in flatten(md) if k}
        if info.manifest is not None:
            out.update({f"versions.{k}": v for k, v in info.manifest.versions.items()})
            out["world_size"] = info.manifest.world_size
        return out

    fa, fb = flat(a), flat(b)
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
