#!/usr/bin/env python
"""Run the reliability suite with its full counts and write docs/RELIABILITY.md from the results.

    python scripts/reliability_report.py                 # full counts (TORCHCKPT_FULL=1), minutes
    python scripts/reliability_report.py --reduced       # CI's reduced counts, under a minute
    python scripts/reliability_report.py --seed 1234     # fix the random kill delays and points

Every trial of the suite appends one JSON line with its outcome to a log (the tests'
TORCHCKPT_RELIABILITY_LOG); this script runs pytest, reads that log and the JUnit report, and
writes the tables. A trial is logged only after all of its assertions passed, so the counts are
counts of trials that kept every promise; a failing run says so at the top of the report and
exits non-zero.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_reliability_crash.py",
    "tests/test_reliability_disk.py",
    "tests/test_reliability_corruption.py",
    "tests/test_reliability_concurrency.py",
    "tests/test_reliability_leftovers.py",
    "tests/test_security.py",
    "tests/test_roundtrip_properties.py",
]

# What the suite found in the library, and how each was fixed (kept with the suite's history).
FOUND = [
    ("disk full / file too large", "a failed write aborted the whole process (a dead kernel): torch's C++ zip writer "
     "finished itself in its destructor after the error and hit std::terminate", "serialization.save finishes the "
     "writer on failure; the OSError surfaces as WriteError (also through plain torch.save, which wraps it)"),
    ("disk full", "a commit whose new `latest` could not be written raised an error yet left the tag committed",
     "the manifest is removed (durably) before the error is raised: a failed commit changes nothing"),
    ("hostile input", "verify, load and the DeepSpeed engine followed symbolic links out of the tag directory "
     "(a same-bytes copy even verified), and opened FIFOs (hang)", "files that resolve outside the tag, or are not "
     "regular files, are refused before they are opened"),
    ("hostile input", "a write followed a symlinked subdirectory out of the tag directory", "refused before mkdir"),
    ("hostile input", "a crafted manifest with deeply nested metadata raised RecursionError and broke listing the "
     "whole root; metadata over 1 MiB was accepted on read; '.' as a file path raised IndexError",
     "ManifestError for each; the read side enforces the write side's limits"),
    ("hostile input", "metadata holding a multi-element tensor raised RuntimeError", "ManifestError naming the value"),
    ("concurrency", "two processes saving the same tag interleaved files and manifest (a committed manifest could "
     "describe the other process's bytes)", "a second single-process save of a tag in flight gets CheckpointInUseError"),
    ("leftovers", "gc could remove a tag between its directory's creation and its writing lock; the save then "
     "failed or committed a manifest listing removed files", "a transaction begins under the root lock gc holds"),
    ("leftovers", "gc deleted committed files whose names look temporary ('.x.tmp-1' is a legal file name)",
     "files listed in the manifest are never leftovers"),
    ("corruption", "a checkpoint with an unreadable manifest could not be read at all", "verify=False, "
     "allow_incomplete=True reads it; the error says so"),
    ("round trip", "b'' and bytearray values could not be loaded safely", "builtins.bytes/bytearray allowlisted"),
    ("round trip", "async saves lost the strides of zero-element tensors", "the snapshot keeps them"),
]  # fmt: skip


def run_suite(log: Path, junit: Path, *, full: bool, seed: int) -> tuple[int, float]:
    env = dict(os.environ, TORCHCKPT_RELIABILITY_LOG=str(log), TORCHCKPT_SEED=str(seed))
    env.pop("TORCHCKPT_FULL", None)
    if full:
        env["TORCHCKPT_FULL"] = "1"
    cmd = [sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    print("running:", " ".join(cmd), flush=True)
    started = time.monotonic()
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    return rc, time.monotonic() - started


def junit_counts(junit: Path) -> dict[str, int]:
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def counter_text(c: collections.Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0]))))


def render(entries: list[dict], *, counts: dict, rc: int, seconds: float, full: bool, seed: int) -> str:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from _crash_worker import KILL_POINTS

    by = collections.defaultdict(list)
    for e in entries:
        by[e["category"]].append(e)
    crash = by["crash"]
    points = [e for e in crash if e["kind"] == "kill point"]
    randoms = [e for e in crash if e["kind"] == "random delay"]
    ds = [e for e in crash if e["kind"] == "deepspeed"]
    leftovers_kills = [e for e in by["leftovers"] if e["kind"].startswith("gc killed")]
    kills = len(crash) + len(leftovers_kills)
    passed = rc == 0 and not counts["failures"] and not counts["errors"]
    status = "all passed" if passed else f"**FAILED** ({counts['failures']} failures, {counts['errors']} errors)"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "full counts (`TORCHCKPT_FULL=1`)" if full else "CI's reduced counts"
    lines = [
        "# Reliability report",
        "",
        "Written by `scripts/reliability_report.py` from its own run of the reliability suite — do not edit by "
        "hand; rerun the script. Every number below counts trials that passed all of their assertions.",
        "",
        f"- run: {now}, {mode}, seed {seed}, {seconds:.0f} s",
        f"- machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        f"- pytest: {counts['tests']} tests, {status}, {counts['skipped']} skipped",
        "",
        "## Reproduce",
        "",
        "```bash",
        "python scripts/reliability_report.py                # this report: full counts, rewrites docs/RELIABILITY.md",
        "python scripts/reliability_report.py --seed " + str(seed) + "    # the same random choices as this run",
        "TORCHCKPT_FULL=1 python -m pytest " + " ".join(TESTS) + "   # the same tests, no report",
        "```",
        "",
        "CI (`./dev test`) runs the same tests with reduced counts (about a minute on 2 cores). `TORCHCKPT_SEED=N`",
        "fixes the random choices of any run; `TORCHCKPT_RELIABILITY_LOG=FILE` logs each trial's outcome.",
        "",
        "## Summary",
        "",
    ]
    summary = [
        ["Killed mid-save (SIGKILL)", kills,
         "every previously committed tag loaded with the saved values and verified; `latest` named a committed tag "
         "(or, torn by DeepSpeed's own plain write, fell back to the newest one with a warning); the tag being "
         "written was committed or incomplete, never torn; gc then removed exactly the debris"],
        ["Disk full / file too large", len(by["disk"]),
         "clear WriteError naming the file and the cause; no temporary file; nothing committed; previous checkpoint intact"],
        ["Corruption", sum(e.get("trials", 1) for e in by["corruption"]),
         "`verify` named the damaged file (or the manifest); `load` refused unless told `verify=False`"],
        ["Concurrency", len(by["concurrency"]),
         "no interleaved manifest or `latest`; same tag refused; lock timeout with a clear message; stale locks recovered"],
        ["Leftovers and retention", len(by["leftovers"]),
         "debris listed by the dry run (which changed nothing) and removed; committed bytes untouched; `latest` and "
         "tags being written kept"],
        ["Hostile input", len(by["security"]),
         "refused before touching the disk or running anything (the pickle's side effect never happened)"],
        ["Round trip (hypothesis)", sum(e["examples"] for e in by["roundtrip"]) * 2,
         "equal values (bit for bit), dtypes, strides, containers and storage sharing, sync and async"],
    ]  # fmt: skip
    lines += [table(["class", "trials", "outcome"], summary), ""]

    lines += ["## Killed mid-save", "",
              f"{len(crash)} SIGKILLs of a saver process (plus {len(leftovers_kills)} inside gc, below). After each kill "
              "the root is checked (`tests/_reliability.py: check_root`), then `gc(keep_last=4)` runs and must remove "
              "exactly the incomplete tags and temporary files.", "",
              "### At each step of the commit protocol (the saver SIGKILLs itself there)", ""]  # fmt: skip
    rows = []
    for point, desc in KILL_POINTS.items():
        hits = [e for e in points if e["point"] == point]
        if hits:
            rows.append([f"`{point}`", desc, len(hits), counter_text(collections.Counter(e["mode"] for e in hits)),
                         counter_text(collections.Counter(e["new_tag"] for e in hits))])  # fmt: skip
    lines += [table(["kill point", "where", "trials", "mode", "tag being saved, after"], rows), ""]
    if randoms:
        lines += ["### At random instants", "",
                  f"{len(randoms)} kills after a random delay (0.05-0.8 s) while the saver wrote checkpoints back to back "
                  f"({counter_text(collections.Counter(e['mode'] for e in randoms))}). Where they landed:", "",
                  table(["phase at the kill", "trials"], [[f"`{k}`", v] for k, v in
                        sorted(collections.Counter(e["phase"] for e in randoms).items(), key=lambda kv: -kv[1])]), "",
                  f"Committed checkpoints verified after these kills: {sum(e['committed_after'] for e in randoms)} "
                  "(counting a tag once per trial it survived); lost: 0.", ""]  # fmt: skip
    if ds:
        lines += ["### DeepSpeed engine (`engine.save_checkpoint`, one rank, gloo)", "",
                  "DeepSpeed rewrites `latest` with a plain `open(..., 'w')` after our commit. Killing it there tears "
                  "`latest`; the store falls back to the newest committed tag with a `LatestFallbackWarning`, and the "
                  "next run resumes from it (`engine.load_checkpoint(dir, tag=store.latest())`) with the model "
                  "bit-identical to what was saved.", "",
                  table(["kill", "mode", "trials", "`latest` fell back", "tag being saved, after"],
                        [[f"`{p}`", m, len(g), sum(e["latest_fell_back"] for e in g),
                          counter_text(collections.Counter(e["new_tag"] for e in g))]
                         for (p, m), g in _groups(ds, "point", "mode")]), ""]  # fmt: skip

    def simple(category: str, title: str, intro: str, columns: list[str]) -> list[str]:
        merged: dict[tuple, int] = collections.OrderedDict()
        for e in by[category]:
            key = tuple(str(c) for c in [e["kind"]] + [e.get(c, "") for c in columns])
            merged[key] = merged.get(key, 0) + int(e.get("trials", 1))
        return [f"## {title}", "", intro, "", table(["case", *columns, "trials"], [[*k, v] for k, v in merged.items()]), ""]

    lines += simple("disk", "Disk full and file too large",
                    "RLIMIT_FSIZE in a subprocess (always), and a real full filesystem: a 1 MiB tmpfs, filled so that "
                    "the data, the manifest or the new `latest` is the write that fails (needs root; skipped otherwise).",
                    ["mode", "error"])  # fmt: skip
    lines += simple("corruption", "Corruption",
                    "A committed tag with two files, damaged on disk; a second tag must stay loadable throughout.",
                    ["file", "where", "keep"])  # fmt: skip
    lines += simple("concurrency", "Concurrency",
                    "Separate processes forked from a warm worker (`tests/_crash_worker.py serve`).",
                    ["saves", "reads_while_saving"])  # fmt: skip
    lines += simple("leftovers", "Leftovers and retention", "Debris from real kills, then `gc` (dry run first).",
                    ["incomplete", "tmp_files"])  # fmt: skip
    sec = by["security"]
    pickles = [e for e in sec if e["kind"].startswith("hostile pickle")]
    tags = [e for e in sec if e["kind"] == "bad tag name"]
    paths = [e for e in sec if e["kind"] == "manifest path outside the tag"]
    other = [e for e in sec if e not in pickles and e not in tags and e not in paths]
    lines += ["## Hostile input", "",
              f"- **Pickles that run code** ({len(pickles)} cases): a class whose `__reduce__` creates a marker file "
              "(via `exec` or `os.system`), at top level, inside a state dict, inside allowlisted containers "
              "(`OrderedDict`, `argparse.Namespace`, `defaultdict`), in torch's zip and legacy formats and as a raw "
              "pickle. Loaded through `store.load` (with every non-trusting option), the DeepSpeed engine and "
              "`torchckpt.file_structure`: always `UnsafeCheckpointError`, the marker never created. `trusted=True` creates "
              "it — proof the payload is real.",
              f"- **Tag names** ({len(tags)}): " + ", ".join(f"`{_short(e['tag'])}`" for e in tags) + " — refused by "
              "transaction, set_latest, load, verify, info and delete, before the root directory exists.",
              f"- **Manifest paths out of the tag** ({len(paths)}): " + ", ".join(f"`{e['path']}`" for e in paths)
              + " — the manifest is refused as unreadable; no file outside the tag is opened.",
              ] + [f"- {e['kind']}: refused" for e in other] + [""]  # fmt: skip
    rt = by["roundtrip"]
    if rt:
        lines += ["## Round-trip properties", "",
                  f"Hypothesis, {rt[0]['examples']} examples per mode ({rt[0]['modes']}), {rt[0]['dtypes']} dtypes "
                  "(float16/bfloat16/float32/float64, int8-64, uint8-64, bool, complex64/128, float8 e4m3fn/e5m2/"
                  "fnuz/e8m0), empty and zero-size tensors, 0-d tensors, non-contiguous views (step slices, "
                  "transposes, expands, narrows) sharing storage, Parameters, arbitrary bit patterns (NaN payloads), "
                  "big ints, floats with NaN/inf, complex, str, bytes, dtypes, torch.Size, in dicts, OrderedDicts, "
                  "int-keyed dicts, lists and tuples. Every tensor is overwritten right after the save call; the loaded "
                  "state equals the state at the call.", ""]  # fmt: skip
    lines += ["## What the suite found, and the fixes", "",
              table(["class", "bug", "fix"], [list(f) for f in FOUND]), "",
              "## Not covered", "",
              "- Power loss and kernel crashes: a SIGKILL keeps the page cache, so these trials prove the protocol's "
              "ordering (write, fsync, rename, directory fsync, manifest, `latest`), not the disk's honesty about "
              "fsync.",
              "- Network filesystems (NFS, Lustre): `flock` and `rename` semantics differ there.",
              "- Multi-rank commits (many processes, one tag): tested by the multi-rank suite (tests/test_distributed.py).",
              "- A hand edit of a manifest's *metadata* (step, note) is not detected: the manifest's checksums cover "
              "the files, not itself.",
              ""]  # fmt: skip
    return "\n".join(lines)


def _short(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[: width - 4] + "...'"


def _groups(entries: list[dict], *keys: str):
    groups = collections.OrderedDict()
    for e in entries:
        groups.setdefault(tuple(e.get(k) for k in keys), []).append(e)
    return groups.items()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reduced", action="store_true", help="CI's reduced counts instead of the full ones")
    parser.add_argument("--seed", type=int, default=0, help="fix the random choices (default: from the clock)")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    args = parser.parse_args(argv)
    seed = args.seed or int(time.time()) % 100_000 + 1
    with tempfile.TemporaryDirectory() as tmp:
        log, junit = Path(tmp) / "outcomes.jsonl", Path(tmp) / "junit.xml"
        rc, seconds = run_suite(log, junit, full=not args.reduced, seed=seed)
        entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        counts = junit_counts(junit) if junit.exists() else {"tests": 0, "failures": 0, "errors": 1, "skipped": 0}
    args.output.write_text(render(entries, counts=counts, rc=rc, seconds=seconds, full=not args.reduced, seed=seed))
    print(f"wrote {args.output} ({len(entries)} outcomes, pytest exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
