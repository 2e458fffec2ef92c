"""The checkpoint panel: an ipywidgets front end over :class:`torchckpt.notebook.Checkpointer`.

``%ckpt ui`` shows it for the notebook's checkpoint root; from Python::

    panel = torchckpt.CheckpointPanel(root="checkpoints", namespace=globals())
    panel                      # the last expression of a cell displays it

It is a shell: every button calls one Checkpointer (or store) method and renders the outcome.

Threads. Widget callbacks run on the kernel's main thread, between cells. Save takes its
snapshot there (the async path: tensors are copied into host buffers, so the checkpoint holds
the values of the moment of the click even if a cell changes them right after), then the
writes and the commit run in the background (the progress bar follows the save's
:class:`~torchckpt.pending.PendingSave`, fed by the writer); verify, diff and delete run on a
worker thread, so the kernel stays free.
Load alone runs in the callback: it changes the live objects, and on the kernel's thread no cell
can run halfway through it. Workers touch widgets only by setting traits (never ``with out:``)
and log through ``Output.outputs``. Headless tests pass a synchronous ``executor``.
"""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, MutableMapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import ipywidgets as w

from . import results
from .errors import InvalidArgumentError, TagNotFoundError, TorchckptError, in_dialect
from .manifest import validate_tag
from .notebook import Checkpointer, parse_metrics
from .options import CheckpointOptions
from .pending import PendingSave
from .store import CheckpointInfo

if TYPE_CHECKING:
    from .plots import MetricPlot

logger = logging.getLogger(__name__)

#: The choices of the map_location dropdown besides CUDA devices: label -> value.
_SAVED = "saved"
#: Share of the save progress bar taken by the snapshot; the background writes fill the rest.
_SNAPSHOT_SHARE = 0.2
_PROGRESS_MAX = 1000
#: Log entries kept (the oldest are dropped).
_LOG_LIMIT = 200
#: ``poll_interval``'s default: follow the Checkpointer's options.
_FROM_OPTIONS: Any = object()

_SORTS: dict[str, Callable[[CheckpointInfo], Any]] = {
    "newest first": lambda i: (-i.created, i.tag),
    "oldest first": lambda i: (i.created, i.tag),
    "tag": lambda i: i.tag,
    "largest first": lambda i: (-i.size, i.tag),
    "step": lambda i: (i.meta.step is None, i.meta.step or 0, i.created),
}

#: The table's columns are results.COLUMNS (``latest`` is a badge in the tag cell); their widths here.
_WIDTHS = {"tag": "200px", "created": "150px", "size": "80px", "step": "60px", "metrics": "170px", "note": "230px",
           "status": "110px"}
_COLUMNS = tuple((name, name, _WIDTHS.get(name, "120px")) for name in results.COLUMNS if name != "latest")
_LATEST_BADGE = (
    '<span class="torchckpt-latest" style="background:#2e7d32;color:#fff;border-radius:3px;'
    'padding:0 4px;margin-left:4px;font-size:85%">latest</span>'
)


class _InlineExecutor(Executor):
    """Runs each job at once, on the caller's thread (headless tests, scripts)."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - kept in the future, like a thread pool does
            future.set_exception(e)
        return future


def _handler(action: str, *, needs_idle: bool = True):
    """Wrap a widget callback: an error is shown in the panel, never lost in the kernel log;
    with ``needs_idle`` it refuses while another action runs (``disabled`` is advisory:
    ``Button.click()`` and a lagging browser get past it)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(self, *args):
            if needs_idle and self._busy is not None:
                self._refuse(action, f"busy with {self._busy}; wait for it to finish")
                return
            try:
                fn(self, *args)
            except Exception as e:  # noqa: BLE001 - every error is reported in the panel
                self._failed(action, e)

        return run

    return wrap


class _Row:
    """One tag's line in the table: a selection box and one HTML cell per column."""

    def __init__(self, tag: str, on_toggle: Callable[[str, bool], None]):
        self.tag = tag
        self.checkbox = w.Checkbox(value=False, indent=False, layout=w.Layout(width="28px"))
        self.checkbox.observe(lambda change: on_toggle(tag, change["new"]), names="value")
        self.cells = {name: w.HTML(layout=w.Layout(width=width, overflow="hidden")) for name, _, width in _COLUMNS}
        self.box = w.HBox([self.checkbox, *self.cells.values()], layout=w.Layout(align_items="center"))
        self.box.add_class("torchckpt-row")

    def update(self, cells: dict[str, str]) -> None:
        for name, value in cells.items():
            if self.cells[name].value != value:  # unchanged values send nothing to the browser
                self.cells[name].value = value

    def close(self) -> None:
        for widget in (self.checkbox, *self.cells.values(), self.box):
            widget.close()


class CheckpointPanel:
    """A table of the checkpoints under one root, with Save, Load, Commit, Verify, Diff, Delete.

    Args:
        checkpointer: the :class:`~torchckpt.notebook.Checkpointer` to drive (``%ckpt ui``
            passes the magics' own). Give this or ``root``.
        namespace: where the live objects are (a notebook's ``globals()``); default: the
            IPython user namespace.
        root: a checkpoint root; the panel then makes (and on :meth:`close`, closes) its own
            Checkpointer.
        executor: runs the background work (default: one worker thread). Pass
            ``"inline"`` to run everything on the calling thread (tests, scripts).
        poll_interval: seconds between re-reads of the root while some save is still
            committing; None turns this off. Default: the Checkpointer's
            ``options.poll_interval`` (2 s; ``%config CkptMagics.poll_interval``), as it is at
            each re-read.

    Example:
        >>> panel = CheckpointPanel(root="checkpoints", namespace=globals())
        >>> panel.tag_input.value = "warmup"
        >>> panel.save_button.click()
        >>> panel.wait()
    """

    def __init__(
        self,
        checkpointer: Checkpointer | None = None,
        namespace: MutableMapping[str, Any] | None = None,
        *,
        root: Any = None,
        executor: Executor | str | None = None,
        poll_interval: float | None = _FROM_OPTIONS,
    ):
        if (checkpointer is None) == (root is None):
            raise TypeError("CheckpointPanel takes a checkpointer or a root (one of them, not both)")
        self.poll_interval = poll_interval  # checked before anything is made
        self._owns_checkpointer = checkpointer is None
        self.checkpointer = checkpointer if checkpointer is not None else Checkpointer(root)
        if namespace is None:
            namespace = _ipython_namespace()
        self.namespace = namespace
        self._owns_executor = executor is None
        if executor == "inline":
            executor = _InlineExecutor()
        elif isinstance(executor, str):
            raise InvalidArgumentError(f"executor must be an Executor or 'inline', got {executor!r}")
        self._executor: Executor = executor or ThreadPoolExecutor(1, thread_name_prefix="torchckpt-panel")
        self._lock = threading.RLock()
        self._log_lock = threading.Lock()
        self._future: Future | None = None
        self._busy: str | None = None
        self._confirm_action: Callable[[], None] | None = None
        self._infos: dict[str, CheckpointInfo] = {}
        self._pending: set[str] = set()
        self._selected: list[str] = []  # in the order the user ticked them
        self._deselected_objects: set[str] = set()
        self._syncing_objects = False
        self._left_out_said: dict[str, str] = {}
        self._rows: dict[str, _Row] = {}
        self._timer: threading.Timer | None = None
        self._closed = False
        self.last_error: BaseException | None = None
        self._build()
        self.refresh()
        self.tag_input.value = self.checkpointer.default_tag(self._step())
        self._hook = self._register_hook()

    # -- layout ----------------------------------------------------------------------------------
    def _build(self) -> None:
        def button(label: str, cls: str, tip: str, style: str = "") -> w.Button:
            b = w.Button(description=label, tooltip=tip, button_style=style, layout=w.Layout(width="auto"))
            b.add_class(cls)
            return b

        self.title = w.HTML()
        self.sort = w.Dropdown(options=list(_SORTS), value="newest first", description="sort",
                               layout=w.Layout(width="200px"))
        self.sort.add_class("torchckpt-sort")
        self.refresh_button = button("Refresh", "torchckpt-refresh", "re-read the checkpoint root")
        self.chart_toggle = w.ToggleButton(value=False, description="Chart",
                                           layout=w.Layout(width="auto", flex="0 0 auto"),
                                           tooltip="plot a metric against step, one line per lineage branch")
        self.chart_toggle.add_class("torchckpt-chart-toggle")
        self.chart_metric = w.Dropdown(options=[], description="metric", layout=w.Layout(width="220px"))
        self.chart_metric.add_class("torchckpt-chart-metric")
        self.chart_note = w.HTML()
        self.chart_note.add_class("torchckpt-chart-note")
        self.chart_image = w.Image(format="png", layout=w.Layout(max_width="640px"))
        self.chart_image.add_class("torchckpt-chart")
        self.chart_box = w.VBox([w.HBox([self.chart_metric, self.chart_note], layout=w.Layout(align_items="center")),
                                 self.chart_image], layout=w.Layout(display="none"))
        self.chart_box.add_class("torchckpt-chart-box")
        #: The chart's data (a :class:`~torchckpt.plots.MetricPlot`), None until the chart is shown.
        self.chart_plot: MetricPlot | None = None
        self._chart_drawn: str | None = None
        self._charting = False
        header = w.HBox([w.HTML("", layout=w.Layout(width="28px"))]
                        + [w.HTML(f"<b>{label}</b>", layout=w.Layout(width=width)) for _, label, width in _COLUMNS])
        header.add_class("torchckpt-header")
        self._header = header
        self.empty = w.HTML("<i>no checkpoints yet: type a tag and click Save</i>")
        self.table = w.VBox([header], layout=w.Layout(max_height="320px", overflow="auto"))
        self.table.add_class("torchckpt-table")

        self.tag_input = w.Text(description="tag", placeholder="e.g. step-100", layout=w.Layout(width="280px"))
        self.tag_input.add_class("torchckpt-tag")
        self.note_input = w.Text(description="note", placeholder="optional", layout=w.Layout(width="280px"))
        self.note_input.add_class("torchckpt-note")
        self.metrics_input = w.Text(description="metrics", placeholder="loss=0.12 acc=0.9",
                                    layout=w.Layout(width="280px"))
        self.metrics_input.add_class("torchckpt-metrics")
        self.commit_toggle = w.Checkbox(value=True, description="commit when written", indent=False,
                                        layout=w.Layout(width="auto"))
        self.commit_toggle.add_class("torchckpt-commit-toggle")
        self.objects_select = w.SelectMultiple(description="objects", rows=5, layout=w.Layout(width="320px"))
        self.objects_select.add_class("torchckpt-objects")
        self.map_location = w.Dropdown(options=_map_location_options(), value=_SAVED, description="map_location",
                                       style={"description_width": "initial"}, layout=w.Layout(width="220px"))
        self.map_location.add_class("torchckpt-map-location")

        self.save_button = button("Save", "torchckpt-save", "save the selected objects under the tag", "primary")
        self.load_button = button("Load", "torchckpt-load", "restore the ticked checkpoint into the live objects")
        self.commit_button = button("Commit", "torchckpt-commit", "commit the ticked checkpoints saved uncommitted")
        self.verify_button = button("Verify", "torchckpt-verify", "re-check every file against its manifest")
        self.diff_button = button("Diff", "torchckpt-diff", "compare the two ticked checkpoints")
        self.delete_button = button("Delete", "torchckpt-delete", "remove the ticked checkpoints", "danger")
        self.confirm_text = w.HTML()
        self.confirm_button = button("Confirm", "torchckpt-confirm", "go ahead", "danger")
        self.cancel_button = button("Cancel", "torchckpt-cancel", "do nothing")
        self.confirm_box = w.HBox([self.confirm_text, self.confirm_button, self.cancel_button],
                                  layout=w.Layout(display="none", align_items="center"))
        self.confirm_box.add_class("torchckpt-confirm-box")

        self.progress = w.IntProgress(value=0, min=0, max=_PROGRESS_MAX, description="",
                                      layout=w.Layout(width="260px"))
        self.progress.add_class("torchckpt-progress")
        self.status = w.HTML("ready")
        self.status.add_class("torchckpt-status")
        self.clear_log_button = button("Clear log", "torchckpt-clear-log", "empty the log below")
        self.log = w.Output(layout=w.Layout(width="100%", min_height="24px", max_height="180px", overflow="auto",
                                            border="1px solid #ddd"))
        self.log.add_class("torchckpt-log")

        self.refresh_button.on_click(self._on_refresh)
        self.sort.observe(lambda _: self._safely("sort", self.refresh), names="value")
        self.chart_toggle.observe(lambda _: self._safely("chart", self._refresh_chart), names="value")
        self.chart_metric.observe(lambda _: None if self._charting else self._safely("chart", self._refresh_chart),
                                  names="value")
        self.tag_input.observe(lambda _: self._update_buttons(), names="value")
        self.objects_select.observe(self._on_objects_changed, names="value")
        self.save_button.on_click(self._on_save)
        self.load_button.on_click(self._on_load)
        self.commit_button.on_click(self._on_commit)
        self.verify_button.on_click(self._on_verify)
        self.diff_button.on_click(self._on_diff)
        self.delete_button.on_click(self._on_delete)
        self.confirm_button.on_click(self._on_confirm)
        self.cancel_button.on_click(self._on_cancel)
        self.clear_log_button.on_click(self._on_clear_log)

        self.widget = w.VBox([
            w.HBox([self.title, self.sort, self.refresh_button, self.chart_toggle],
                   layout=w.Layout(align_items="center")),
            self.table,
            self.chart_box,
            w.HBox([
                w.VBox([self.tag_input, self.note_input, self.metrics_input, self.commit_toggle]),
                self.objects_select,
            ]),
            w.HBox([self.save_button, self.load_button, self.map_location, self.commit_button,
                    self.verify_button, self.diff_button, self.delete_button], layout=w.Layout(align_items="center")),
            self.confirm_box,
            w.HBox([self.progress, self.status, self.clear_log_button], layout=w.Layout(align_items="center")),
            self.log,
        ], layout=w.Layout(border="1px solid #ccc", padding="6px"))
        self.widget.add_class("torchckpt-panel")

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"<CheckpointPanel {str(self.checkpointer.root)!r}: {len(self._infos)} checkpoints>"

    # -- public state ----------------------------------------------------------------------------
    @property
    def poll_interval(self) -> float | None:
        """Seconds between re-reads while a save made elsewhere commits (None: never)."""
        if self._poll_interval is _FROM_OPTIONS:
            return self.checkpointer.options.poll_interval
        return self._poll_interval

    @poll_interval.setter
    def poll_interval(self, value: float | None) -> None:
        if value is not _FROM_OPTIONS:
            CheckpointOptions(poll_interval=value)  # ValueError naming poll_interval and its valid values
        self._poll_interval = value

    @property
    def rows(self) -> dict[str, _Row]:
        """tag -> its table row (``row.checkbox``, ``row.cells``), in display order."""
        return dict(self._rows)

    @property
    def selected(self) -> list[str]:
        """The ticked tags, in the order they were ticked."""
        return list(self._selected)

    def select(self, *tags: str) -> None:
        """Tick exactly these tags (others are unticked)."""
        unknown = [t for t in tags if t not in self._rows]
        if unknown:
            raise TagNotFoundError(f"no row for {', '.join(map(repr, unknown))}; the table has: "
                                   f"{', '.join(self._rows)}")
        for tag, row in self._rows.items():
            if tag not in tags:
                row.checkbox.value = False
        for tag in tags:
            self._rows[tag].checkbox.value = True

    @property
    def busy(self) -> str | None:
        """The action running in the background, or None."""
        return self._busy

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the background action (if any) has finished and the table is up to date.

        Raises:
            TimeoutError: it was still running after ``timeout`` seconds.
        """
        future = self._future
        if future is not None:
            try:
                future.result(timeout)
            except TimeoutError:
                raise TimeoutError(f"the panel's {self._busy or 'action'} is still running after {timeout}s") from None

    # -- refresh ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the checkpoint root and the namespace; update the table, objects and buttons."""
        with self._lock:
            if self._closed:
                return
            listed = self.checkpointer.list()
            infos = listed.infos
            self._pending = set(listed.pending)
            self._infos = {i.tag: i for i in infos}
            ordered = sorted(infos, key=_SORTS[self.sort.value])
            for tag in [t for t in self._rows if t not in self._infos]:
                self._rows.pop(tag).close()
            for info in ordered:
                row = self._rows.get(info.tag)
                if row is None:
                    row = self._rows[info.tag] = _Row(info.tag, self._on_toggle)
                row.update(self._cells(info))
            self._rows = {i.tag: self._rows[i.tag] for i in ordered}
            self._selected = [t for t in self._selected if t in self._rows]
            children = (self._header, *(r.box for r in self._rows.values())) if self._rows else (self.empty,)
            if tuple(self.table.children) != children:
                self.table.children = children
            root = html.escape(str(self.checkpointer.root))
            n = len(infos)
            self.title.value = f"<b>torchckpt</b> &middot; <code>{root}</code> &middot; {n} checkpoint{'s' * (n != 1)}"
            self._refresh_objects()
            self._update_buttons()
            self._schedule_poll()
        self._safely("chart", self._refresh_chart)

    def _refresh_chart(self) -> None:
        """Draw the chart of the ticked metric when it is shown and its data changed since last drawn
        (matplotlib is imported then, not before)."""
        self.chart_box.layout.display = "flex" if self.chart_toggle.value else "none"
        if not self.chart_toggle.value:
            return
        from .lineage import log_from_infos
        from .plots import MetricNotFoundError, metric_plot

        with self._lock:
            infos = list(self._infos.values())
        log = log_from_infos(self.checkpointer.root, infos)
        try:
            every = metric_plot(log)
        except MetricNotFoundError:
            self.chart_plot, self._chart_drawn = None, None
            self.chart_note.value = ("<i>no checkpoint has a numeric metric yet: save one with metrics, "
                                     "e.g. loss=0.12</i>")
            self.chart_image.value = b""
            return
        self._charting = True
        try:
            if list(self.chart_metric.options) != every.metrics:
                current = self.chart_metric.value
                self.chart_metric.options = every.metrics
                self.chart_metric.value = current if current in every.metrics else every.metrics[0]
        finally:
            self._charting = False
        metric = self.chart_metric.value
        plot = metric_plot(log, [metric])
        self.chart_plot = plot
        drawn = repr(plot.series)
        if drawn != self._chart_drawn:
            self.chart_image.value = plot._repr_png_() or b""
            self._chart_drawn = drawn
        n = len(plot.series[metric])
        self.chart_note.value = html.escape(f"{n} branch{'es' if n != 1 else ''}")

    def _cells(self, info: CheckpointInfo) -> dict[str, str]:
        row = results.row(info)
        status = "pending" if info.tag in self._pending else row["status"]
        colour = results.STATUS_COLOURS.get(status, "inherit")
        meanings = {**results.STATUS_MEANINGS, **results.STATUS_MEANINGS_IN_KERNEL}
        title = html.escape(info.problem or meanings.get(status, ""), quote=True)
        cells = {name: html.escape(row[name]) for name, _, _ in _COLUMNS}
        cells["tag"] = f"<code>{cells['tag']}</code>" + (_LATEST_BADGE if info.is_latest else "")
        note_title = html.escape(info.meta.note or "", quote=True)
        cells["note"] = f'<span title="{note_title}">{cells["note"]}</span>'
        cells["status"] = f'<span style="color:{colour}" title="{title}">{html.escape(status)}</span>'
        return cells

    def _refresh_objects(self) -> None:
        found, left_out = self.checkpointer.discover(self.namespace)
        news = {n: why for n, why in left_out.items() if self._left_out_said.get(n) != why}
        self._left_out_said = dict(left_out)
        if news:  # said once per object and reason, not on every refresh
            self._log("not in the objects list: " + "; ".join(f"{n}: {why}" for n, why in news.items()))
        options = [(f"{name} ({_kind(obj)})", name) for name, obj in found.items()]
        value = tuple(name for name in found if name not in self._deselected_objects)
        self._syncing_objects = True
        try:
            if list(self.objects_select.options) != options:
                self.objects_select.options = options
                self.objects_select.rows = max(2, min(6, len(options)))
            if tuple(self.objects_select.value) != value:
                self.objects_select.value = value
        finally:
            self._syncing_objects = False

    def _on_objects_changed(self, change: dict) -> None:
        if self._syncing_objects:
            return
        names = [value for _, value in self.objects_select.options]
        self._deselected_objects = set(names) - set(change["new"])
        self._update_buttons()

    def _schedule_poll(self) -> None:
        """While a save made elsewhere (magics, code) is committing, re-read the root now and then."""
        interval = self.poll_interval
        if interval is None or self._closed or self._timer is not None:
            return
        if not self._pending or self._busy:
            return

        ref = weakref.ref(self)

        def tick() -> None:
            panel = ref()
            if panel is None:
                return
            panel._timer = None
            panel._safely("refresh", panel.refresh)

        self._timer = threading.Timer(interval, tick)
        self._timer.daemon = True
        self._timer.start()

    def _register_hook(self) -> Callable[..., None] | None:
        """Refresh after every cell, so saves made by ``%ckpt`` or code appear in the table."""
        ip = _ipython()
        if ip is None:
            return None
        ref = weakref.ref(self)

        def post_run_cell(*_: Any) -> None:
            panel = ref()
            if panel is not None:
                panel._safely("refresh", panel.refresh)

        ip.events.register("post_run_cell", post_run_cell)
        return post_run_cell

    # -- selection and buttons -------------------------------------------------------------------
    def _on_toggle(self, tag: str, ticked: bool) -> None:
        with self._lock:
            if ticked and tag not in self._selected:
                self._selected.append(tag)
            elif not ticked and tag in self._selected:
                self._selected.remove(tag)
            if self._confirm_action is not None:  # a confirmation is about the old selection
                self._hide_confirm()
            self._update_buttons()

    def _update_buttons(self) -> None:
        with self._lock:
            idle = self._busy is None and self._confirm_action is None and not self._closed
            sel = self._selected
            loadable = len(sel) == 1 and (sel[0] in self._pending or self._infos.get(sel[0]) is not None
                                          and self._infos[sel[0]].committed)
            wanted = {
                self.save_button: idle and _valid_tag(self.tag_input.value) and bool(self.objects_select.value),
                self.load_button: idle and loadable,
                self.commit_button: idle and bool(sel) and all(t in self._pending for t in sel),
                self.verify_button: idle and bool(sel),
                self.diff_button: idle and len(sel) == 2,
                self.delete_button: idle and bool(sel) and not any(t in self._pending for t in sel),
                self.refresh_button: self._busy is None,
            }
            for button, enabled in wanted.items():
                if button.disabled == enabled:
                    button.disabled = not enabled

    def _set_busy(self, action: str) -> None:
        with self._lock:
            if self._busy is not None:
                raise RuntimeError(f"the panel is busy with {self._busy}; wait for it to finish")
            self._busy = action
            self.last_error = None
            self.progress.value = 0
            self.progress.bar_style = "info"
            self.progress.description = action
            self._update_buttons()

    def _set_idle(self) -> None:
        with self._lock:
            self._busy = None
            self._update_buttons()

    # -- logging ---------------------------------------------------------------------------------
    def _log(self, text: str, *, error: bool = False, html_text: str | None = None) -> None:
        """Append to the log (thread-safe: sets the Output's outputs, never ``with out:``)."""
        stamp = time.strftime("%H:%M:%S")
        if html_text is not None:
            entry = {"output_type": "display_data", "metadata": {},
                     "data": {"text/plain": text, "text/html": html_text}}
        else:
            entry = {"output_type": "stream", "name": "stderr" if error else "stdout", "text": f"[{stamp}] {text}\n"}
        with self._log_lock:
            self.log.outputs = (*self.log.outputs[-(_LOG_LIMIT - 1):], entry)

    def _say(self, text: str, *, error: bool = False) -> None:
        """Show ``text`` on the status line and in the log."""
        colour = "#c62828" if error else "inherit"
        self.status.value = f'<span style="color:{colour}">{html.escape(text)}</span>'
        self._log(text, error=error)

    def _failed(self, action: str, error: BaseException) -> None:
        self.last_error = error
        message = f"{action} failed: {in_dialect(' '.join(str(error).split()), 'magic')}"
        with contextlib.suppress(Exception):
            self.progress.bar_style = "danger"
        self._say(message, error=True)
        if not isinstance(error, TorchckptError):
            # Not one of ours, so its message may not say enough: the traceback goes to the log.
            self._log("".join(traceback.format_exception(error)), error=True)
        logger.debug("panel %s failed", action, exc_info=error)

    def _refuse(self, action: str, reason: str) -> None:
        """A button was used when it cannot act (the browser may lag behind ``disabled``)."""
        self._say(f"{action}: {reason}", error=True)

    def _safely(self, action: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - shown in the panel
            self._failed(action, e)

    def _progress(self, lo: float, hi: float) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback that fills the bar from ``lo`` to ``hi`` (fractions)."""

        def update(done: int, total: int) -> None:
            fraction = done / total if total else 1.0
            value = int(_PROGRESS_MAX * (lo + (hi - lo) * min(max(fraction, 0.0), 1.0)))
            if value != self.progress.value:
                self.progress.value = value

        return update

    # -- background jobs -------------------------------------------------------------------------
    def _run(self, action: str, job: Callable[[], bool | None], *, busy: bool = False,
             on_kernel_thread: bool = False) -> None:
        """Run ``job`` on the executor (or, ``on_kernel_thread``, right here in the widget
        callback); its errors are shown; the table is refreshed afterwards."""
        if not busy:
            self._set_busy(action)

        def work() -> None:
            try:
                ok = job() is not False
            except Exception as e:  # noqa: BLE001 - shown in the panel
                self._failed(action, e)
            else:
                self.progress.value = _PROGRESS_MAX
                self.progress.bar_style = "success" if ok else "danger"
            finally:
                self._set_idle()
                self._safely("refresh", self.refresh)

        if on_kernel_thread:
            work()
            return
        try:
            self._future = self._executor.submit(work)
        except Exception:
            self._set_idle()
            raise

    # -- actions ---------------------------------------------------------------------------------
    @_handler("refresh", needs_idle=False)
    def _on_refresh(self, _: Any = None) -> None:
        self.refresh()
        self._say(f"refreshed: {len(self._infos)} checkpoints")

    @_handler("save")
    def _on_save(self, _: Any = None) -> None:
        tag = self.tag_input.value.strip()
        validate_tag(tag)
        names = list(self.objects_select.value)
        if not names:
            return self._refuse("save", "no objects chosen: select at least one in the objects list")
        missing = [n for n in names if n not in self.namespace]
        if missing:
            return self._refuse("save", f"{', '.join(missing)} no longer in the namespace; click Refresh")
        try:
            metrics = parse_metrics(self.metrics_input.value.replace(",", " ").split())
        except ValueError as e:
            return self._refuse("save", str(e))
        note = self.note_input.value.strip() or None
        info = self._infos.get(tag)
        if info is not None or tag in self._pending:
            what = "pending" if tag in self._pending or info is None else results.status(info)
            return self._ask(f"{tag!r} exists ({what}): replace it?", "save",
                             lambda: self._save(tag, names, note, metrics, overwrite=True))
        self._save(tag, names, note, metrics)

    def _save(self, tag: str, names: list[str], note: str | None, metrics: dict[str, Any], *,
              overwrite: bool = False) -> None:
        commit = self.commit_toggle.value
        self._set_busy("save")
        try:
            # The snapshot runs here, on the kernel's thread, so it is consistent with the cell
            # that ran last; the writes and the commit continue in the background.
            handle = self.checkpointer.save_namespace(tag, self.namespace, names, async_save=True, commit=commit,
                                                      note=note, metrics=metrics or None,
                                                      progress=self._progress(0.0, _SNAPSHOT_SHARE),
                                                      overwrite=overwrite)
        except BaseException:
            self._set_idle()
            raise
        assert isinstance(handle, PendingSave)  # async_save=True always returns one
        self.tag_input.value = self.checkpointer.default_tag(self._step())
        self.note_input.value = self.metrics_input.value = ""
        self._selected = [tag]
        self._safely("refresh", self.refresh)
        self.select(tag)
        if not commit:
            self._say(f"saved {tag!r} ({', '.join(handle.names)}), writing in the background; "
                      "not committed: tick it and click Commit")
        else:
            self.status.value = html.escape(f"saving {tag!r}: writing in the background...")
        self._run("save", lambda: self._wait_written(handle), busy=True)

    def _wait_written(self, handle: PendingSave) -> None:
        """Show the background writes' progress (the handle's bytes written, fed by the writer);
        wait for the writes, and for the commit of a save that commits."""
        handle.add_progress_callback(self._progress(_SNAPSHOT_SHARE, 0.99))
        if not handle.commits:
            handle.wait()  # the writes; a failure is shown now (Commit would raise it again)
            return
        result = self.checkpointer.commit(handle.tag)  # waits on the handle; reports the outcome once
        size = results.human_size(result.checkpoint_size if result.checkpoint_size is not None else 0)
        self._say(f"saved {handle.tag!r}: committed {', '.join(result.names)} ({size}, {result.seconds:.2f} s)")

    @_handler("load")
    def _on_load(self, _: Any = None) -> None:
        if len(self._selected) != 1:
            return self._refuse("load", f"tick exactly one checkpoint to load ({len(self._selected)} ticked)")
        tag = self._selected[0]
        try:
            names = self._load_names(tag)
        except ValueError as e:
            return self._refuse("load", str(e))
        location = None if self.map_location.value == _SAVED else self.map_location.value

        def job() -> None:
            result = self.checkpointer.load(tag, self.namespace, names, map_location=location,
                                            progress=self._progress(0.0, 1.0))
            where = f" onto {location}" if location else ""
            rng = " + RNG" if result.rng else f" (RNG states left as they were: {result.rng_reason})"
            self._say(f"loaded {tag!r}{where}: {', '.join(result.names)}{rng} "
                      f"({results.human_size(result.size)}, {result.seconds:.2f} s)")
            for note in result.notes:
                self._log(f"note: {note}")

        # Restoring changes the live objects: it runs in the widget callback, on the kernel's own
        # thread, so no cell can run (and train) halfway through it. Progress still reaches the
        # front end, which the kernel messages while it works.
        self._run("load", job, on_kernel_thread=True)

    def _load_names(self, tag: str) -> list[str] | None:
        """Everything saved in ``tag`` except the objects unticked in the objects list (None: all)."""
        info = self._infos.get(tag)
        saved = info.meta.objects if info is not None else {}
        if not saved or not self._deselected_objects:
            return None
        names = [n for n in saved if n not in self._deselected_objects]
        if not names:
            raise InvalidArgumentError(f"every object of {tag!r} ({', '.join(saved)}) is unticked in the objects list")
        return None if len(names) == len(saved) else names

    @_handler("commit")
    def _on_commit(self, _: Any = None) -> None:
        tags = [t for t in self._selected if t in self._pending]
        if not tags:
            return self._refuse("commit", "tick a checkpoint saved without commit (status 'pending') to commit it")

        def job() -> None:
            for tag in tags:
                result = self.checkpointer.commit(tag)
                self._say(f"committed {tag!r} ({', '.join(result.names)})")

        self._run("commit", job)

    @_handler("verify")
    def _on_verify(self, _: Any = None) -> None:
        tags = list(self._selected)
        if not tags:
            return self._refuse("verify", "tick the checkpoints to verify")

        def job() -> bool:
            bad = []
            for n, tag in enumerate(tags):
                result = self.checkpointer.verify(tag)
                self._log(result.to_text(), error=not result.ok)
                if not result.ok:
                    bad.append(tag)
                self._progress(0.0, 1.0)(n + 1, len(tags))
            if bad:
                self._say(f"verify: {', '.join(map(repr, bad))} FAILED (see the log); "
                          "restore from a copy, or delete", error=True)
                return False
            self._say(f"verified {', '.join(map(repr, tags))}: OK")
            return True

        self._run("verify", job)

    @_handler("diff")
    def _on_diff(self, _: Any = None) -> None:
        if len(self._selected) != 2:
            return self._refuse("diff", f"tick exactly two checkpoints to compare ({len(self._selected)} ticked)")
        a, b = sorted(self._selected, key=lambda t: (self._infos[t].created, t) if t in self._infos else (0, t))

        def job() -> None:
            diff = self.checkpointer.diff(a, b)
            self._log(diff.to_text(), html_text=diff.to_html())
            self.status.value = html.escape(f"diff {diff.summary()}")

        self._run("diff", job)

    @_handler("delete")
    def _on_delete(self, _: Any = None) -> None:
        tags = list(self._selected)
        if not tags:
            return self._refuse("delete", "tick the checkpoints to delete")
        latest = [t for t in tags if self._infos.get(t) is not None and self._infos[t].is_latest]
        listed = ", ".join(map(repr, tags))

        def confirmed_once() -> None:
            if latest:
                # `latest` needs a second, explicit confirmation.
                self._ask(f"{latest[0]!r} is latest: deleting it makes the next newest tag latest. "
                          "Really delete it?", "delete", lambda: self._delete(tags, force=True),
                          label="Delete latest too")
            else:
                self._delete(tags, force=False)

        self._ask(f"Delete {listed}? This cannot be undone.", "delete", confirmed_once)

    def _delete(self, tags: list[str], *, force: bool) -> None:
        def job() -> None:
            for n, tag in enumerate(tags):
                self.checkpointer.remove(tag, force=force)
                self._progress(0.0, 1.0)(n + 1, len(tags))
            self._say(f"deleted {', '.join(map(repr, tags))}")

        self._run("delete", job)

    # -- confirmation ----------------------------------------------------------------------------
    def _ask(self, question: str, action: str, fn: Callable[[], None], *, label: str = "Confirm") -> None:
        """Show ``question`` with Confirm/Cancel; Confirm runs ``fn`` (errors reported as ``action``)."""
        with self._lock:
            self._confirm_action = functools.partial(self._safely, action, fn)
            self.confirm_text.value = f"<b>{html.escape(question)}</b>"
            self.confirm_button.description = label
            self.confirm_box.layout.display = "flex"
            self._update_buttons()
        self.status.value = html.escape("waiting for confirmation")

    def _hide_confirm(self) -> None:
        with self._lock:
            self._confirm_action = None
            self.confirm_box.layout.display = "none"
            self._update_buttons()

    @_handler("confirm")
    def _on_confirm(self, _: Any = None) -> None:
        action = self._confirm_action
        self._hide_confirm()
        if action is None:
            return self._refuse("confirm", "nothing to confirm")
        action()

    @_handler("cancel", needs_idle=False)
    def _on_cancel(self, _: Any = None) -> None:
        self._hide_confirm()
        self._say("cancelled")

    @_handler("clear log", needs_idle=False)
    def _on_clear_log(self, _: Any = None) -> None:
        with self._log_lock:
            self.log.outputs = ()

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the running action, stop refreshing, close the widgets (and our Checkpointer)."""
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self.wait()
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
        if self._hook is not None:
            ip = _ipython()
            with contextlib.suppress(ValueError):
                if ip is not None:
                    ip.events.unregister("post_run_cell", self._hook)
        if self._owns_executor:
            self._executor.shutdown(wait=True)
        for row in self._rows.values():
            row.close()
        self._rows.clear()
        for child in _descendants(self.widget):
            child.close()
        if self._owns_checkpointer:
            self.checkpointer.close()

    def _step(self) -> int | None:
        from .state import infer_step

        return infer_step(self.namespace)


def _descendants(widget: w.Widget) -> Iterable[w.Widget]:
    for child in getattr(widget, "children", ()):
        yield from _descendants(child)
    yield widget


def _valid_tag(tag: str) -> bool:
    try:
        validate_tag(tag.strip())
    except ValueError:
        return False
    return True


def _kind(obj: Any) -> str:
    from .state import kind_of

    return kind_of(obj) or "?"


def _map_location_options() -> list[tuple[str, str]]:
    options = [("as saved", _SAVED), ("cpu", "cpu"), ("auto", "auto")]
    import torch

    if torch.cuda.is_available():
        options += [(f"cuda:{i}", f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return options


def _ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _ipython_namespace() -> MutableMapping[str, Any]:
    ip = _ipython()
    if ip is None:
        raise TypeError("CheckpointPanel needs namespace= outside IPython (e.g. namespace=globals())")
    return ip.user_ns
