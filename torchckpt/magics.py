"""``%ckpt``: save and restore notebook state from IPython. A thin shell over
:class:`torchckpt.notebook.Checkpointer`: it parses, calls, and returns the result object
(shown as a table in notebooks, as text in terminals; ``-q`` for a one-line repr).

Load it with ``%load_ext torchckpt``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class, no_var_expand
from traitlets import Bool, CaselessStrEnum, Float, TraitError, Unicode, observe, validate
from traitlets.config import Configurable

from . import results
from .errors import TorchckptError, in_dialect

#: The subcommands, in the order ``%ckpt?`` lists them.
SUBCOMMANDS = ("save", "commit", "load", "ls", "log", "info", "diff", "plot", "verify", "rm", "gc", "dir", "ui")
#: Subcommands whose positional arguments are tags (completion offers tag names).
_TAG_COMMANDS = frozenset({"commit", "load", "log", "info", "diff", "verify", "rm"})


#: Longer %ckpt lines are refused before parsing: the metadata they could set is at most 1 MiB.
_MAX_LINE = (1 << 20) + 4096


def split_line(line: str) -> list[str]:
    """``shlex.split(line)`` (POSIX rules) in linear time: shlex grows each token one character
    at a time, which is quadratic in a long quoted note.

    Raises:
        ValueError: ``No closing quotation`` / ``No escaped character``, as shlex.
    """
    words: list[str] = []
    word: list[str] = []
    in_word = False
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if ch.isspace():
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
            i += 1
            continue
        in_word = True
        if ch == "'":
            end = line.find("'", i + 1)
            if end < 0:
                raise ValueError("No closing quotation")
            word.append(line[i + 1:end])
            i = end + 1
        elif ch == '"':
            i += 1
            while True:
                if i >= n:
                    raise ValueError("No closing quotation")
                j = i
                while j < n and line[j] not in '"\\':
                    j += 1
                word.append(line[i:j])
                if j >= n:
                    raise ValueError("No closing quotation")
                if line[j] == '"':
                    i = j + 1
                    break
                # inside double quotes a backslash escapes only " and itself (as shlex); else it stays
                if j + 1 >= n:
                    raise ValueError("No escaped character")
                if line[j + 1] in '"\\':
                    word.append(line[j + 1])
                    i = j + 2
                else:
                    word.append("\\")
                    i = j + 1
        elif ch == "\\":
            if i + 1 >= n:
                raise ValueError("No escaped character")
            word.append(line[i + 1])
            i += 2
        else:
            j = i
            while j < n and not line[j].isspace() and line[j] not in "'\"\\":
                j += 1
            word.append(line[i:j])
            i = j
    if in_word:
        words.append("".join(word))
    return words


def _dollars_to_fields(line: str) -> str:
    """``$name`` (``$name.attr``) as ``{name}``, ``$$`` as ``$``, other braces escaped: IPython's
    ``$`` rule (not inside single quotes), in one pass instead of its quadratic pattern."""
    import re
    import string

    out = []
    for literal, field, spec, conv in string.Formatter().parse(line):
        quotes_after = literal.count("'")
        i, n = 0, len(literal)
        while i < n:
            ch = literal[i]
            if ch == "'":
                quotes_after -= 1
            if ch == "$" and quotes_after % 2 == 0:
                m = re.compile(r"\$?[\w.]+").match(literal, i + 1)
                if m:
                    word = m.group(0)
                    out.append(word if word.startswith("$") else "{" + word + "}")
                    quotes_after -= word.count("'")
                    i = m.end()
                    continue
            out.append("{{" if ch == "{" else "}}" if ch == "}" else ch)
            i += 1
        if field is not None:
            out.append("{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}")
    return "".join(out)


def _expand(shell, line: str) -> str:
    """``{expr}`` and ``$name`` in the line, from the caller's variables, as IPython expands magics'
    lines, but in linear time (IPython's ``$`` pattern is quadratic in the line's length)."""
    if "{" not in line and "$" not in line:
        return line
    from IPython.utils.text import FullEvalFormatter

    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "run_line_magic":
        frame = frame.f_back
    ns = dict(shell.user_ns)
    if frame is not None and frame.f_back is not None:
        ns.update(frame.f_back.f_locals)
    try:
        return FullEvalFormatter().vformat(_dollars_to_fields(line) if "$" in line else line, args=[], kwargs=ns)
    except Exception:  # noqa: BLE001 - as IPython: a line that does not expand is passed as typed
        return line


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


class _Help(Exception):
    """argparse asked to exit after printing help."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` (no traceback in IPython) instead of exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, file=sys.stderr)
        raise _Help()

    def parse(self, args: list[str]) -> argparse.Namespace:
        """Like parse_args, but names may also follow options (``load TAG --into v model``).

        (argparse's parse_intermixed_args cannot be used: it re-formats the usage with ``%``,
        which the ``%ckpt`` in our prog names breaks.)
        """
        ns, extra = self.parse_known_args(args)
        if extra:
            many = [a for a in self._actions if not a.option_strings and a.nargs in ("*", "+")]
            if not many or any(e.startswith("-") and e != "-" for e in extra):
                self.error(f"unrecognized arguments: {' '.join(extra)}")
            setattr(ns, many[0].dest, list(getattr(ns, many[0].dest) or []) + extra)
        return ns


def _build_parsers() -> dict[str, _Parser]:
    p: dict[str, _Parser] = {}

    def new(name: str, help: str) -> _Parser:
        parser = _Parser(prog=f"%ckpt {name}", description=help, add_help=True)
        parser.add_argument("-q", "--quiet", action="store_true", help="show only a one-line result")
        p[name] = parser
        return parser

    s = new("save", "Save objects of the notebook (default: every checkpointable one, leaving out data sets above "
                    "CkptMagics.auto_max_mb and what cannot be saved, with a note) and the RNG states.")
    s.add_argument("tag", nargs="?", help="tag (default: step-<step>, or ckpt-<date>-<time> when no step is known)")
    s.add_argument("names", nargs="*", help="variables to save (default: every checkpointable one)")
    s.add_argument("--async", dest="async_save", action="store_true",
                   help="copy tensors now, write in the background (commits when written)")
    s.add_argument("--no-commit", dest="commit", action="store_false", help="leave uncommitted; see %%ckpt commit")
    s.add_argument("--note", help="a note stored with the checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace an existing committed checkpoint of this tag")
    s.add_argument("--metric", dest="metrics", action="extend", nargs="+", default=[], metavar="K=V",
                   help="metrics stored with the checkpoint, e.g. --metric loss=0.12 acc=0.9 (a value that is not a "
                        "number is kept as text, and the result says so)")
    s.add_argument("--step", type=int, help="the training step (default: the variable `global_step` or `step`)")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: for large saves)")

    c = new("commit", "Commit a tag saved with --no-commit, or wait for an --async save and report its outcome.")
    c.add_argument("tag")
    c.add_argument("--note", help="replace the note given at save time")

    ld = new("load", "Restore saved objects into the live ones, in place; all are checked before any changes.")
    ld.add_argument("tag", nargs="?", default="latest", help="tag or 'latest' (default)")
    ld.add_argument("names", nargs="*", help="objects to restore (default: all)")
    ld.add_argument("--map-location", default=None, metavar="DEV",
                    help="cpu, cuda, cuda:N or auto (default: where the tensors were saved)")
    ld.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                    help="missing/unexpected keys and dtype changes are errors (default) or notes")
    ld.add_argument("--into", metavar="VAR", help="load the one named object into a new variable instead")
    ld.add_argument("--rng", action=argparse.BooleanOptionalAction, default=None,
                    help="restore the RNG states (default: yes when loading in place; --into never does)")
    ld.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="check each file against the manifest's checksum (default; --no-verify reads a damaged "
                         "checkpoint anyway)")
    ld.add_argument("--allow", action="append", default=[], metavar="MODULE.NAME",
                    help="a global safe loading may allow (repeatable)")
    ld.add_argument("--trusted", action="store_true",
                    help="load with weights_only=False (runs pickled code: only for files you trust)")
    ld.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar (default: for large loads)")

    new("ls", "List the checkpoints under the root: status, step, time, size, objects, metrics, note.")
    lg = new("log", "Draw the lineage tree of the root's checkpoints (each save's parent: the tag last loaded or "
                    "saved), newest first: tag, step, metrics, note, age.")
    lg.add_argument("tag", nargs="?", help="show only this tag's ancestors and descendants")
    i = new("info", "Show one checkpoint: status, metadata, objects and files.")
    i.add_argument("tag", nargs="?", default="latest")
    d = new("diff", "Compare two checkpoints: keys added/removed, shape/dtype changes, max |Δ| per tensor, metadata.")
    d.add_argument("a")
    d.add_argument("b", nargs="?", default="latest")
    d.add_argument("--plot", action="store_true",
                   help="chart each module parameter's relative change |B-A|/|A| in module order")
    pl = new("plot", "Plot metrics against step across the root's checkpoints, one line per lineage branch.")
    pl.add_argument("metrics", nargs="*", metavar="METRIC", help="metrics to plot (default: every numeric one)")
    v = new("verify", "Re-check every file of a checkpoint against its manifest's sizes and checksums.")
    v.add_argument("tag", nargs="?", default="latest")
    r = new("rm", "Remove checkpoints (never one being written; 'latest' only with --force).")
    r.add_argument("tags", nargs="+")
    r.add_argument("--force", action="store_true", help="also remove the tag 'latest' points to")
    g = new("gc", "Remove incomplete checkpoints, leftovers and, with --keep-last, older committed ones.")
    g.add_argument("--keep-last", type=results.positive_int, metavar="N", help="keep the newest N committed tags")
    g.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    dr = new("dir", "Show or set the checkpoint root (also: %config CkptMagics.root = 'path').")
    dr.add_argument("path", nargs="?")
    new("ui", "Show the checkpoint panel.")
    return p


_PARSERS = _build_parsers()


def _doc() -> str:
    lines = [
        "Save, restore, compare and manage checkpoints of the notebook's objects.",
        "",
        "  %ckpt SUBCOMMAND [ARGS]     (%ckpt SUBCOMMAND --help for details)",
        "",
    ]
    for name in SUBCOMMANDS:
        parser = _PARSERS[name]
        usage = parser.format_usage().replace("usage: ", "").strip()
        lines += [f"  {usage}", f"      {parser.description}"]
    lines += [
        "",
        "User mistakes are reported without a traceback; each command returns a result object",
        "(r = %ckpt save ...), shown as a table. Configure with %config CkptMagics.root = 'dir',",
        "CkptMagics.progress = 'auto'|'always'|'never', CkptMagics.quiet = True, and the Checkpointer's",
        "options: CkptMagics.lock_timeout, progress_min_mb, auto_max_mb, max_inflight_mb, pin_memory,",
        "poll_interval, dedup (%config CkptMagics lists them).",
    ]
    return "\n".join(lines)


@magics_class
class CkptMagics(Magics, Configurable):
    """The ``%ckpt`` line magic. Its settings are traitlets, so ``%config CkptMagics.root = ...`` works."""

    root = Unicode(
        "", help="checkpoint root; empty means ./checkpoints beside the notebook (the kernel's working directory)"
    ).tag(config=True)
    progress = CaselessStrEnum(
        ["auto", "always", "never"], default_value="auto", help="progress bars for saves and loads"
    ).tag(config=True)
    quiet = Bool(False, help="show one-line results by default (as -q)").tag(config=True)
    auto_max_mb = Float(
        512.0, allow_none=True,
        help="%ckpt save with no names leaves out tensors and arrays larger than this many MiB (with a note); "
             "negative or None: no limit",
    ).tag(config=True)
    report_async = Bool(True, help="after each cell, report async saves that finished").tag(config=True)
    # The Checkpointer's options (torchckpt.options.CheckpointOptions), in %config's units.
    lock_timeout = Float(
        60.0, help="seconds to wait for another process's lock on the root before failing"
    ).tag(config=True)
    progress_min_mb = Float(
        256.0, help="with progress 'auto', saves and loads of at least this many MiB show a progress bar"
    ).tag(config=True)
    max_inflight_mb = Float(
        None, allow_none=True,
        help="async saves: cap on snapshot memory not yet written, in MiB; a save beyond it waits (None: no cap)",
    ).tag(config=True)
    pin_memory = Bool(
        None, allow_none=True, help="async saves: page-lock snapshot memory (None: when CUDA is available)"
    ).tag(config=True)
    poll_interval = Float(
        2.0, allow_none=True,
        help="the panel re-reads the root every this many seconds while a save made elsewhere commits (None: never)",
    ).tag(config=True)
    dedup = Bool(
        True, help="a saved file identical to a committed file of the root is stored as a hard link to it"
    ).tag(config=True)

    @validate("lock_timeout", "progress_min_mb", "auto_max_mb", "max_inflight_mb", "poll_interval")
    def _check_option(self, proposal):
        name, value = proposal["trait"].name, proposal["value"]
        valid = _OPTION_RULES[name]
        if not valid[0](value):
            raise TraitError(f"CkptMagics.{name} = {value!r} is not valid: it must be {valid[1]}; "
                             "the setting is unchanged")
        return value

    @observe("lock_timeout", "progress_min_mb", "auto_max_mb", "max_inflight_mb", "pin_memory", "poll_interval",
             "dedup")
    def _options_changed(self, change) -> None:
        for ckpt in getattr(self, "_checkpointers", {}).values():  # those made before the %config too
            ckpt.options = self.options()

    def options(self):
        """The Checkpointer options these settings make (:class:`~torchckpt.options.CheckpointOptions`)."""
        from .options import CheckpointOptions

        return CheckpointOptions(
            lock_timeout=self.lock_timeout,
            progress_min_bytes=_mib(self.progress_min_mb),
            auto_max_bytes=None if self.auto_max_mb is None or self.auto_max_mb < 0 else _mib(self.auto_max_mb),
            max_inflight_bytes=None if self.max_inflight_mb is None else max(1, _mib(self.max_inflight_mb)),
            pin_memory=self.pin_memory,
            poll_interval=self.poll_interval,
            dedup=self.dedup,
        )

    def __init__(self, shell=None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self._checkpointers: dict[Path, Any] = {}
        self._default_root: Path | None = None

    # -- the checkpointer of the current root ----------------------------------------------------
    def resolved_root(self) -> Path:
        if self.root:
            return Path(self.root).expanduser().absolute()
        if self._default_root is None:
            self._default_root = _notebook_dir(self.shell) / "checkpoints"
        return self._default_root

    @property
    def checkpointer(self):
        root = self.resolved_root()
        ckpt = self._checkpointers.get(root)
        if ckpt is None:
            from .notebook import Checkpointer  # imports torch: only on first use

            ckpt = self._checkpointers[root] = Checkpointer(root, options=self.options())
        return ckpt

    def _namespace(self) -> dict[str, Any]:
        """The user's variables, without the ones IPython put there."""
        assert self.shell is not None  # a magic registered with a shell
        hidden = self.shell.user_ns_hidden
        return {k: v for k, v in self.shell.user_ns.items() if k not in hidden or hidden[k] is not v}

    def _progress(self, flag: bool | None) -> bool | None:
        if flag is not None:
            return flag
        return {"auto": None, "always": True, "never": False}[self.progress]

    # -- the magic -------------------------------------------------------------------------------
    @line_magic
    @no_var_expand  # IPython's own expansion is quadratic in the line's length; see _expand
    def ckpt(self, line: str = ""):
        if len(line) > _MAX_LINE:
            raise UsageError(f"%ckpt: the line is {len(line)} characters long; at most {_MAX_LINE} are accepted "
                             "(a checkpoint's metadata, note included, holds at most 1 MiB)")
        line = _expand(self.shell, line)
        try:
            args = split_line(line)
        except ValueError as e:
            raise UsageError(f"%ckpt {line}: {e} (quote values that contain spaces)") from None
        if not args:
            print(_doc())
            return None
        sub, rest = args[0], args[1:]
        if sub in ("help", "-h", "--help"):
            print(_doc())
            return None
        if sub not in _PARSERS:
            import difflib

            close = difflib.get_close_matches(sub, SUBCOMMANDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"unknown %ckpt subcommand {sub!r}; {hint}use one of: {', '.join(SUBCOMMANDS)}")
        try:
            ns = _PARSERS[sub].parse(rest)
        except _Help:
            return None
        handler: Callable[[argparse.Namespace], Any] = getattr(self, f"_do_{sub}")
        try:
            result = handler(ns)
        except UsageError:
            raise
        except TorchckptError as e:
            raise UsageError(in_dialect(_one_line(e), "magic")) from e
        except OSError as e:  # the root or a file: one line, with the path
            detail = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
            raise UsageError(f"%ckpt {sub}: {detail}; check the checkpoint root (%ckpt dir) and its permissions") from e
        if result is not None and hasattr(result, "quiet"):
            result.quiet = ns.quiet or self.quiet
        return result

    ckpt.__doc__ = _doc()

    # -- subcommands ----------------------------------------------------------------------------
    def _do_save(self, a: argparse.Namespace):
        from .notebook import parse_metrics

        try:
            metrics = parse_metrics(a.metrics)
        except ValueError as e:
            raise UsageError(f"{e} (put variable names before --metric)") from e
        return self.checkpointer.save_namespace(
            a.tag, self._namespace(), a.names, step=a.step, async_save=a.async_save, commit=a.commit, note=a.note,
            metrics=metrics, progress=self._progress(a.progress), overwrite=a.overwrite,
        )

    def _do_commit(self, a: argparse.Namespace):
        return self.checkpointer.commit(a.tag, note=a.note)

    def _do_load(self, a: argparse.Namespace):
        assert self.shell is not None  # a magic registered with a shell
        try:
            return self.checkpointer.load(
                a.tag, self.shell.user_ns, a.names or None, map_location=a.map_location, strict=a.strict,
                into=a.into, rng=a.rng, allow=a.allow, trusted=a.trusted, progress=self._progress(a.progress),
                verify=a.verify,
            )
        except (TorchckptError, OSError):
            raise
        except Exception as e:
            if not a.trusted:
                raise
            # Unpickling with --trusted runs whatever the file holds; any failure is the file's.
            raise UsageError(f"%ckpt load --trusted: a file could not be unpickled ({type(e).__name__}: "
                             f"{_one_line(e)}); it is not a torch.save file, or it is damaged") from e

    def _do_ls(self, a: argparse.Namespace):
        return self.checkpointer.list()

    def _do_info(self, a: argparse.Namespace):
        return self.checkpointer.info(a.tag)

    def _do_diff(self, a: argparse.Namespace):
        if a.plot:
            return self.checkpointer.diff_plot(a.a, a.b)
        return self.checkpointer.diff(a.a, a.b)

    def _do_log(self, a: argparse.Namespace):
        return self.checkpointer.log(a.tag)

    def _do_plot(self, a: argparse.Namespace):
        return self.checkpointer.plot(a.metrics or None)

    def _do_verify(self, a: argparse.Namespace):
        return self.checkpointer.verify(a.tag)

    def _do_rm(self, a: argparse.Namespace):
        return self.checkpointer.remove(a.tags, force=a.force)  # all or nothing

    def _do_gc(self, a: argparse.Namespace):
        return self.checkpointer.gc(keep_last=a.keep_last, dry_run=a.dry_run)

    def _do_dir(self, a: argparse.Namespace):
        if a.path is not None:
            path = Path(a.path).expanduser().absolute()
            problem = root_problem(path)
            if problem:
                raise UsageError(f"%ckpt dir {a.path}: {problem}; the root is unchanged ({self.resolved_root()})")
            self.root = str(path)
        return self.resolved_root()

    def _do_ui(self, a: argparse.Namespace):
        if importlib.util.find_spec("torchckpt.panel") is None:
            print("The checkpoint panel is not part of this torchckpt version yet; "
                  "use %ckpt ls, save, load, diff and rm meanwhile.")
            return None
        if not _shows_widgets(self.shell):
            raise UsageError("%ckpt ui shows a widget panel, which needs a Jupyter notebook or JupyterLab (this is "
                             f"{type(self.shell).__name__}, a terminal); here use %ckpt ls, save, load, diff and rm")
        from IPython.display import display

        from .panel import CheckpointPanel

        assert self.shell is not None  # a magic registered with a shell
        panel = CheckpointPanel(checkpointer=self.checkpointer, namespace=self.shell.user_ns)
        display(panel)
        return None

    # -- hooks -----------------------------------------------------------------------------------
    def post_run_cell(self, result=None) -> None:
        """Report async saves that finished while the cell ran (errors are never dropped)."""
        if not self.report_async:
            return
        for ckpt in list(self._checkpointers.values()):
            for outcome in ckpt.poll():
                if outcome.error is not None:
                    print(f"torchckpt: async save {outcome.tag!r} FAILED: {outcome.error} "
                          f"(%ckpt commit {outcome.tag} raises it)", file=sys.stderr)
                else:
                    print(f"torchckpt: async save {outcome.tag!r} committed")

    def complete(self, shell, event) -> list[str]:
        """Completions for ``%ckpt``: subcommands, options, tags, variable names and devices.

        Never an empty list: IPython would then offer its own completions (Python keywords,
        magics, file names), none of which fits here; with nothing to offer, the word as typed.
        """
        return self._completions(event) or [_last_word(event.text_until_cursor)]

    def _completions(self, event) -> list[str]:
        try:
            words = split_line(event.text_until_cursor)
        except ValueError:
            words = event.text_until_cursor.split()
        if event.text_until_cursor.endswith((" ", "\t")):
            words.append("")
        words = words[1:]  # drop "%ckpt"
        if len(words) <= 1:
            return [s for s in SUBCOMMANDS if s.startswith(words[0] if words else "")]
        sub, current = words[0], words[-1]
        parser = _PARSERS.get(sub)
        if parser is None:
            return []
        previous = words[-2] if len(words) >= 2 else ""
        takes_value = {o for a in parser._actions if a.nargs != 0 and a.option_strings for o in a.option_strings}
        if previous == "--map-location":
            from ._devices import valid_locations

            return [d for d in valid_locations() if d.startswith(current)]
        if previous in takes_value:
            return []  # a value the user types (--note, --into, --metric, --step...)
        if current.startswith("-"):
            return sorted(o for a in parser._actions for o in a.option_strings if o.startswith(current))
        out: list[str] = []
        positionals = [w for w in words[1:-1] if not w.startswith("-")]
        with contextlib.suppress(Exception):
            if sub in _TAG_COMMANDS and (sub != "load" or not positionals):
                out += self.checkpointer.tags() + (["latest"] if sub in ("load", "diff", "info", "verify", "log")
                                                   else [])
            if sub == "plot":
                out += list(dict.fromkeys(k for i in self.checkpointer.list().infos for k in
                                          i.meta.metrics))
            if sub == "load" and positionals:
                out += list(self.checkpointer.info(positionals[0]).info.meta.objects)
            if sub == "save" and positionals:
                out += list(self.checkpointer.checkpointable(self._namespace()))
        return [o for o in out if o.startswith(current)]

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish async saves (their errors are printed, never dropped) and release buffers."""
        for ckpt in self._checkpointers.values():
            try:
                ckpt.close()
            except Exception as e:  # noqa: BLE001 - report every checkpointer's failure
                print(f"torchckpt: {e}", file=sys.stderr)
        self._checkpointers.clear()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


#: trait -> (accepts the value, what valid values are): checked when the trait is set (%config).
_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lock_timeout": (lambda v: _finite(v) and v >= 0, "a number of seconds >= 0"),
    "progress_min_mb": (lambda v: _finite(v) and v >= 0, "a number of MiB >= 0 (0: a bar for every save and load)"),
    "auto_max_mb": (lambda v: v is None or _finite(v), "a number of MiB (negative or None: no limit)"),
    "max_inflight_mb": (lambda v: v is None or _finite(v) and v > 0, "a number of MiB > 0, or None (no cap)"),
    "poll_interval": (lambda v: v is None or _finite(v) and v > 0, "a number of seconds > 0, or None (never)"),
}


def _mib(value: float) -> int:
    return int(value * (1 << 20))


def _last_word(text: str) -> str:
    return "" if not text or text[-1].isspace() else text.split()[-1]


def _shows_widgets(shell) -> bool:
    """Whether the shell runs in a Jupyter kernel, whose front end can display widgets."""
    return getattr(shell, "kernel", None) is not None


def root_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint root (None: it can). Nothing on disk is changed.

    The nearest existing directory must accept a new directory: tried by making and removing
    one, which also refuses pseudo file systems (/proc) and read-only mounts.
    """
    import tempfile

    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a directory"
        probe = path
    else:
        probe = path.parent
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} is a file, so {path} cannot be made under it"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".torchckpt-probe-", dir=probe))
    except OSError as e:
        return f"cannot create directories in {probe} ({e.strerror or e})"
    return None


def _notebook_dir(shell) -> Path:
    """The notebook's directory when the kernel knows it (Jupyter sets ``__session__``), else cwd."""
    session = shell.user_ns.get("__session__") or os.environ.get("JPY_SESSION_NAME")
    if isinstance(session, str) and session.endswith(".ipynb"):
        path = Path(session).expanduser()
        if path.is_absolute() and path.parent.is_dir():
            return path.parent
    return Path.cwd()


_COMPLETE_KEY = "%ckpt"


def load_ipython_extension(ip) -> None:
    """Register ``%ckpt`` (``%load_ext torchckpt``). Idempotent: a previous instance is removed first."""
    unload_ipython_extension(ip)
    _drop_bad_settings(ip.config)
    magics = CkptMagics(shell=ip, config=ip.config, parent=ip)
    ip.register_magics(magics)  # Magics.__init__ already put it in ip.configurables (for %config)
    ip.events.register("post_run_cell", magics.post_run_cell)
    ip.set_hook("complete_command", magics.complete, str_key=_COMPLETE_KEY)


def _drop_bad_settings(config) -> None:
    """Remove (and name) CkptMagics settings in the shell's config that the traits refuse.

    IPython's ``%config`` keeps a refused value in the shell's shared config, so without this a
    ``%reload_ext torchckpt`` after a typo would fail; a bad value from a config file likewise.
    """
    if "CkptMagics" not in config:
        return
    section = config.CkptMagics
    probe = CkptMagics()
    for name in list(section):
        if name not in CkptMagics.class_trait_names(config=True):
            continue  # traitlets warns about unknown names itself
        try:
            setattr(probe, name, section[name])
        except TraitError as e:
            print(f"torchckpt: ignoring the setting CkptMagics.{name}: {_one_line(e)}", file=sys.stderr)
            del section[name]


def unload_ipython_extension(ip) -> None:
    """Remove ``%ckpt``, its hooks and configuration; finish pending async saves."""
    manager = ip.magics_manager
    old = manager.registry.get(CkptMagics.__name__)
    if old is None:
        return
    manager.registry.pop(CkptMagics.__name__, None)
    current = manager.magics["line"].get("ckpt")
    if current is not None and getattr(current, "__self__", None) is old:
        del manager.magics["line"]["ckpt"]
    with contextlib.suppress(ValueError):
        ip.events.unregister("post_run_cell", old.post_run_cell)
    dispatcher = ip.strdispatchers.get("complete_command")
    if dispatcher is not None:
        dispatcher.strs.pop(_COMPLETE_KEY, None)
    ip.configurables[:] = [c for c in ip.configurables if c is not old]
    if old.root:  # %reload_ext keeps the root chosen with %ckpt dir
        ip.config.CkptMagics.root = old.root
    old.close()
