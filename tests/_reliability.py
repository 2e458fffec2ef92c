"""Shared helpers of the reliability suite: counts, the outcome log, the crash-worker zygote and
the invariants a checkpoint root must satisfy after any fault.

``TORCHCKPT_FULL=1`` selects the full trial counts (docs/RELIABILITY.md); without it the suite
runs reduced counts. ``TORCHCKPT_RELIABILITY_LOG=PATH`` makes every trial append one JSON line
with its outcome to PATH; ``scripts/reliability_report.py`` turns that log into the report.
``TORCHCKPT_SEED`` fixes the random choices (kill delays, kill points) of a run.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from torchckpt import CheckpointStore, LatestFallbackWarning

sys.path.insert(0, str(Path(__file__).parent))
import _crash_worker as worker

WORKER = Path(__file__).with_name("_crash_worker.py")
FULL = os.environ.get("TORCHCKPT_FULL") == "1"


def count(reduced: int, full: int) -> int:
    """Trials to run: ``full`` under TORCHCKPT_FULL=1, else ``reduced``."""
    return full if FULL else reduced


def rng(name: str) -> random.Random:
    """A random source per test, seeded from TORCHCKPT_SEED (or the clock); the seed is logged."""
    seed = int(os.environ.get("TORCHCKPT_SEED", "0")) or int(time.time() * 1000) % 2**31
    record("seed", test=name, seed=seed)
    return random.Random(f"{seed}-{name}")


def record(category: str, **data) -> None:
    """Append one outcome to the reliability log, when one is requested."""
    path = os.environ.get("TORCHCKPT_RELIABILITY_LOG")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"category": category, **data}, default=str) + "\n")


class Zygote:
    """The crash worker in ``serve`` mode: forks savers on request and reaps them."""

    def __init__(self, log: Path):
        self.log = log
        self._stderr = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )

    def _ask(self, request: dict, timeout: float) -> dict | None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def _answer(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the crash worker died; its log:\n{self.tail()}")
        return json.loads(line)

    def spawn(self, args: dict) -> int:
        answer = self._ask({"op": "spawn", "args": args}, timeout=120)
        assert answer is not None, f"the crash worker did not fork within 120s; its log:\n{self.tail()}"
        return answer["pid"]

    def wait(self, pid: int, timeout: float = 120) -> dict:
        """How the saver ended; a saver still running after ``timeout`` is killed and reported as hung."""
        answer = self._ask({"op": "wait", "pid": pid}, timeout=timeout)
        if answer is None:
            os.kill(pid, signal.SIGKILL)
            self._answer(30)
            raise AssertionError(f"saver {pid} hung for {timeout}s; the worker's log:\n{self.tail()}")
        return answer

    def tail(self, n: int = 4000) -> str:
        self._stderr.flush()
        return self.log.read_text()[-n:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    """One crash worker for the session (import it into a test module to use it)."""
    z = Zygote(tmp_path_factory.mktemp("zygote") / "worker.log")
    yield z
    z.close()


def wait_for_phase(path: Path, phase: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while read_phase(path) != phase:
        assert time.monotonic() < deadline, f"the saver never reached {phase!r} (it is {read_phase(path)!r})"
        time.sleep(0.01)


def read_phase(path: Path) -> str:
    try:
        text = path.read_bytes().decode(errors="replace").strip()
    except FileNotFoundError:
        return "not started"
    main, _, background = text.partition("|")
    return f"{main}+{background}" if background else main


def fingerprint(state: dict) -> str:
    """A short digest of a module state dict (names and bytes), as the DeepSpeed worker computes it."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Outcome:
    """What a root looked like after a fault, checked against the journal of the killed saver."""

    committed: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    unfinished_tag: str | None = None
    unfinished_state: str | None = None  # committed / incomplete / absent
    latest_named: str | None = None
    latest_resolved: str | None = None
    latest_fell_back: bool = False
    tmp_files: int = 0


def _check_values(store: CheckpointStore, tag: str) -> None:
    manifest = store.manifest(tag)
    meta = manifest.metadata
    step, files, numel = meta["step"], meta["files"], meta["numel"]
    if tag[1:].isdigit():
        assert worker.tag_of(step) == tag
    for index in range(files):
        relpath = f"f{index}.pt" if index % 2 == 0 else f"sub/f{index}.pt"
        got = store.load(tag, relpath)
        want = worker.expected_state(step, index, numel)
        assert got["step"] == step and got["index"] == index and got["nested"]["name"] == want["nested"]["name"]
        for key in ("weight", "half", "view"):
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (tag, relpath, key)
        assert torch.equal(got["nested"]["ids"], want["nested"]["ids"])
        assert got["view"].untyped_storage().data_ptr() == got["weight"].untyped_storage().data_ptr(), (
            f"{tag}/{relpath}: the view no longer shares storage with its base"
        )


def check_root(
    root: Path,
    journal: Path,
    committed_before: set[str],
    *,
    value_checked: set[str],
    fingerprints: dict[str, str] | None = None,
    deepspeed: bool = False,
) -> Outcome:
    """Assert the crash-safety invariants of ``root`` after its saver was killed.

    - every tag committed before this trial, and every commit the saver journaled, is committed,
      verifies, and (checked once per tag) loads with the values that were saved;
    - every tag is committed or incomplete: none unreadable, none still "being written";
    - the tag the saver had begun but not finished is committed or incomplete;
    - a DeepSpeed run that resumed got exactly the model that was saved in that tag;
    - ``latest`` names a committed tag; only DeepSpeed's own plain rewrite may leave it torn, and
      then the store falls back to the newest committed tag with a LatestFallbackWarning.
    """
    store = CheckpointStore(root)
    events = worker.read_journal(journal)
    journaled = {tag for ev, tag, _ in events if ev == "commit"}
    begun = [tag for ev, tag, _ in events if ev == "begin"]
    fingerprints = {} if fingerprints is None else fingerprints  # DeepSpeed: the model digest per saved tag
    fingerprints.update({tag: extra for ev, tag, extra in events if ev in ("begin", "commit") and extra})
    infos = {i.tag: i for i in store.list()} if root.exists() else {}
    out = Outcome()
    for tag in sorted(committed_before | journaled):
        info = infos.get(tag)
        state = info.status if info else "gone"
        assert info is not None and info.committed, f"{tag} was committed before the kill and is now {state}"
    for tag, info in sorted(infos.items()):
        assert info.status in ("committed", "incomplete"), f"{tag} is {info.status} after the kill: {info.problem}"
        if info.committed:
            report = store.verify(tag)
            assert report.ok, f"committed {tag} does not verify: {report.problems}"
            out.committed.append(tag)
            if tag not in value_checked:
                if deepspeed:
                    state = store.load(tag, "mp_rank_00_model_states.pt")
                    assert state["step"] == worker.step_of(tag)
                    if tag in fingerprints:
                        assert fingerprint(state["module"]) == fingerprints[tag], f"{tag}: saved values differ"
                else:
                    _check_values(store, tag)
                value_checked.add(tag)
        else:
            out.incomplete.append(tag)
    unfinished = [t for t in begun if t not in journaled]
    assert len(unfinished) <= 1 or deepspeed, f"more than one unfinished save in the journal: {unfinished}"
    if unfinished:
        out.unfinished_tag = unfinished[-1]
        info = infos.get(out.unfinished_tag)
        out.unfinished_state = info.status if info else "absent"
    for ev, tag, extra in events:
        if ev == "resumed":
            assert extra == fingerprints.get(tag), f"resumed from {tag} but the model differs from what was saved"
    latest_file = root / "latest"
    out.latest_named = latest_file.read_text() if latest_file.exists() else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out.latest_resolved = store.latest()
    fell_back = [w for w in caught if issubclass(w.category, LatestFallbackWarning)]
    out.latest_fell_back = bool(fell_back)
    if out.committed:
        ordered = sorted(out.committed, key=lambda t: infos[t].created)
        newest = ordered[-1]
        if out.latest_named is None:
            # only possible when the very first commit was killed before `latest` was written
            assert deepspeed or ordered == [out.unfinished_tag], f"latest is missing with {ordered} committed"
            assert out.latest_resolved == newest and not fell_back
        elif out.latest_named in out.committed:
            assert out.latest_resolved == out.latest_named and not fell_back
            # `latest` is replaced right after the manifest: it names the newest committed tag,
            # or the one before when the kill fell between the two
            allowed = {newest} | ({ordered[-2]} if newest == out.unfinished_tag and len(ordered) > 1 else set())
            assert deepspeed or out.latest_named in allowed, f"latest names {out.latest_named}; committed: {ordered}"
        else:
            assert deepspeed, f"latest holds {out.latest_named!r}, not a committed tag (only DeepSpeed's plain write may tear it)"
            assert fell_back and out.latest_resolved == newest, (out.latest_resolved, newest)
    else:
        assert out.latest_resolved is None
    out.tmp_files = sum(1 for p in root.rglob(".*") if ".tmp-" in p.name) if root.exists() else 0
    return out


def gc_after_crash(root: Path, outcome: Outcome, keep_last: int) -> set[str]:
    """Run gc as a user would after a crash; check it removed exactly the debris. Returns the committed tags left."""
    store = CheckpointStore(root)
    if not root.exists():
        return set()
    before = {t: store.verify(t) for t in outcome.committed}
    created = {i.tag: i.created for i in store.list() if i.committed}
    plan = store.gc(keep_last=keep_last)
    assert sorted(plan.incomplete) == sorted(outcome.incomplete)
    left = {i.tag: i for i in store.list()}
    assert all(i.committed for i in left.values()), "gc left an incomplete tag"
    assert not [p for p in root.rglob(".*") if ".tmp-" in p.name], "gc left temporary files"
    assert outcome.latest_resolved is None or outcome.latest_resolved in left, "gc removed latest"
    for tag in left:
        assert before[tag].ok and store.verify(tag).ok, f"gc damaged {tag}"
    newest = sorted(created, key=created.__getitem__)[-keep_last:]
    keep = set(newest) | ({outcome.latest_resolved} if outcome.latest_resolved else set())
    assert set(left) == keep, (sorted(left), newest, outcome.latest_resolved)
    return set(left)
