"""Charts of a root's checkpoints: metrics against step per lineage branch, and how much each
parameter moved between two tags.

The results keep their numbers (:attr:`MetricPlot.series`, :attr:`DiffPlot.relative`), so a
notebook or a test checks data, not pixels. The picture is drawn only when it is shown
(``_repr_png_``) or asked for (:meth:`figure`), with matplotlib's object API (no pyplot, no global
state), imported then and not before: ``%load_ext torchckpt`` stays fast.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import results
from .errors import InvalidArgumentError, ObjectNotFoundError

if TYPE_CHECKING:
    from .diff import CheckpointDiff
    from .lineage import LineageLog


class MetricNotFoundError(ObjectNotFoundError):
    """A metric no committed tag of the root recorded."""


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        from ._extras import missing

        raise (missing(e, "plotting") or e) from e
    return Figure, FigureCanvasAgg


def _chart_note() -> list[str]:
    """A line for the text view when no picture can be drawn (matplotlib missing)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return ["(the chart needs matplotlib, which is not installed here: pip install 'torchckpt[lab]')"]
    return []


class _Chart(results.Result):
    """A result shown as a picture (image/png) and its text; no HTML table. Subclasses give
    ``figure()`` and a ``quiet`` field."""

    quiet: bool

    def figure(self):
        raise NotImplementedError

    def _repr_html_(self) -> None:
        return None

    def _repr_png_(self) -> bytes | None:
        """The picture, or None where matplotlib is missing (the text view says so): a display
        hook must not raise."""
        from .errors import MissingExtraError

        if self.quiet:
            return None
        try:
            return _png(self.figure())
        except MissingExtraError:
            return None


def _png(fig) -> bytes:
    _, canvas_cls = _matplotlib()
    canvas_cls(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return buf.getvalue()


@dataclass(frozen=True)
class Point:
    step: int
    value: float
    tag: str


@dataclass
class MetricPlot(_Chart):
    """Each metric against step, one line per lineage branch (named by its newest tag).

    Attributes:
        series: metric -> branch -> points (step, value, tag), from the branch's root down.
    """

    root: str
    series: dict[str, dict[str, list[Point]]]
    quiet: bool = field(default=False, repr=False, compare=False)

    @property
    def metrics(self) -> list[str]:
        return list(self.series)

    def data(self, metric: str) -> dict[str, list[tuple[int, float]]]:
        """branch -> [(step, value)] for one metric."""
        return {b: [(p.step, p.value) for p in pts] for b, pts in self.series[metric].items()}

    def __repr__(self) -> str:
        branches = {b for s in self.series.values() for b in s}
        points = {(p.tag, m) for m, s in self.series.items() for pts in s.values() for p in pts}
        return (f"<MetricPlot {', '.join(self.metrics)}: {len(branches)} branch{'es' if len(branches) != 1 else ''}, "
                f"{len(points)} points>")

    def to_text(self) -> str:
        lines = [repr(self)]
        for metric, branches in self.series.items():
            for branch, pts in branches.items():
                lines.append(f"{metric} [{branch}]: " + ", ".join(f"{p.tag}@{p.step}={results.format_value(p.value)}"
                                                                  for p in pts))
        return "\n".join(lines + _chart_note())

    def figure(self):
        """A matplotlib ``Figure``: one panel per metric."""
        figure_cls, _ = _matplotlib()
        n = len(self.series)
        fig = figure_cls(figsize=(6.4, 3.2 * n))
        axes = [fig.add_subplot(n, 1, i + 1) for i in range(n)]
        for ax, (metric, branches) in zip(axes, self.series.items(), strict=False):
            labelled: set[str] = set()
            for branch, pts in branches.items():
                ax.plot([p.step for p in pts], [p.value for p in pts], marker="o", label=branch)
                for p in pts:
                    if p.tag not in labelled:  # a shared ancestor is labelled once
                        labelled.add(p.tag)
                        ax.annotate(p.tag, (p.step, p.value), textcoords="offset points", xytext=(4, 4),
                                    fontsize=8)
            ax.set_xlabel("step")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if len(branches) > 1:
                ax.legend(title="branch", fontsize=8)
            ax.margins(x=0.08, y=0.15)  # room for the tag labels
        return fig


def metric_plot(log: LineageLog, metrics: list[str] | None = None) -> MetricPlot:
    """The data of :class:`MetricPlot` from a lineage log (tags without a step are left out).

    Args:
        log: :func:`torchckpt.lineage.build_log`'s tree.
        metrics: the metrics to plot (default: every numeric metric of the root).

    Raises:
        MetricNotFoundError: a metric no tag recorded as a number (the message lists those that are).
    """
    nodes = log.nodes
    numeric: dict[str, None] = {}
    for tag in reversed(log.order):
        for k, v in nodes[tag].metrics.items():
            if _number(v):
                numeric.setdefault(k, None)
    if not numeric:
        raise MetricNotFoundError(
            f"no checkpoint in {log.root} has a numeric metric to plot; save with metrics, e.g. "
            "metrics={'loss': 0.12}"
        )
    wanted = list(dict.fromkeys(metrics)) if metrics else list(numeric)
    for m in wanted:
        if m not in numeric:
            import difflib

            close = difflib.get_close_matches(m, list(numeric), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise MetricNotFoundError(
                f"no checkpoint in {log.root} has a numeric metric {m!r}; {hint}plot one of: "
                f"{', '.join(numeric)}"
            )
    branches = log.branches()
    series: dict[str, dict[str, list[Point]]] = {}
    for m in wanted:
        per: dict[str, list[Point]] = {}
        for path in branches.values():
            pts = [Point(step, float(nodes[t].metrics[m]), t) for t in path
                   if (step := nodes[t].step) is not None and _number(nodes[t].metrics.get(m))]
            # named by its newest plotted tag (a leaf without a step or this metric names nothing)
            if pts and len(pts) > len(per.get(pts[-1].tag, ())):
                per[pts[-1].tag] = pts
        series[m] = per
    return MetricPlot(log.root, series)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class DiffPlot(_Chart):
    """Per-parameter relative change ``‖B−A‖/‖A‖`` between two tags, as bars in module order.

    Attributes:
        relative: ``object/key -> ‖B−A‖/‖A‖`` for the parameters and buffers of the modules.
        diff: the full :class:`~torchckpt.diff.CheckpointDiff` (max |Δ|, keys, metadata...).
    """

    diff: CheckpointDiff
    relative: dict[str, float]
    quiet: bool = field(default=False, repr=False, compare=False)

    @property
    def moved(self) -> dict[str, float]:
        """The parameters that changed, largest relative change first."""
        return dict(sorted(((k, v) for k, v in self.relative.items() if v), key=lambda kv: -kv[1]))

    def __repr__(self) -> str:
        return f"<DiffPlot {self.diff.a} → {self.diff.b}: {len(self.moved)} of {len(self.relative)} parameters moved>"

    def to_text(self) -> str:
        rows = [[k, f"{v:.3g}"] for k, v in self.relative.items()]
        return "\n".join([repr(self), results.text_table(["parameter", "‖B−A‖/‖A‖"], rows), *_chart_note()])

    def figure(self):
        """A matplotlib ``Figure``: one horizontal bar per parameter, in module order, top down."""
        figure_cls, _ = _matplotlib()
        keys = list(self.relative)
        fig = figure_cls(figsize=(6.4, max(2.0, 0.22 * len(keys) + 1.0)))
        ax = fig.add_subplot(1, 1, 1)
        values = [self.relative[k] if math.isfinite(self.relative[k]) else 0.0 for k in keys]
        ax.barh(range(len(keys)), values, color=["#d62728" if not math.isfinite(self.relative[k]) else "#1f77b4"
                                                  for k in keys])
        ax.set_yticks(range(len(keys)), keys, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("‖B − A‖ / ‖A‖")
        ax.set_title(f"{self.diff.a} → {self.diff.b}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        return fig


def diff_plot(diff: CheckpointDiff, kinds: dict[str, str]) -> DiffPlot:
    """The modules' parameters of a diff (``kinds``: object name -> kind, from the manifest); a
    diff of tags without notebook objects keeps every tensor."""
    modules = {n for n, k in kinds.items() if k in ("module", "deepspeed")}
    rel = {k: v for k, v in diff.relative.items() if k.split("/", 1)[0] in modules} if modules else dict(diff.relative)
    if not rel:
        raise InvalidArgumentError(
            f"{diff.a} and {diff.b} share no module parameters to plot; compare tags that saved the same model"
        )
    return DiffPlot(diff, rel)
