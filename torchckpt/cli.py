"""``torchckpt``: look after checkpoints from a terminal, CI or a job script.

A thin shell over :class:`~torchckpt.store.CheckpointStore`, :mod:`torchckpt.file_structure`,
:mod:`torchckpt.interop`, :mod:`torchckpt.deepspeed.adopt` and :mod:`torchckpt.diff`: it parses, calls,
renders and maps errors to exit codes. Nothing heavy is imported before a command runs (``--help``
imports neither torch nor deepspeed; deepspeed only when a checkpoint being loaded needs its classes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from . import __version__, results
from .errors import (
    InvalidTagError,
    TorchckptError,
)

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

EXIT_CODES = """\
exit status:
  0  success (for verify: every checksum matched; for diff: no differences)
  1  a problem was found: a checksum mismatch or missing file, an unreadable file or
     manifest, differences (diff), or an I/O failure
  2  usage or user error: bad arguments, unknown root or tag, a refused action
     (removing `latest` or a tag being written), a file that safe loading refuses"""

class CliError(Exception):
    """A user mistake found by the shell itself (exit 2), e.g. a root that does not exist."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line and the exit codes in every --help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"torchckpt: error: {self.prog}: {message}; see '{self.prog} --help'\n")
        raise SystemExit(EXIT_USAGE)


# -- helpers -------------------------------------------------------------------------------------
def _store(root: str, *, must_exist: bool = True):
    from .store import CheckpointStore

    path = Path(root).expanduser()
    if must_exist and not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise CliError(f"checkpoint root {root} {what}; check the path (it is the directory that holds the tags)")
    return CheckpointStore(path)


#: Where results go: the real stdout. While a command runs, sys.stdout points at stderr, so that
#: whatever a library prints (DeepSpeed logs to stdout when imported) never mixes into results.
_results: TextIO | None = None


def _echo(*parts: Any, sep: str = " ") -> None:
    (_results or sys.stdout).write(sep.join(map(str, parts)) + "\n")


def _tag(store, tag: str | None) -> str:
    """``latest`` as the store resolves it; on a root with no committed tag, the one DeepSpeed's
    own ``latest`` file names (its engine writes no manifest)."""
    if tag is not None and not tag.strip():
        raise InvalidTagError(f"tag {tag!r} is empty; give a tag (torchckpt ls {store.root} lists them) or 'latest'")
    resolved, note = store.lookup(tag)
    if note is not None:
        sys.stderr.write(f"torchckpt: note: {note}\n")
    return resolved


def _print_json(doc: Any) -> None:
    _echo(json.dumps(doc, indent=1, default=str))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# -- ls ------------------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:

    store = _store(args.root)
    infos = store.list()
    if args.json:
        _print_json([results.record(i) for i in infos])
        return EXIT_OK
    if not infos:
        _echo(f"no checkpoints in {store.root}")
        return EXIT_OK
    _echo(results.render_table([results.row(i) for i in infos]))
    return EXIT_OK


# -- log -----------------------------------------------------------------------------------------
def cmd_log(args: argparse.Namespace) -> int:
    from .lineage import build_log

    store = _store(args.root)
    log = build_log(store, args.tag)
    if args.json:
        _print_json({"root": str(store.root), "focus": log.focus, "tags": log.records(),
                     "graph": [{"tag": tag, "graph": line} for tag, line in log.graph]})
        return EXIT_OK
    _echo(log.to_text())
    return EXIT_OK


# -- info ----------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    store = _store(args.root)
    details = results.TagDetails(store.info(_tag(store, args.tag)), more_hint="--all-values or --json lists them")
    files = [f["path"] for f in details.files()]
    if args.file:
        if args.file not in files:
            raise CliError(f"checkpoint {details.info.tag!r} has no file {args.file!r}; it has: {', '.join(files)}")
        files = [args.file]
    if not args.files_only:
        details = details.with_structures(files, all_values=args.all_values)
    if args.json:
        _print_json(details.to_dict())
    else:
        _echo(details.to_text())
    return EXIT_PROBLEM if details.failed else EXIT_OK


# -- verify --------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:

    store = _store(args.root)
    if args.all and args.tag:
        raise CliError("give a TAG or --all, not both")
    reports = store.verify_all(None if args.all else [_tag(store, args.tag)])
    outcomes = [{"tag": r.tag, "status": "skipped" if r.skipped else "ok" if r.ok else "problem",
                 "files_checked": r.files_checked, "problems": list(r.problems),
                 **({"reason": r.skipped} if r.skipped else {})} for r in reports]
    bad = [r for r in outcomes if r["status"] == "problem"]
    if args.json:
        _print_json({"ok": not bad, "checkpoints": outcomes})
    else:
        if not outcomes:
            _echo(f"no checkpoints in {store.root}")
        for r in outcomes:
            if r["status"] == "ok":
                _echo(f"ok       {r['tag']} ({_plural(r['files_checked'], 'file')})")
            elif r["status"] == "skipped":
                _echo(f"skipped  {r['tag']}: {r['reason']}")
            for p in r["problems"]:
                _echo(f"PROBLEM  {r['tag']}: {p}")
        if bad:
            n = sum(len(r["problems"]) for r in bad)
            print(f"{_plural(n, 'problem')} in {_plural(len(bad), 'checkpoint')} of {len(outcomes)}", file=sys.stderr)
    return EXIT_PROBLEM if bad else EXIT_OK


# -- rm / gc -------------------------------------------------------------------------------------
def cmd_rm(args: argparse.Namespace) -> int:
    for tag in _store(args.root).delete_all(args.tags, allow_latest=args.force):  # all or nothing
        _echo(f"removed {tag}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    store = _store(args.root)
    plan = store.gc(keep_last=args.keep_last, dry_run=args.dry_run)
    if args.json:
        _print_json({
            "dry_run": plan.dry_run, "committed": plan.committed, "incomplete": plan.incomplete,
            "leftovers": [str(p) for p in plan.leftovers], "kept": plan.kept,
        })  # fmt: skip
        return EXIT_OK
    verb = "would remove" if plan.dry_run else "removed"
    if plan.committed:
        _echo(f"{verb} {_plural(len(plan.committed), 'old checkpoint')}: {', '.join(plan.committed)}")
    if plan.incomplete:
        _echo(f"{verb} {_plural(len(plan.incomplete), 'incomplete checkpoint')}: {', '.join(plan.incomplete)}")
    if plan.leftovers:
        _echo(f"{verb} {_plural(len(plan.leftovers), 'leftover')} of interrupted writes and deletions")
    if not (plan.committed or plan.incomplete or plan.leftovers):
        _echo("nothing to remove")
    _echo(f"kept {len(plan.kept)}: {', '.join(plan.kept) if plan.kept else '-'}")
    return EXIT_OK


# -- diff ----------------------------------------------------------------------------------------
def cmd_diff(args: argparse.Namespace) -> int:
    import math

    from .diff import diff_tags

    store = _store(args.root)
    result = diff_tags(store, args.a, args.b)
    if args.json:
        def plain(x: Any) -> Any:
            return None if isinstance(x, float) and not math.isfinite(x) else x

        _print_json({
            "a": result.a, "b": result.b, "identical": result.identical, "max_delta": plain(result.max_delta),
            "objects_added": result.objects_added, "objects_removed": result.objects_removed,
            "keys_added": result.keys_added, "keys_removed": result.keys_removed,
            "shape_changes": result.shape_changes, "dtype_changes": result.dtype_changes,
            "deltas": {k: plain(v) for k, v in result.deltas.items()},
            "value_changes": result.value_changes, "metadata_changes": result.metadata_changes,
        })  # fmt: skip
    else:
        _echo(result.to_text())
    return EXIT_OK if result.identical else EXIT_PROBLEM


# -- export / import / adopt ---------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from .interop import export_safetensors

    store = _store(args.root)
    result = export_safetensors(
        store, _tag(store, args.tag), args.out, key=args.key, allow=args.allow, trusted=args.trusted,
        allow_incomplete=args.allow_incomplete,
    )  # fmt: skip
    if result.skipped:
        shown = ", ".join(result.skipped[:5]) + (" ..." if len(result.skipped) > 5 else "")
        print(f"torchckpt: note: left out {_plural(len(result.skipped), 'non-tensor entry')}: {shown}", file=sys.stderr)
    _echo(f"exported {_plural(result.tensors, 'tensor')} ({results.human_size(result.nbytes)}) "
          f"from {result.tag}/{result.source} to {result.path}")  # fmt: skip
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from .interop import import_safetensors

    src = Path(args.file)
    if not src.is_file():
        raise CliError(f"{src} does not exist; give the path of a .safetensors file")
    store = _store(args.root, must_exist=False)
    manifest = import_safetensors(store, src, args.tag, key=args.key, note=args.note, save_latest=not args.no_latest)
    rec = next(iter(manifest.files.values()))
    _echo(f"imported {src} as {manifest.tag}/{rec.path} ({results.human_size(rec.size)}), committed")
    return EXIT_OK


def cmd_adopt(args: argparse.Namespace) -> int:
    from .deepspeed.adopt import adopt, adoptable

    store = _store(args.root)
    if args.all and args.tag:
        raise CliError("give a TAG or --all, not both")
    if not args.all and not args.tag:
        raise CliError("give the TAG to adopt, or --all for every checkpoint DeepSpeed's own engine wrote")
    tags = adoptable(store) if args.all else [_tag(store, args.tag)]
    if args.all and not tags:
        without = [i.tag for i in store.list() if not i.committed and not i.in_flight]
        if without:
            _echo(f"nothing to adopt in {store.root}: no tag was written by DeepSpeed's own engine; "
                  f"{', '.join(without)} {'has' if len(without) == 1 else 'have'} no manifest for another reason "
                  "(see torchckpt ls and info)")
        else:
            _echo(f"nothing to adopt in {store.root}: every checkpoint has a manifest")
    for tag in tags:
        manifest = adopt(store, tag, allow=args.allow, trusted=args.trusted, note=args.note)
        from .manifest import CheckpointMeta

        step = CheckpointMeta.parse(manifest.metadata).step
        _echo(f"adopted {tag}: {_plural(len(manifest.files), 'file')} loaded and checksummed, manifest written"
              + (f" (step {step})" if step is not None else ""))  # fmt: skip
    return EXIT_OK


# -- the parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="torchckpt",
        description=(
            "Inspect, verify and manage torchckpt and DeepSpeed checkpoints.\n"
            "ROOT is a checkpoint root: the directory holding one sub-directory per tag (and `latest`)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"torchckpt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str,
                description: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help)
        p.set_defaults(func=func)
        p.add_argument("root", metavar="ROOT", help="the checkpoint root directory")
        return p

    from_format = "\n".join(f"  {k:<11} {v}" for k, v in _status_meanings().items())
    p = command("ls", cmd_ls, "list the checkpoints of a root",
                "List every tag: created, size, step, metrics, note, status, latest "
                "(*).\n\nstatus:\n" + from_format)  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("log", cmd_log, "draw the lineage tree of a root's checkpoints",
                "Draw the tree of committed tags, newest first, as git log --graph: each notebook save records\n"
                "the tag it branched from (its parent). A removed parent is shown as (removed).")  # fmt: skip
    p.add_argument("tag", metavar="TAG", nargs="?", help="show only this tag's ancestors and descendants")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("info", cmd_info, "show a checkpoint's manifest, files and tensors (no tensor data is read)",
                "Show a tag's manifest, its files and every tensor in them (name, shape, dtype, the device it was "
                "saved on),\nread from the files' structure: no tensor data is loaded, and no pickled code "
                "runs.")  # fmt: skip
    p.add_argument("tag", metavar="TAG", help="the tag (or 'latest')")
    p.add_argument("--file", metavar="FILE", help="only this file of the tag")
    p.add_argument("--files-only", action="store_true", help="list files, not tensors")
    p.add_argument("--all-values", action="store_true", help="list every non-tensor value (default: the first 12)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("verify", cmd_verify, "recompute checksums against the manifest",
                "Recompute every file's checksum and compare it with the manifest. Each problem is printed on its\n"
                "own line; the exit status is 0 only when every checksum matches.")  # fmt: skip
    p.add_argument("tag", metavar="TAG", nargs="?", help="the tag to verify (default: latest)")
    p.add_argument("--all", action="store_true", help="verify every tag of the root")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("diff", cmd_diff, "compare two checkpoints (as %%ckpt diff)",
                "Compare two committed tags, as %ckpt diff: objects and keys added or removed, shape and dtype\n"
                "changes, the largest |B - A| of every tensor, changed values and metadata. Exit status 1 when\n"
                "anything but the metadata (step, metrics, note, versions) differs.")  # fmt: skip
    p.add_argument("a", metavar="A", help="the first tag (or 'latest')")
    p.add_argument("b", metavar="B", help="the second tag (or 'latest')")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("rm", cmd_rm, "remove checkpoints",
                "Remove tags. A tag being written is never removed; `latest` only with --force.")  # fmt: skip
    p.add_argument("tags", metavar="TAG", nargs="+", help="the tags to remove")
    p.add_argument("--force", action="store_true", help="also remove the tag `latest` names")

    p = command("gc", cmd_gc, "remove leftovers and old checkpoints",
                "Remove incomplete tags nobody is writing, leftovers of interrupted writes and, with --keep-last N,\n"
                "committed tags older than the newest N. Never removes `latest`, a tag being written, or a\n"
                "checkpoint DeepSpeed's own engine wrote (adopt it to manage it).")  # fmt: skip
    p.add_argument("--keep-last", type=results.positive_int, metavar="N", help="keep the newest N committed tags")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = command("export", cmd_export, "write a checkpoint's model weights as a .safetensors file",
                "Write model weights as safetensors (no pickle: safe to share and load anywhere).\n"
                "--key picks the object: a file of the tag (model -> model.pt), DeepSpeed's module (model),\n"
                "or a top-level entry of a file. Non-tensor entries are left out (and named).")  # fmt: skip
    p.add_argument("tag", metavar="TAG", help="the tag (or 'latest')")
    p.add_argument("out", metavar="OUT.safetensors", help="the file to write")
    p.add_argument("--key", default="model", help="which object to export (default: model)")
    _load_options(p)
    p.add_argument("--allow-incomplete", action="store_true", help="export from a tag without a manifest (unverified)")

    p = sub.add_parser("import", help="commit a .safetensors file as a new checkpoint",
                       description="Commit a safetensors file as TAG/objects/<key>.pt (a state dict, as a notebook "
                                   "saves a module), with a manifest.")  # fmt: skip
    p.set_defaults(func=cmd_import)
    p.add_argument("root", metavar="ROOT", help="the checkpoint root directory (created if missing)")
    p.add_argument("tag", metavar="TAG", help="the new tag")
    p.add_argument("file", metavar="IN.safetensors", help="the file to import")
    p.add_argument("--key", default="model", help="the object's name: the file is objects/<key>.pt (default: model)")
    p.add_argument("--note", help="the checkpoint's note")
    p.add_argument("--no-latest", action="store_true", help="do not point `latest` at the new tag")

    p = command("adopt", cmd_adopt, "write a manifest for a checkpoint DeepSpeed's own engine wrote",
                "Load every file of a tag that has no manifest (safely, weights-only, on CPU) to check it, then\n"
                "write its manifest: from then on it is verified and managed like any committed "
                "checkpoint.")  # fmt: skip
    p.add_argument("tag", metavar="TAG", nargs="?", help="the tag to adopt")
    p.add_argument("--all", action="store_true", help="adopt every tag DeepSpeed's own engine wrote")
    p.add_argument("--note", help="the manifest's note (default: where it came from)")
    _load_options(p)
    return parser


def _load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow", action="append", default=[], metavar="MODULE.NAME",
                   help="a global safe loading may allow (repeatable)")  # fmt: skip
    p.add_argument("--trusted", action="store_true", help="load with weights_only=False: runs pickled code, trusted "
                                                          "files only")


def _status_meanings() -> dict[str, str]:
    from .results import STATUS_MEANINGS

    return STATUS_MEANINGS


# -- running -------------------------------------------------------------------------------------
def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(f"torchckpt: warning: {_one_line(message)}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 problem found, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        sys.stderr.write("torchckpt: error: no command given; see 'torchckpt --help' (ls, info, verify, diff, ...)\n")
        return EXIT_USAGE
    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _run(args)
    finally:
        warnings.showwarning = shown


def _run(args: argparse.Namespace) -> int:
    global _results
    for stream in (sys.stdout, sys.stderr):  # tags and notes may hold any character; never crash on them
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    _results = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return args.func(args)
    except CliError as e:
        return _fail(args, e, EXIT_USAGE)
    except TorchckptError as e:  # each class says whether it is the user's mistake (exit 2) or a problem found
        return _fail(args, e, EXIT_USAGE if e.usage else EXIT_PROBLEM)
    except ValueError as e:  # option validation in the API (e.g. keep_last)
        return _fail(args, e, EXIT_USAGE)
    except BrokenPipeError:  # `torchckpt ls ROOT | head`: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:
        detail = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        return _fail(args, f"{detail}; check the path and its permissions", EXIT_PROBLEM)
    except KeyboardInterrupt:
        sys.stderr.write("torchckpt: interrupted\n")
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, and the way to more
        if args.debug:
            raise
        return _fail(args, f"internal error {type(e).__name__}: {e}; rerun with --debug for a traceback and report it",
                     EXIT_PROBLEM)  # fmt: skip
    finally:
        _results = None


def _fail(args: argparse.Namespace, error: BaseException | str, code: int) -> int:
    if args.debug and isinstance(error, BaseException):
        import traceback

        traceback.print_exception(error)
    from .errors import in_dialect

    sys.stderr.write(f"torchckpt: error: {in_dialect(_one_line(error), 'cli')}\n")
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
