"""The lineage of a root's checkpoints: which tag each notebook save branched from.

Every :meth:`~torchckpt.notebook.Checkpointer.save` records its *parent* in the manifest's
metadata (``"parent": "step-100"``, or ``null`` for the first save of a namespace): the tag the
saved objects were last loaded from or saved to. :func:`build_log` reads the committed manifests
(no tensor is loaded) and returns a :class:`LineageLog`, drawn newest first like
``git log --graph``::

    * lr-1e-2   step 300  loss=0.41             2 min ago
    | * lr-1e-3 step 300  loss=0.22  latest     1 min ago
    |/
    * base      step 100  loss=0.93             5 min ago

The manifest is untrusted input: a parent that is not a valid tag is shown as invalid and
ignored, a parent that no longer exists (``rm``, ``gc``) is drawn as a ``(removed)`` node so its
children stay together, and a cycle of hand-edited parents is broken, never followed forever.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import results
from .errors import IncompleteCheckpointError, TagNotFoundError
from .manifest import validate_tag

if TYPE_CHECKING:
    from pathlib import Path

    from .store import CheckpointInfo, CheckpointStore

#: The metadata key of a save's parent tag (a tag string, or None for the first save).
PARENT_KEY = "parent"


def parent_of(metadata: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(parent, problem)`` from a manifest's metadata: the parent tag if it is a valid tag
    string (None when absent or null), and why a present value was refused."""
    value = metadata.get(PARENT_KEY)
    if value is None:
        return None, None
    try:
        return validate_tag(value), None
    except ValueError as e:
        return None, f"invalid parent {results.short(value, 40)!r} in the manifest ({e})"


def check_parent(value: Any) -> str | None:
    """A parent about to be written: a valid tag or None (raises InvalidTagError otherwise)."""
    return None if value is None else validate_tag(value)


def age(seconds: float) -> str:
    """``'12 s ago'``, ``'3 min ago'``, ``'2 h ago'``, ``'4 days ago'``."""
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.0f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} days ago"


@dataclass
class Node:
    """One tag of the tree. ``status`` is ``committed``, or for a parent that a child names but that
    is not a committed tag: ``removed``, ``incomplete``, ``writing`` or ``unreadable`` (then the node
    carries no metadata)."""

    tag: str
    parent: str | None
    status: str = "committed"
    step: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    created: float | None = None
    latest: bool = False
    #: Why the recorded parent was ignored (invalid, part of a cycle).
    problem: str | None = None
    children: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {
            "tag": self.tag, "parent": self.parent, "status": self.status, "step": self.step,
            "metrics": self.metrics, "note": self.note, "created": self.created,
            "created_iso": results.iso_time(self.created) if self.created else None,
            "latest": self.latest, "children": list(self.children), "problem": self.problem,
        }


@dataclass
class LineageLog(results.Result):
    """The tree of a root's committed tags (:func:`build_log`), newest first.

    Attributes:
        nodes: tag -> :class:`Node` (removed parents included, with ``status="removed"``).
        order: the tags in display order (children before their parent, newest first).
        graph: one graph prefix per displayed line: ``(tag or None, "* | ...")``; None marks a
            connector line (``|/``) between nodes.
        focus: the tag asked for (then only its ancestors and descendants are shown).
    """

    root: str
    nodes: dict[str, Node]
    order: list[str]
    graph: list[tuple[str | None, str]]
    focus: str | None = None
    now: float = field(default_factory=time.time)
    quiet: bool = field(default=False, repr=False, compare=False)

    @property
    def tags(self) -> list[str]:
        """The committed tags shown, newest first."""
        return [t for t in self.order if self.nodes[t].status == "committed"]

    def parent(self, tag: str) -> str | None:
        return self.nodes[tag].parent

    def ancestors(self, tag: str) -> list[str]:
        """``tag``'s parent, grandparent... (removed ones included), nearest first."""
        out, seen = [], {tag}
        node = self.nodes.get(tag)
        while node is not None and node.parent is not None and node.parent not in seen:
            out.append(node.parent)
            seen.add(node.parent)
            node = self.nodes.get(node.parent)
        return out

    def branches(self) -> dict[str, list[str]]:
        """One line per branch: each leaf -> the committed tags from its root down to it."""
        out = {}
        for tag in reversed(self.order):
            if self.nodes[tag].status == "committed" and not self.nodes[tag].children:
                path = [tag] + self.ancestors(tag)
                out[tag] = [t for t in reversed(path) if t in self.nodes and self.nodes[t].status == "committed"]
        return out

    def __len__(self) -> int:
        return len(self.tags)

    def __repr__(self) -> str:
        leaves = sum(1 for n in self.nodes.values() if n.status == "committed" and not n.children)
        return f"<LineageLog {len(self.tags)} tags, {leaves} branch{'es' if leaves != 1 else ''}>"

    def records(self) -> list[dict[str, Any]]:
        """Every node as plain JSON, in display order (``torchckpt log --json``)."""
        return [self.nodes[t].record() for t in self.order]

    # -- rendering -------------------------------------------------------------------------------
    def _cells(self, tag: str) -> list[str]:
        n = self.nodes[tag]
        if n.status != "committed":
            return [tag, f"({n.status})", "", "", "", ""]
        flags = []
        if n.latest:
            flags.append("latest")
        if n.problem:
            flags.append(n.problem)
        elif n.parent is not None and n.parent in self.nodes and self.nodes[n.parent].status != "committed":
            flags.append(f"parent {n.parent} {self.nodes[n.parent].status}")
        return [tag, "" if n.step is None else f"step {n.step}", results.format_metrics(n.metrics),
                results.one_line(n.note), age(self.now - n.created) if n.created else "", ", ".join(flags)]

    def _empty(self) -> str:
        return f"no committed checkpoints in {self.root}"

    def to_text(self) -> str:
        if not self.order:
            return self._empty()
        rows = [[g] + (self._cells(t) if t is not None else [""] * 6) for t, g in self.graph]
        widths = [max(results.width(r[i]) for r in rows) for i in range(7)]
        return "\n".join("  ".join(results.pad(c, w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows)

    def to_html(self) -> str:
        if not self.order:
            return results.html_lines([self._empty()])
        cell = "padding:0 8px;text-align:left;white-space:nowrap"
        rows = []
        for tag, g in self.graph:
            graph = f'<td style="{cell};font-family:monospace;white-space:pre">{html.escape(g)}</td>'
            if tag is None:
                rows.append(f"<tr>{graph}<td colspan=6></td></tr>")
                continue
            cells = self._cells(tag)
            name = html.escape(cells[0])
            node = self.nodes[tag]
            name = f"<b>{name}</b>" if node.status == "committed" else f"<s>{name}</s>"
            badge = html.escape(cells[5])
            if node.latest:
                badge = badge.replace("latest", '<span style="background:#2a7;color:#fff;border-radius:3px;'
                                                'padding:0 4px">latest</span>', 1)
            rows.append("<tr>" + graph + f'<td style="{cell}">{name}</td>'
                        + "".join(f'<td style="{cell}">{html.escape(c)}</td>' for c in cells[1:5])
                        + f'<td style="{cell}">{badge}</td></tr>')
        title = f"<div><b>{html.escape(self.root)}</b></div>"
        return f'{title}<table style="border-collapse:collapse;font-size:90%">{"".join(rows)}</table>'


# -- building ---------------------------------------------------------------------------------------
def nodes_from(infos: Iterable[CheckpointInfo]) -> dict[str, Node]:
    """The tree's nodes from the store's infos: committed tags, plus a ``removed`` (or
    ``incomplete``) node for each parent named by a child that is not a committed tag."""
    infos = list(infos)
    committed = {i.tag: i for i in infos if i.committed}
    present = {i.tag: i.status for i in infos}
    nodes: dict[str, Node] = {}
    for tag, info in committed.items():
        meta = info.meta  # typed and checked once (manifest.CheckpointMeta)
        parent, problem = parent_of(info.metadata)
        if parent == tag:
            parent, problem = None, "names itself as its parent"
        nodes[tag] = Node(tag, parent, step=meta.step, metrics=meta.metrics, note=meta.note, created=info.created,
                          latest=info.is_latest, problem=problem)
    for node in list(nodes.values()):
        if node.parent is not None and node.parent not in nodes:
            status = present.get(node.parent, "removed")  # incomplete, writing, unreadable
            nodes[node.parent] = Node(node.parent, None, status=status)
    _break_cycles(nodes)
    for node in sorted(nodes.values(), key=_when):
        if node.parent is not None:
            nodes[node.parent].children.append(node.tag)
    return nodes


def _when(node: Node) -> tuple[float, str]:
    return (node.created if node.created is not None else float("-inf"), node.tag)


def _break_cycles(nodes: dict[str, Node]) -> None:
    """Hand-edited manifests may name each other as parents: cut every cycle at its oldest tag."""
    state: dict[str, int] = {}  # 1: on the current walk, 2: known to reach a root
    for start in sorted(nodes.values(), key=_when):
        walk: list[str] = []
        tag: str | None = start.tag
        while tag is not None and state.get(tag) is None:
            state[tag] = 1
            walk.append(tag)
            tag = nodes[tag].parent
        if tag is not None and state.get(tag) == 1:  # back on this walk: a cycle
            cycle = walk[walk.index(tag):]
            oldest = min((nodes[t] for t in cycle), key=_when)
            oldest.problem = f"parent {oldest.parent} ignored (a cycle of parents)"
            oldest.parent = None
        for t in walk:
            state[t] = 2


def _display_order(nodes: dict[str, Node]) -> list[str]:
    """Children before parents, newest first; each subtree contiguous (so forks draw as ``|/``)."""
    latest_in: dict[str, float] = {}

    def newest(tag: str) -> float:  # the newest time in a subtree (iterative: trees may be deep)
        stack, seen = [tag], []
        while stack:
            t = stack.pop()
            seen.append(t)
            stack.extend(c for c in nodes[t].children if c not in latest_in)
        for t in reversed(seen):  # children before parents
            created = nodes[t].created
            own: float = created if created is not None else float("-inf")
            latest_in[t] = max([own] + [latest_in[c] for c in nodes[t].children])
        return latest_in[tag]

    for node in nodes.values():
        if node.parent is None:
            newest(node.tag)
    order: list[str] = []
    roots = sorted((n for n in nodes.values() if n.parent is None), key=lambda n: (latest_in[n.tag], n.tag))
    # Pre-order, oldest subtree first; reversed, it lists each subtree newest first, parent last.
    stack = [r.tag for r in reversed(roots)]
    while stack:
        tag = stack.pop()
        order.append(tag)
        kids = sorted(nodes[tag].children, key=lambda c: (latest_in[c], c))
        stack.extend(reversed(kids))
    order.reverse()
    return order


def draw(nodes: dict[str, Node], order: list[str]) -> list[tuple[str | None, str]]:
    """The ``git log --graph`` lines: one per node (``*``), and ``|/`` connectors where branches join."""
    lanes: list[str | None] = []  # the tag each lane waits for (the parent of its last node)
    lines: list[tuple[str | None, str]] = []
    for tag in order:
        mine = [i for i, t in enumerate(lanes) if t == tag]
        if not mine:
            lanes.append(tag)
            mine = [len(lanes) - 1]
        col = mine[0]
        # The other lanes waiting for this tag are the last ones (subtrees are contiguous):
        # fold them in from the right, one connector line per lane.
        for extra in reversed(mine[1:]):
            # lane `extra` moves left into its neighbour ("| |/"); lanes right of it shift too
            text = " ".join("|" for _ in range(extra)) + "/" + "".join(" /" for _ in lanes[extra + 1:])
            lines.append((None, text))
            del lanes[extra]
        lines.append((tag, " ".join("*" if i == col else "|" for i in range(len(lanes)))))
        lanes[col] = nodes[tag].parent
        if lanes[col] is None:
            del lanes[col]
            if not lanes and tag != order[-1]:
                lines.append((None, ""))  # another tree follows: keep them apart
    return lines


def build_log(store: CheckpointStore, tag: str | None = None, *, now: float | None = None) -> LineageLog:
    """The lineage tree of ``store``'s committed tags (manifests only; nothing is loaded).

    Args:
        store: the root.
        tag: show only this tag's ancestors and descendants (``"latest"`` allowed).

    Raises:
        TagNotFoundError: ``tag`` does not exist (the message names the nearest tags).
        IncompleteCheckpointError: ``tag`` is not committed.
    """
    infos = store.list()
    if tag is None:
        return log_from_infos(store.root, infos, now=now)
    nodes = nodes_from(infos)
    focus = None
    if tag is not None:
        focus = store.resolve(tag) if tag == "latest" else tag
        if focus not in {i.tag for i in infos}:
            store.info(focus)  # raises TagNotFoundError naming the nearest tags
            raise TagNotFoundError(f"no checkpoint {focus!r} in {store.root}")
        if focus not in nodes or nodes[focus].status != "committed":
            raise IncompleteCheckpointError(
                f"checkpoint {focus!r} in {store.root} is not committed, so it has no lineage; "
                "commit it, or show the whole tree without a tag"
            )
        keep = {focus, *_ancestors(nodes, focus), *_descendants(nodes, focus)}
        nodes = {t: n for t, n in nodes.items() if t in keep}
        for n in nodes.values():
            n.children = [c for c in n.children if c in keep]
            if n.parent is not None and n.parent not in keep:  # cannot happen for ancestors; defensive
                n.parent = None
    order = _display_order(nodes)
    return LineageLog(str(_shown(store.root)), nodes, order, draw(nodes, order), focus=focus,
                      now=time.time() if now is None else now)


def log_from_infos(root: Path, infos: Iterable[CheckpointInfo], *, now: float | None = None) -> LineageLog:
    """The whole tree from infos already listed (the panel lists the root once per refresh)."""
    nodes = nodes_from(infos)
    order = _display_order(nodes)
    now = time.time() if now is None else now
    return LineageLog(str(_shown(root)), nodes, order, draw(nodes, order), now=now)


def _ancestors(nodes: dict[str, Node], tag: str) -> list[str]:
    out, seen, parent = [], {tag}, nodes[tag].parent
    while parent is not None and parent in nodes and parent not in seen:
        out.append(parent)
        seen.add(parent)
        parent = nodes[parent].parent
    return out


def _descendants(nodes: dict[str, Node], tag: str) -> list[str]:
    out, stack = [], list(nodes[tag].children)
    while stack:
        t = stack.pop()
        out.append(t)
        stack.extend(nodes[t].children)
    return out


def _shown(path) -> str:
    from pathlib import Path

    try:
        return Path(path).relative_to(Path.cwd()).as_posix() or "."
    except ValueError:
        return str(path)


__all__ = ["PARENT_KEY", "LineageLog", "Node", "build_log", "check_parent", "parent_of"]
