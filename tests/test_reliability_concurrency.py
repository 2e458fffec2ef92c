"""Concurrency: two processes (two kernels) saving to one root never interleave a manifest or
`latest`; the same tag is refused while another process writes it; a lock held too long fails
with a clear message; the locks of a killed process are recovered.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import pytest
import torch
from _crash_worker import read_journal, tag_of
from _reliability import _check_values, count, record, wait_for_phase, zygote  # noqa: F401

from torchckpt import CheckpointStore, LatestFallbackWarning
from torchckpt.errors import CheckpointInUseError, StoreLockedError
from torchckpt.layout import LOCK_NAME, WRITING_NAME


def _args(tmp_path, root, name: str, **extra) -> dict:
    return {
        "root": str(root), "journal": str(tmp_path / f"journal-{name}"), "phase_file": str(tmp_path / f"phase-{name}"),
        "files": 2, "numel": 1 << 12, **extra,
    }  # fmt: skip


def _ended_normally(zygote, pid: int) -> None:
    end = zygote.wait(pid)
    assert end == {"pid": pid, "signal": None, "code": 0}, f"saver {pid} ended with {end}:\n{zygote.tail()}"


@pytest.mark.slow
def test_two_processes_saving_to_one_root(zygote, tmp_path):
    """Two savers commit back to back into one root while this process keeps reading it."""
    root = tmp_path / "ckpts"
    steps = count(25, 150)
    pids = [
        zygote.spawn(_args(tmp_path, root, name, start=start, steps=steps, **{"async": mode == "async"}))
        for name, start, mode in (("a", 1, "sync"), ("b", 50_001, "async"))
    ]
    store = CheckpointStore(root)
    reads = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatestFallbackWarning)  # `latest` must always name a committed tag
        while not all(_zombie(pid) for pid in pids):  # until both savers have exited
            latest = store.latest()
            if latest is not None:
                assert store.verify(latest).ok, f"latest {latest} does not verify mid-run"
                reads += 1
    for pid in pids:
        _ended_normally(zygote, pid)
    infos = store.list()
    assert len(infos) == 2 * steps and all(i.committed for i in infos)
    for info in infos:
        assert store.verify(info.tag).ok
        _check_values(store, info.tag)
    newest = max(infos, key=lambda i: i.created)
    assert (root / "latest").read_text() == newest.tag, "`latest` is not the last commit: commits interleaved"
    for name in "ab":
        journal = read_journal(tmp_path / f"journal-{name}")
        assert [t for ev, t, _ in journal if ev == "commit"] == [t for ev, t, _ in journal if ev == "begin"]
    record("concurrency", kind="two processes saving to one root", saves=2 * steps, reads_while_saving=reads,
           lost=0, torn=0, ok=True)  # fmt: skip


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_same_tag_is_refused_while_another_process_writes_it(zygote, tmp_path):
    root = tmp_path / "ckpts"
    args = _args(tmp_path, root, "holder", start=1, steps=1, tag="shared", hold={"at": "before-commit", "seconds": 1.5})
    pid = zygote.spawn(args)
    wait_for_phase(tmp_path / "phase-holder", "holding")
    store = CheckpointStore(root)
    assert store.info("shared").status == "writing"
    with pytest.raises(CheckpointInUseError, match="'shared' in .* is being written by another process or save; wait"):
        store.transaction("shared")
    with pytest.raises(CheckpointInUseError, match="being written"):
        store.delete("shared")
    assert store.gc().incomplete == [] and (root / "shared").is_dir()
    _ended_normally(zygote, pid)
    assert store.verify("shared").ok
    _check_values(store, "shared")
    with store.transaction("shared") as tx:  # free again once the other process committed
        tx.write("f0.pt", {"w": torch.ones(1)})
        tx.commit()
    record("concurrency", kind="same tag from two processes", refused=True, ok=True)


def test_lock_held_too_long_fails_with_a_clear_message(zygote, tmp_path):
    root = tmp_path / "ckpts"
    store = CheckpointStore(root, lock_timeout=0.3)
    with store.transaction("before") as tx:
        tx.write("model.pt", {"w": torch.ones(1)})
        tx.commit()
    args = _args(tmp_path, root, "slow", start=1, steps=1, hold={"at": "in-commit-lock", "seconds": 2.0})
    pid = zygote.spawn(args)
    wait_for_phase(tmp_path / "phase-slow", "holding")
    message = rf"another process has held the lock on {root} for over 0.3s .*wait for it, or raise lock_timeout"
    started = time.monotonic()
    with pytest.raises(StoreLockedError, match=message):
        store.transaction("mine")
    assert time.monotonic() - started < 1.5, "the lock timeout was not honoured"
    with pytest.raises(StoreLockedError, match=message):
        store.gc()
    with pytest.raises(StoreLockedError, match=message):
        store.delete("before", allow_latest=True)
    assert store.verify("before").ok
    _ended_normally(zygote, pid)
    with store.transaction("mine") as tx:
        tx.write("model.pt", {"w": torch.ones(1)})
        tx.commit()
    assert store.latest() == "mine"
    record("concurrency", kind="lock held too long", timeout_s=0.3, clear_error=True, ok=True)


@pytest.mark.parametrize("where", ["manifest-write", "data-write"])
def test_locks_of_a_killed_process_are_recovered(zygote, tmp_path, where):
    """Killed holding the root lock (in its commit) or a tag's writing lock: nothing stays stuck."""
    root = tmp_path / "ckpts"
    pid = zygote.spawn(_args(tmp_path, root, "victim", start=1, steps=3, kill={"point": where, "nth": 2 if where == "manifest-write" else 150}))
    end = zygote.wait(pid)
    assert end["signal"] == signal.SIGKILL, end
    assert (root / LOCK_NAME).exists()
    store = CheckpointStore(root, lock_timeout=5)
    unfinished = tag_of(2)
    assert store.info(unfinished).status == "incomplete", "a dead writer's tag must not look in flight"
    assert (root / unfinished / WRITING_NAME).exists()
    # A lock still held would raise StoreLockedError (root) or CheckpointInUseError (the tag) here.
    with store.transaction(unfinished) as tx:  # the same tag: its dead writer's lock is gone too
        tx.write("f0.pt", {"w": torch.ones(1)})
        tx.commit()
    assert store.latest() == unfinished and store.verify(unfinished).ok
    assert store.verify(tag_of(1)).ok
    record("concurrency", kind=f"stale lock after SIGKILL ({where})", recovered=True, ok=True)


def test_gc_never_removes_a_tag_between_its_creation_and_its_writing_lock(root, monkeypatch):
    """gc runs exactly while a save has created its directory but not yet locked it."""
    store = CheckpointStore(root)
    with store.transaction("a") as tx:
        tx.write("model.pt", {"w": torch.ones(2)})
        tx.commit()
    (root / "b").mkdir()  # a leftover of a crashed save of the same tag: gc may remove it
    paused, resume = threading.Event(), threading.Event()
    real_open = os.open

    def slow_open(path, flags, *args):
        if str(path).endswith(WRITING_NAME) and threading.current_thread().name == "saver" and not paused.is_set():
            paused.set()
            resume.wait(10)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", slow_open)
    errors, plans = [], []

    def save():
        try:
            with CheckpointStore(root).transaction("b") as tx:
                tx.write("model.pt", {"w": torch.full((2,), 2.0)})
                tx.write("sub/opt.pt", {"step": 2})
                tx.commit()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def collect():
        try:
            plans.append(CheckpointStore(root).gc())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    saver = threading.Thread(target=save, name="saver")
    saver.start()
    assert paused.wait(10)
    collector = threading.Thread(target=collect, name="gc")
    collector.start()
    time.sleep(0.3)  # gc now runs (unfixed) or waits for the save's begin (fixed)
    resume.set()
    saver.join(30)
    collector.join(30)
    assert not errors, errors
    assert store.verify("b").ok and store.latest() == "b"
    assert torch.equal(store.load("b", "model.pt")["w"], torch.full((2,), 2.0))
    assert store.load("b", "sub/opt.pt") == {"step": 2}
    record("concurrency", kind="gc racing a save's begin", ok=True)


@pytest.mark.slow
def test_gc_in_another_process_while_saving(zygote, tmp_path):
    """A retention loop (gc keep_last=2) runs beside a saver: it never breaks a save nor removes `latest`."""
    root = tmp_path / "ckpts"
    steps = count(20, 100)
    saver = zygote.spawn(_args(tmp_path, root, "saver", start=1, steps=steps))
    gcer = zygote.spawn(_args(tmp_path, root, "gc", start=100_000, steps=steps, gc_every=1, keep_last=2, files=1))
    for pid in (saver, gcer):
        _ended_normally(zygote, pid)
    store = CheckpointStore(root)
    infos = store.list()
    assert all(i.committed for i in infos) and store.latest() in {i.tag for i in infos}
    for info in infos:
        assert store.verify(info.tag).ok
    journal = read_journal(tmp_path / "journal-saver")
    assert len([e for e in journal if e[0] == "commit"]) == steps, "a save failed while gc ran"
    record("concurrency", kind="gc (keep_last=2) in another process while saving", saves=2 * steps, ok=True)



def test_processes_listing_one_root_at_once_never_see_each_other_as_writers(tmp_path):
    """The in-flight probe locks the writing marker for an instant; a second prober must not take
    that for a writer (found on two DeepSpeed ranks listing a root right after the same barrier)."""
    import torch

    from torchckpt.store import _in_flight

    store = CheckpointStore(tmp_path)
    with store.transaction("t") as tx:
        tx.write("a.pt", torch.ones(1))
        tx.commit()
    seen = []

    def probe():
        seen.extend(_in_flight(tmp_path / "t") for _ in range(2000))

    threads = [threading.Thread(target=probe) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(seen), f"{sum(seen)} of {len(seen)} probes saw a writer that is not there"
    writing = store.transaction("t")
    try:
        assert _in_flight(tmp_path / "t"), "a real writer is still seen"
    finally:
        writing.abort()


def test_a_tag_being_written_is_seen_at_once_and_the_probes_turns_never_hold_up_a_writer(tmp_path, monkeypatch):
    """Probes take turns, so a lock found held is a writer's: a listing does not wait on a tag being
    written (a save lists the root for identical files while the previous async save writes)."""
    import time

    import torch

    import torchckpt.store as store_module

    store = CheckpointStore(tmp_path)
    writing = store.transaction("t")
    slept = []
    real_sleep = time.sleep
    monkeypatch.setattr(store_module.time, "sleep", lambda s: (slept.append(s), real_sleep(s)))
    try:
        assert [i.in_flight for i in store.list()] == [True] and slept == []
    finally:
        writing.abort()
    with store.transaction("u") as tx, store_module._probes_take_turns(tmp_path / "u"):
        tx.write("a.pt", torch.ones(1))
        tx.commit()
