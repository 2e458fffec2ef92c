"""Killed mid-save: a saver SIGKILLed at any instant never loses or corrupts a committed checkpoint.

Savers are forked from a warm worker process (tests/_crash_worker.py) and killed either at a
random instant or at a chosen point of the commit protocol (the worker patches os.replace,
os.fsync and the hashing writer in its own process to SIGKILL itself there). After every kill
the root must satisfy the invariants of :func:`_reliability.check_root`, and gc must remove the
debris and nothing else. Reduced counts by default; TORCHCKPT_FULL=1 runs the full counts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _crash_worker import KILL_POINTS, read_journal, step_of
from _net import free_port
from _reliability import (  # noqa: F401
    WORKER,
    Zygote,
    check_root,
    count,
    gc_after_crash,
    read_phase,
    record,
    rng,
    zygote,
)

STORE_POINTS = [p for p in KILL_POINTS if not p.startswith(("ds-", "gc-"))]  # gc: test_reliability_leftovers
SYNC_ONLY, ASYNC_ONLY = {"data-write"}, {"async-write", "commit-wait"}
CASES = [
    (point, mode)
    for point in STORE_POINTS
    for mode in ("sync", "async")
    if not (point in SYNC_ONLY and mode == "async") and not (point in ASYNC_ONLY and mode == "sync")
]
# Kill points after the manifest's rename: the tag being saved is committed. Before: incomplete.
AFTER_MANIFEST = {"manifest-renamed", "latest-rename", "latest-renamed"}
# Occurrences of each point in one save of FILES files (one in a subdirectory), to draw `nth`.
FILES = 2
ESTIMATED = {"data-write", "async-write"}  # about 49 writes per file with torch 2.13
PER_SAVE = {
    "data-write": 90, "async-write": 90, "data-fsync": FILES, "data-rename": FILES, "data-renamed": FILES,
    "dir-fsync": 2, "manifest-write": 1, "manifest-rename": 1, "manifest-renamed": 1,
    "latest-rename": 1, "latest-renamed": 1, "commit-wait": 1,
}


class Campaign:
    """Consecutive trials on one root: what one trial committed must survive every later kill."""

    def __init__(self, tmp: Path, *, keep_last: int = 4, deepspeed: bool = False):
        self.tmp = tmp
        self.root = tmp / "ckpts"
        self.committed: set[str] = set()
        self.value_checked: set[str] = set()
        self.fingerprints: dict[str, str] = {}
        self.keep_last = keep_last
        self.deepspeed = deepspeed
        self.trials = 0

    def next_step(self) -> int:
        tags = [p.name for p in self.root.iterdir() if p.name.startswith("s")] if self.root.exists() else []
        return max((step_of(t) for t in tags), default=0) + 1

    def paths(self) -> tuple[Path, Path]:
        self.trials += 1
        return self.tmp / f"journal-{self.trials}", self.tmp / f"phase-{self.trials}"

    def check(self, journal: Path, *, category: str, **facts) -> dict:
        outcome = check_root(
            self.root,
            journal,
            self.committed,
            value_checked=self.value_checked,
            fingerprints=self.fingerprints,
            deepspeed=self.deepspeed,
        )
        fact = {
            **facts,
            "committed_before": len(self.committed),
            "committed_after": len(outcome.committed),
            "new_tag": outcome.unfinished_state or "none in flight",
            "latest_fell_back": outcome.latest_fell_back,
            "tmp_files_left_by_crash": outcome.tmp_files,
            "ok": True,
        }
        record(category, **fact)
        self.committed = gc_after_crash(self.root, outcome, self.keep_last)
        self.value_checked &= self.committed
        return fact


def _trial(zygote: Zygote, campaign: Campaign, *, mode: str, kill: dict | None, delay: float | None, steps: int):
    journal, phase = campaign.paths()
    args = {
        "root": str(campaign.root), "journal": str(journal), "phase_file": str(phase),
        "start": campaign.next_step(), "steps": steps, "async": mode == "async",
        "kill": kill, "files": FILES, "numel": 1 << 17,
    }
    pid = zygote.spawn(args)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    end = zygote.wait(pid)
    assert end["code"] != 1, f"the saver failed instead of being killed:\n{zygote.tail()}"
    assert end["signal"] == signal.SIGKILL, (
        f"the saver was not killed ({end}); kill point {kill} never reached in {steps} saves"
    )
    return journal, read_phase(phase)


@pytest.mark.parametrize("point, mode", CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_killed_at_each_point_of_the_commit_protocol(zygote, tmp_path, point, mode):
    """A deterministic SIGKILL at every step of write → fsync → rename → manifest → latest."""
    r = rng(f"point-{point}-{mode}")
    campaign = Campaign(tmp_path)
    for _ in range(count(1, 3)):
        # After at least one commit. The chunks torch writes per file are only estimated: start
        # after two saves' worth of them, and allow six saves.
        first = PER_SAVE[point] * (2 if point in ESTIMATED else 1) + 1
        nth = r.randint(first, 3 * PER_SAVE[point])
        journal, phase = _trial(zygote, campaign, mode=mode, kill={"point": point, "nth": nth}, delay=None, steps=6)
        fact = campaign.check(journal, category="crash", kind="kill point", point=point, mode=mode, nth=nth, phase=phase)
        assert fact["committed_before"] or fact["committed_after"], "no checkpoint was committed before the kill"
        want = "committed" if point in AFTER_MANIFEST else "incomplete"
        assert fact["new_tag"] == want, f"killed at {point}, the tag being saved is {fact['new_tag']}, not {want}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_at_random_instants(zygote, tmp_path, mode):
    """SIGKILL after a random delay while the saver writes checkpoints back to back."""
    r = rng(f"random-{mode}")
    campaign = Campaign(tmp_path)
    phases: dict[str, int] = {}
    for _ in range(count(3, 30)):
        delay = r.uniform(0.05, 0.8)
        journal, phase = _trial(zygote, campaign, mode=mode, kill=None, delay=delay, steps=10_000)
        campaign.check(journal, category="crash", kind="random delay", mode=mode, delay=round(delay, 3), phase=phase)
        phases[phase] = phases.get(phase, 0) + 1
    assert sum(phases.values()) == count(3, 30)


def _free_port(r) -> int:
    ports = list(range(29800, 29850))
    r.shuffle(ports)
    return free_port(ports)


def _deepspeed_trial(campaign: Campaign, r, *, mode: str, kill: dict | None, delay: float | None) -> tuple[Path, str]:
    pytest.importorskip("deepspeed")
    journal, phase = campaign.paths()
    args = {
        "root": str(campaign.root), "journal": str(journal), "phase_file": str(phase),
        "start": campaign.next_step(), "steps": 4, "async": mode == "async", "kill": kill, "port": _free_port(r),
    }
    log = campaign.tmp / f"ds-{campaign.trials}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(WORKER), "deepspeed", json.dumps(args)], stdout=err, stderr=err)
        try:
            if delay is not None:
                deadline = time.monotonic() + 300
                while not any(ev == "begin" for ev, _, _ in read_journal(journal)):
                    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.02)
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"DeepSpeed worker ended with {proc.returncode}:\n{log.read_text()[-3000:]}"
    return journal, read_phase(phase)


@pytest.mark.slow
def test_deepspeed_killed_while_replacing_latest(tmp_path):
    """DeepSpeed rewrites `latest` with a plain write after our commit: a kill there tears it, and
    the store falls back to the newest committed tag; the next run resumes from it bit for bit."""
    r = rng("deepspeed")
    campaign = Campaign(tmp_path, deepspeed=True)
    plan = [("ds-latest-open", "sync"), ("ds-latest-partial", "async")]
    plan += [(point, mode) for point in ("ds-latest-open", "ds-latest-partial", "manifest-rename") for mode in ("sync", "async")]
    plan += [(None, "sync"), (None, "async")]
    fell_back = 0
    for point, mode in plan[: count(2, len(plan))]:
        kill = {"point": point, "nth": r.randint(2, 3)} if point else None
        delay = r.uniform(0.0, 0.3) if point is None else None
        journal, phase = _deepspeed_trial(campaign, r, mode=mode, kill=kill, delay=delay)
        fact = campaign.check(journal, category="crash", kind="deepspeed", point=point or "random delay", mode=mode, phase=phase)
        if point in ("ds-latest-open", "ds-latest-partial"):
            assert fact["latest_fell_back"], "a torn `latest` must make the store fall back, with a warning"
            assert fact["new_tag"] == "committed", "DeepSpeed rewrites `latest` only after our commit"
            fell_back += 1
        events = read_journal(journal)
        if campaign.trials > 1:
            assert any(ev == "resumed" for ev, _, _ in events), "the next run did not resume from the store"
    assert fell_back >= 2
