"""What torchckpt shows: the result objects of every surface, and how they are rendered.

One presentation layer for the notebook (``_repr_html_``), the panel and the terminal (``to_text``,
``torchckpt``'s output): the result classes (:class:`SaveResult`, :class:`LoadResult`,
:class:`TagList`, :class:`TagDetails`, :class:`VerifyResult`, :class:`RemoveResult`), each with
``to_dict()`` (plain JSON, what ``--json`` prints); the checkpoint table's columns and status
vocabulary (:data:`COLUMNS`, :data:`STATUS_MEANINGS`, :func:`status`, :func:`row`, :func:`record`);
sizes, times, truncation and display-width-aligned tables.

Nothing here imports torch, and the API modules below it (store, manifest, layout) import nothing
from here.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .layout import MANIFEST_NAME, RNG_FILE, origin

if TYPE_CHECKING:
    from .store import CheckpointInfo, VerifyReport


# -- words, sizes and times -----------------------------------------------------------------
#: The columns of the checkpoint table, in order (``torchckpt ls``, ``%ckpt ls``, the panel).
COLUMNS: tuple[str, ...] = ("tag", "created", "size", "step", "metrics", "note", "status", "latest")

#: What each status means; the CLI's ``ls --help`` and the docs show this.
STATUS_MEANINGS: dict[str, str] = {
    "committed": "complete: the manifest lists every file with its checksum",
    "incomplete": "no manifest: never committed (crashed or aborted save); gc removes it when torchckpt wrote it "
                  "(a directory another tool wrote is kept)",
    "writing": "a process is writing it now; gc and rm leave it alone",
    "unreadable": "the manifest exists but cannot be read; see `torchckpt info`",
    "deepspeed": "written by DeepSpeed's own engine (no manifest); inspect it, `torchckpt adopt` it",
}
#: A tag this kernel saved and has not committed yet (``%ckpt ls`` and the panel; never on disk alone).
STATUS_MEANINGS_IN_KERNEL: dict[str, str] = {"pending": "saved by this kernel, not committed"}
#: How the panel colours each status (the words are the same everywhere).
STATUS_COLOURS: dict[str, str] = {
    "committed": "#2e7d32",
    "pending": "#1565c0",
    "writing": "#1565c0",
    "incomplete": "#e65100",
    "unreadable": "#c62828",
    "deepspeed": "#616161",
}

_NOTE_WIDTH = 40
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; bytes below 1 KiB are shown exactly."""
    n = float(n)
    if n < 1024:
        return f"{int(n)} B"
    exp = min(int(math.log(n, 1024)), len(_UNITS) - 1)
    value = n / 1024**exp
    if round(value, 1) >= 1024 and exp < len(_UNITS) - 1:  # 1023.96 KiB -> 1.0 MiB
        exp, value = exp + 1, value / 1024
    return f"{value:.1f} {_UNITS[exp]}"


def format_time(ts: float) -> str:
    """A local wall-clock time, to the second: ``'2026-11-30 04:48:35'``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def iso_time(ts: float) -> str:
    """UTC, ISO 8601, to the second: ``'2026-11-30T04:48:35Z'`` (the manifest's ``created_iso``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def format_value(value: Any) -> str:
    """A metric value: floats to 4 significant digits, everything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_metrics(metrics: Any) -> str:
    """``{'loss': 0.1234567, 'acc': 0.9}`` -> ``'loss=0.1235 acc=0.9'``."""
    if not metrics:
        return ""
    if not isinstance(metrics, Mapping):
        return format_value(metrics)
    return " ".join(f"{k}={format_value(v)}" for k, v in metrics.items())


def one_line(text: Any, width: int = _NOTE_WIDTH) -> str:
    """Collapse whitespace (newlines included) and cut to ``width`` characters with '...'."""
    if text is None:
        return ""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def status(info: CheckpointInfo) -> str:
    """The status column: the store's status, with ``deepspeed`` for DeepSpeed's own checkpoints."""
    if not info.committed and not info.in_flight and not info.problem and origin(info.path) == "deepspeed":
        return "deepspeed"
    return info.status


def row(info: CheckpointInfo) -> dict[str, str]:
    """The table's cells for one tag, keyed by :data:`COLUMNS`."""
    meta = info.meta
    return {
        "tag": info.tag,
        "created": format_time(info.created),
        "size": human_size(info.size),
        "step": "" if meta.step is None else str(meta.step),
        "metrics": format_metrics(meta.metrics),
        "note": one_line(meta.note),
        "status": status(info),
        "latest": "*" if info.is_latest else "",
    }


def record(info: CheckpointInfo) -> dict[str, Any]:
    """One tag as plain JSON for scripts (``torchckpt ls --json``); values unformatted."""
    meta = info.meta
    return {
        "tag": info.tag,
        "path": str(info.path),
        "status": status(info),
        "committed": info.committed,
        "in_flight": info.in_flight,
        "latest": info.is_latest,
        "created": info.created,
        "created_iso": iso_time(info.created),
        "size": info.size,
        "files": len(info.manifest.files) if info.manifest else None,
        "step": meta.step,
        "metrics": meta.metrics or None,
        "note": meta.note,
        "problem": info.problem,
    }


def width(text: str) -> int:
    """Columns ``text`` takes in a terminal: wide (CJK) characters take two, combining marks none."""
    import unicodedata

    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def pad(text: str, columns: int) -> str:
    """``text`` padded with spaces to ``columns`` terminal columns (``str.ljust`` counts characters)."""
    return text + " " * max(0, columns - width(text))


def render_table(rows: Iterable[Mapping[str, str]], columns: Sequence[str] = COLUMNS) -> str:
    """Left-aligned plain-text columns under a header line (aligned by display width)."""
    rows = list(rows)
    shown = list(columns)
    widths = {c: max([width(c), *(width(r.get(c, "")) for r in rows)]) for c in shown}
    lines = ["  ".join(pad(c, widths[c]) for c in shown).rstrip()]
    lines += ["  ".join(pad(r.get(c, ""), widths[c]) for c in shown).rstrip() for r in rows]
    return "\n".join(lines)


def positive_int(text: str) -> int:
    """argparse type for counts such as ``--keep-last N`` (shared by %ckpt and the CLI)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# -- tables ------------------------------------------------------------------------------------
class Result:
    """Shown as a table in notebooks (``_repr_html_``) and as text elsewhere; ``quiet`` results
    show only their one-line repr."""

    quiet: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # IPython's pretty printer takes the first of _repr_pretty_/__repr__ it finds walking
        # the MRO: each result defines __repr__, so each needs _repr_pretty_ of its own.
        cast(Any, cls)._repr_pretty_ = Result._repr_pretty_  # (mypy rejects assigning to a method)

    def _repr_html_(self) -> str | None:
        return None if self.quiet else self.to_html()

    def _repr_pretty_(self, p, cycle: bool) -> None:
        p.text(repr(self) if self.quiet or cycle else self.to_text())

    def __str__(self) -> str:
        return self.to_text()

    def to_html(self) -> str:
        raise NotImplementedError

    def to_text(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON values (what ``--json`` prints): its fields, with paths as
        strings, errors as ``"Type: message"`` and nested results as dicts."""
        import dataclasses

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(cast(Any, self))
                if f.name != "quiet"}


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses as dicts, paths as strings, errors as text."""
    import dataclasses

    if isinstance(value, Result):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)

_STYLE = "border-collapse:collapse;font-size:90%"
_CELL = "padding:2px 8px;text-align:left;border-bottom:1px solid #ddd"


def size(nbytes: int | None) -> str:
    return "?" if nbytes is None else human_size(nbytes)


def when(timestamp: float | None) -> str:
    return format_time(timestamp) if timestamp else ""


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> str:
    head = "".join(f'<th style="{_CELL}">{html.escape(str(h))}</th>' for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td style="{_CELL}">{html.escape(str(c))}</td>' for c in row) + "</tr>" for row in rows
    )
    caption = f"<div><b>{html.escape(title)}</b></div>" if title else ""
    return f'{caption}<table style="{_STYLE}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def html_lines(lines: Sequence[str]) -> str:
    return "".join(f"<div>{html.escape(line)}</div>" for line in lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(width(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title] if title else []
    for n, row in enumerate(cells):
        lines.append("  ".join(pad(c, w) for c, w in zip(row, widths, strict=False)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- results ------------------------------------------------------------------------------------
_Result = Result


@dataclass
class SavedObject:
    """One object of a save: its name, kind, class, file and size (None while being written)."""

    name: str
    kind: str
    type: str
    file: str | None
    size: int | None = None


@dataclass
class SaveResult(_Result):
    """The outcome of :meth:`Checkpointer.save` or :meth:`Checkpointer.commit`.

    ``status`` is ``committed``; ``committing`` (async, commit follows the writes);
    ``writing`` (async, not to be committed); ``uncommitted`` (written, not committed);
    or ``failed`` (``error`` says why).
    """

    tag: str
    root: Path
    objects: list[SavedObject]
    status: str
    async_save: bool = False
    seconds: float = 0.0
    step: int | None = None
    note: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    replaced: bool = False
    error: BaseException | None = None
    #: What the save left out or changed, and why (objects skipped by a save with no names...).
    notes: list[str] = field(default_factory=list)
    #: The checkpoint's size as ``ls`` shows it: every file of the tag (objects, RNG states...).
    checkpoint_size: int | None = None
    #: The tag this save branched from (the namespace's last load or save; None for the first).
    parent: str | None = None
    #: name -> the tag whose identical file it shares (a hard link: no new bytes on disk).
    linked: dict[str, str] = field(default_factory=dict)
    quiet: bool = field(default=False, repr=False, compare=False)

    @property
    def committed(self) -> bool:
        return self.status == "committed"

    @property
    def size(self) -> int | None:
        sizes = [o.size for o in self.objects]
        return None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]

    def __repr__(self) -> str:
        names = ", ".join(self.names)
        notes = f" ({len(self.notes)} note{'s' if len(self.notes) != 1 else ''}: see .notes)" if self.notes else ""
        return f"<SaveResult {self.tag!r} {self.status}: {names}{notes}>"

    def _headline(self) -> str:
        what = {
            "committed": "committed",
            "committing": "saving in the background; commits when written",
            "writing": "saving in the background; not committed (commit it with %ckpt commit)",
            "uncommitted": "saved, not committed (commit it with %ckpt commit)",
            "failed": f"FAILED: {self.error}",
        }[self.status]
        extra = [f"step {self.step}"] if self.step is not None else []
        if self.checkpoint_size is not None:
            extra.append(size(self.checkpoint_size))
        elif self.size is not None:
            extra.append(size(self.size))
        if self.seconds:
            extra.append(duration(self.seconds))
        if self.replaced:
            extra.append("replaced the previous checkpoint of that tag")
        if self.parent is not None:
            extra.append(f"from {self.parent}")
        return f"{self.tag}: {what}" + (f" ({', '.join(extra)})" if extra else "")

    def _rows(self) -> list[list[str]]:
        return [[o.name, o.kind, o.type.rsplit(".", 1)[-1], size(o.size) if o.size is not None else "…"]
                for o in self.objects]

    def to_html(self) -> str:
        return html_table(["object", "kind", "type", "size"], self._rows(), title=self._headline()) + (
            html_lines([f"note: {n}" for n in self.notes]))

    def to_text(self) -> str:
        text = text_table(["object", "kind", "type", "size"], self._rows(), title=self._headline())
        return "\n".join([text] + [f"note: {n}" for n in self.notes])


@dataclass
class LoadedObject:
    """One restored object: ``action`` is ``restored`` (in place), ``assigned`` (the name was
    bound to the saved value) or ``into`` (bound to ``target``)."""

    name: str
    kind: str
    action: str
    target: str


@dataclass
class LoadResult(_Result):
    """The outcome of :meth:`Checkpointer.load`."""

    tag: str
    root: Path
    objects: list[LoadedObject]
    rng: bool
    seconds: float
    size: int
    notes: list[str] = field(default_factory=list)
    #: Why the RNG states were (not) restored, for the headline.
    rng_reason: str = ""
    #: The whole checkpoint's size (``size`` is what this load read of it).
    checkpoint_size: int | None = None
    quiet: bool = field(default=False, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]

    def __repr__(self) -> str:
        return f"<LoadResult {self.tag!r}: {', '.join(self.names)}{' + rng' if self.rng else ''}>"

    def _headline(self) -> str:
        rng = "RNG states restored" if self.rng else "RNG states left as they were"
        rng += f" ({self.rng_reason})" if self.rng_reason else ""
        read = size(self.size)
        if self.checkpoint_size is not None and self.checkpoint_size != self.size:
            read = f"read {read} of {size(self.checkpoint_size)}"
        return f"{self.tag}: loaded ({read}, {duration(self.seconds)}); {rng}"

    def _rows(self) -> list[list[str]]:
        how = {"restored": "restored in place", "assigned": "assigned", "into": "loaded into"}
        return [[o.name, o.kind, how[o.action] + (f" {o.target}" if o.action == "into" else "")]
                for o in self.objects]

    def to_html(self) -> str:
        return html_table(["object", "kind", "action"], self._rows(), title=self._headline()) + (
            html_lines([f"note: {n}" for n in self.notes]))

    def to_text(self) -> str:
        text = text_table(["object", "kind", "action"], self._rows(), title=self._headline())
        return "\n".join([text] + [f"note: {n}" for n in self.notes])


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies inside it (shorter, and stable)."""
    try:
        return path.relative_to(Path.cwd()).as_posix() or "."
    except ValueError:
        return str(path)


def _objects_of(info: CheckpointInfo) -> dict[str, dict[str, Any]]:
    """The notebook objects of a tag, as the manifest records them (checked by ``CheckpointMeta``)."""
    return {n: {"kind": o.kind, "type": o.type, "file": o.file} for n, o in info.meta.objects.items()}


@dataclass
class TagList(_Result):
    """Every tag under the root (:meth:`Checkpointer.list`), oldest first."""

    root: Path
    infos: list[CheckpointInfo]
    pending: list[str] = field(default_factory=list)
    quiet: bool = field(default=False, repr=False, compare=False)

    @property
    def tags(self) -> list[str]:
        return [i.tag for i in self.infos]

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "pending": list(self.pending),
                "checkpoints": [{**record(i), "objects": list(_objects_of(i))} for i in self.infos]}

    def __len__(self) -> int:
        return len(self.infos)

    def __iter__(self):
        return iter(self.infos)

    def __repr__(self) -> str:
        return f"<TagList {len(self.infos)} tags in {str(self.root)!r}>"

    _HEADERS = COLUMNS + ("objects",)

    def _rows(self) -> list[list[str]]:
        rows = []
        for i in self.infos:
            cells = row(i)
            if i.tag in self.pending:
                cells["status"] = "pending"
            cells["objects"] = ", ".join(_objects_of(i))
            rows.append([cells[c] for c in self._HEADERS])
        return rows

    def to_html(self) -> str:
        if not self.infos:
            return html_lines([f"no checkpoints in {_shown(self.root)}"])
        return html_table(self._HEADERS, self._rows(), title=_shown(self.root))

    def to_text(self) -> str:
        if not self.infos:
            return f"no checkpoints in {_shown(self.root)}"
        return text_table(self._HEADERS, self._rows(), title=_shown(self.root))


@dataclass
class TagDetails(_Result):
    """One tag in detail: what ``%ckpt info``, ``Checkpointer.info`` and ``torchckpt info`` show.

    ``structures`` (file path -> :class:`~torchckpt.file_structure.FileStructure`, from
    :meth:`with_structures`) adds each file's tensors, read from its pickle alone; ``more_hint`` is
    how the surface says "list every value" (``torchckpt``: its options).
    """

    info: CheckpointInfo
    structures: dict[str, Any] | None = None
    all_values: bool = False
    more_hint: str = "all_values=True lists them"
    quiet: bool = field(default=False, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"<TagDetails {self.info.tag!r} {self.info.status}>"

    def with_structures(self, files: Iterable[str] | None = None, *, all_values: bool = False) -> TagDetails:
        """These details with the structure of ``files`` (default: every file), read without torch."""
        from dataclasses import replace

        from .file_structure import inspect_file

        wanted = [f["path"] for f in self.files()] if files is None else list(files)
        return replace(self, structures={rel: inspect_file(self.info.path / rel) for rel in wanted},
                       all_values=all_values)

    def files(self) -> list[dict[str, Any]]:
        """Each file: path, size, checksum (None without a manifest) and the rank that wrote it."""
        from .store import scan_files

        i = self.info
        if i.manifest is not None:
            return [{"path": f.path, "size": f.size, "checksum": f.checksum, "rank": f.rank}
                    for f in i.manifest.files.values()]
        return [{"path": rel, "size": (i.path / rel).stat().st_size, "checksum": None, "rank": None}
                for rel in scan_files(i.path)]

    @property
    def failed(self) -> bool:
        """A structure could not be read, or the tag's manifest could not."""
        return bool(self.info.problem) or any(s.error for s in (self.structures or {}).values())

    def to_dict(self) -> dict[str, Any]:
        """What ``torchckpt info --json`` prints."""
        i = self.info
        doc: dict[str, Any] = record(i)
        doc["status_meaning"] = STATUS_MEANINGS.get(status(i), "")
        if i.manifest is not None:
            doc["world_size"] = i.manifest.world_size
            doc["versions"] = i.manifest.versions
            doc["metadata"] = i.manifest.metadata
            doc["parent"] = i.meta.parent
            doc["objects"] = plain(_objects_of(i))
        doc["file_list"] = self.files()
        if self.structures is not None:
            doc["structure"] = {rel: st.to_dict() for rel, st in self.structures.items()}
        return doc

    def _summary(self) -> list[str]:
        i, meta = self.info, self.info.meta
        st = status(i)
        files = self.files()
        lines = [
            f"tag:        {i.tag}",
            f"path:       {i.path}",
            f"status:     {st}{', latest' if i.is_latest else ''} - {STATUS_MEANINGS.get(st, '')}",
            f"created:    {format_time(i.created)} ({iso_time(i.created)})",
            f"size:       {human_size(i.size)} in {len(files)} file{'' if len(files) == 1 else 's'}",
        ]
        if i.problem:
            lines.append(f"problem:    {i.problem}")
        if st == "deepspeed":
            lines.append(f"adopt:      torchckpt adopt {i.path.parent} {i.tag}   (checks every file loads, writes "
                         "a manifest)")
        if i.manifest is not None:
            lines.append(f"world size: {i.manifest.world_size}")
            lines.append("versions:   " + ", ".join(f"{k} {v}" for k, v in sorted(i.manifest.versions.items())))
            if meta.step is not None:
                lines.append(f"step:       {meta.step}")
            if meta.metrics:
                lines.append(f"metrics:    {format_metrics(meta.metrics)}")
            if meta.note:
                lines.append(f"note:       {meta.note}")
            if "parent" in i.metadata:  # lineage.PARENT_KEY
                lines.append(f"parent:     {_parent_line(i)}")
            shown = {"step", "metrics", "note", "parent", "objects", "rng", "format"}
            rest = {k: v for k, v in i.metadata.items() if k not in shown}
            if rest:
                import json

                lines.append(f"metadata:   {json.dumps(rest, sort_keys=True, default=str)}")
            for problem in meta.problems:
                lines.append(f"ignored:    {problem}")
        return lines

    def _table(self) -> tuple[list[str], list[list[str]]]:
        owners = {o.get("file"): (name, o.get("kind", "")) for name, o in _objects_of(self.info).items()}
        structures = self.structures or {}
        rows = []
        for f in self.files():
            owner, kind = owners.get(f["path"], ("rng" if f["path"] == RNG_FILE else "", ""))
            st = structures.get(f["path"])
            rows.append([f["path"], owner, kind, human_size(f["size"]), st.format if st else "",
                         str(len(st.tensors)) if st and not st.error else "", f["checksum"] or "(none)"])
        headers = ["file", "object", "kind", "size", "format", "tensors", "checksum"]
        keep = [n for n, h in enumerate(headers) if h in ("file", "size", "checksum") or any(r[n] for r in rows)]
        return [headers[n] for n in keep], [[r[n] for n in keep] for r in rows]

    def _structure_lines(self) -> list[str]:
        out: list[str] = []
        for rel, st in (self.structures or {}).items():
            out += ["", *_structure(rel, st, all_values=self.all_values, more_hint=self.more_hint)]
        return out

    def to_html(self) -> str:
        headers, rows = self._table()
        extra = self._structure_lines()
        return (html_lines(self._summary()) + html_table(headers, rows)
                + (f"<pre>{html.escape(chr(10).join(extra))}</pre>" if extra else ""))

    def to_text(self) -> str:
        headers, rows = self._table()
        table = render_table([dict(zip(headers, r, strict=True)) for r in rows], headers)
        return "\n".join([*self._summary(), "", table, *self._structure_lines()])


def _structure(rel: str, s: Any, *, all_values: bool, more_hint: str) -> list[str]:
    """One file's structure as text: its tensors, other values and the classes its pickle names."""
    from .file_structure import foreign_globals

    if s.error:
        return [f"{rel}: ERROR {s.error}"]
    n = len(s.tensors)
    out = [f"{rel}: {s.format} format, {n} tensor{'' if n == 1 else 's'}, {human_size(s.tensor_bytes)} of tensor data"]
    if s.tensors:
        rows = [
            {"name": t.name, "shape": "[" + ", ".join(map(str, t.shape)) + "]", "dtype": t.dtype,
             "device": t.device or "-",
             "kind": ("parameter" if t.parameter else "") + ("" if t.kind == "tensor" else t.kind)}
            for t in s.tensors
        ]  # fmt: skip
        cols = ("name", "shape", "dtype", "device") + (("kind",) if any(r["kind"] for r in rows) else ())
        out += ["  " + line for line in render_table(rows, cols).splitlines()]
    values = s.values if all_values else s.values[:12]
    if values:
        out.append("  other values:")
        out += [f"    {v.name}: {v.value}" if "." in v.type else f"    {v.name} = {v.value}" for v in values]
        if len(s.values) > len(values):
            out.append(f"    ... {len(s.values) - len(values)} more ({more_hint})")
    extra = foreign_globals(s)
    if extra:
        out.append("  classes beyond torch's own: " + ", ".join(f"{name} ({how})" for name, how in extra.items()))
    out += [f"  note: {n}" for n in s.notes]
    return out


def _parent_line(info: CheckpointInfo) -> str:
    """``step-100``, ``step-100 (removed)``, ``none (the first save)``, or why it was refused."""
    from .lineage import parent_of  # lineage renders through this module

    parent, problem = parent_of(info.metadata)
    if problem:
        return problem
    if parent is None:
        return "none (the first save of its lineage)"
    if not (info.path.parent / parent / MANIFEST_NAME).is_file():
        return f"{parent} ({'removed' if not (info.path.parent / parent).exists() else 'not committed'})"
    return parent


@dataclass
class VerifyResult(_Result):
    """The outcome of :meth:`Checkpointer.verify`: every problem, by file."""

    report: VerifyReport
    quiet: bool = field(default=False, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.report.ok

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict[str, Any]:
        r = self.report
        return {"tag": r.tag, "ok": r.ok, "files_checked": r.files_checked, "problems": list(r.problems)}

    def __repr__(self) -> str:
        return f"<VerifyResult {self.report.tag!r} {'OK' if self.ok else 'FAILED'}>"

    def _lines(self) -> list[str]:
        r = self.report
        if r.ok:
            return [f"{r.tag}: OK, {r.files_checked} files match the manifest"]
        return [f"{r.tag}: FAILED, {len(r.problems)} problem(s)"] + [f"  {p}" for p in r.problems]

    def to_html(self) -> str:
        return html_lines(self._lines())

    def to_text(self) -> str:
        return "\n".join(self._lines())


@dataclass
class RemoveResult(_Result):
    """What :meth:`Checkpointer.remove` or :meth:`Checkpointer.gc` removed (or would remove)."""

    removed: list[str]
    kept: list[str] = field(default_factory=list)
    leftovers: int = 0
    dry_run: bool = False
    quiet: bool = field(default=False, repr=False, compare=False)

    def __repr__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return f"<RemoveResult {verb} {len(self.removed)}: {', '.join(self.removed)}>"

    def _lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb}: {', '.join(self.removed) if self.removed else 'nothing'}"]
        if self.leftovers:
            lines.append(f"{verb} {self.leftovers} leftover temporary file(s)")
        if self.kept:
            lines.append(f"kept: {', '.join(self.kept)}")
        return lines

    def to_html(self) -> str:
        return html_lines(self._lines())

    def to_text(self) -> str:
        return "\n".join(self._lines())
