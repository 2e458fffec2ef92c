"""Result objects shown in notebooks (HTML tables) and terminals (plain text).

Sizes and times are formatted by :mod:`torchckpt._format`, shared with the CLI and the panel.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any, cast

from . import _format


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

_STYLE = "border-collapse:collapse;font-size:90%"
_CELL = "padding:2px 8px;text-align:left;border-bottom:1px solid #ddd"


def size(nbytes: int | None) -> str:
    return "?" if nbytes is None else _format.human_size(nbytes)


def when(timestamp: float | None) -> str:
    return _format.format_time(timestamp) if timestamp else ""


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
    widths = [max(_format.width(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title] if title else []
    for n, row in enumerate(cells):
        lines.append("  ".join(_format.pad(c, w) for c, w in zip(row, widths, strict=False)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
