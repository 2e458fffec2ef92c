"""Plain-text rendering shared by the shells (CLI, magics, panel): sizes, times, table rows.

Nothing here touches tensors or imports torch; a row is built from a
:class:`~torchckpt.store.CheckpointInfo` alone (plus, for tags without a manifest, a look at the
file names in the tag directory to tell DeepSpeed's own checkpoints from torchckpt's leftovers).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .layout import origin

if TYPE_CHECKING:
    from .store import CheckpointInfo

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
    meta = info.metadata
    step = meta.get("step")
    return {
        "tag": info.tag,
        "created": format_time(info.created),
        "size": human_size(info.size),
        "step": "" if step is None else str(step),
        "metrics": format_metrics(meta.get("metrics")),
        "note": one_line(meta.get("note")),
        "status": status(info),
        "latest": "*" if info.is_latest else "",
    }


def record(info: CheckpointInfo) -> dict[str, Any]:
    """One tag as plain JSON for scripts (``torchckpt ls --json``); values unformatted."""
    meta = info.metadata
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
        "step": meta.get("step"),
        "metrics": meta.get("metrics"),
        "note": meta.get("note"),
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
