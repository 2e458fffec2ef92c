"""Leftovers: temporary files and incomplete tags from crashes are listed (dry run) and removed by
gc; committed data is never touched; retention never removes `latest` or a tag being written;
a gc killed half-way leaves nothing torn.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest
import torch
from _crash_worker import read_journal
from _reliability import count, record, rng, wait_for_phase, zygote  # noqa: F401

from torchckpt import CheckpointStore
from torchckpt.errors import CheckpointInUseError
from torchckpt.layout import TRASH_PREFIX


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, size, mtime and content digest."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[str(p.relative_to(root))] = ("dir",)
    return out


def _committed_files(store: CheckpointStore) -> dict[str, tuple]:
    tree = _tree(store.root)
    keep = {}
    for info in store.list():
        if info.committed:
            for rel in list(info.manifest.files) + ["torchckpt-manifest.json"]:
                keep[f"{info.tag}/{rel}"] = tree[f"{info.tag}/{rel}"]
    return keep


def _args(tmp_path, root, name, **extra):
    return {"root": str(root), "journal": str(tmp_path / f"journal-{name}"), "phase_file": str(tmp_path / f"phase-{name}"),
            "files": 2, "numel": 1 << 12, **extra}  # fmt: skip


def _make_debris(zygote, tmp_path, root: Path) -> None:
    """Real crashes: killed mid-write (sync and async), killed before and after `latest`."""
    start = 1
    for point, mode, nth in [("data-write", "sync", 60), ("async-write", "async", 60), ("latest-rename", "sync", 2),
                             ("manifest-rename", "async", 2), ("data-renamed", "sync", 3)]:  # fmt: skip
        pid = zygote.spawn(_args(tmp_path, root, point, start=start, steps=3, kill={"point": point, "nth": nth},
                                 **{"async": mode == "async"}))  # fmt: skip
        assert zygote.wait(pid)["signal"] == signal.SIGKILL, zygote.tail()
        start += 10


def test_gc_lists_and_removes_crash_debris_and_nothing_else(zygote, tmp_path):
    root = tmp_path / "ckpts"
    _make_debris(zygote, tmp_path, root)
    store = CheckpointStore(root)
    committed_tag = store.latest()
    # debris of other kinds: a temporary file inside a committed tag, a half-deleted tag
    (root / committed_tag / ".f0.pt.tmp-99999-deadbeef").write_bytes(b"partial")
    (root / f"{TRASH_PREFIX}old-12345678").mkdir()
    (root / f"{TRASH_PREFIX}old-12345678" / "f0.pt").write_bytes(b"x" * 100)
    incomplete = sorted(i.tag for i in store.list() if not i.committed)
    assert len(incomplete) == 4, [(i.tag, i.status) for i in store.list()]
    tmp_files = sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp-" in p.name)
    assert any(t.startswith(".latest.tmp-") for t in tmp_files), tmp_files  # killed before `latest`'s rename
    before = _tree(root)
    protected = _committed_files(store)

    plan = store.gc(dry_run=True)
    assert plan.dry_run and sorted(plan.incomplete) == incomplete and plan.committed == []
    listed = sorted(str(p.relative_to(root)) for p in plan.leftovers)
    assert f"{TRASH_PREFIX}old-12345678" in listed and f"{committed_tag}/.f0.pt.tmp-99999-deadbeef" in listed
    assert any(t.startswith(".latest.tmp-") for t in listed)
    assert _tree(root) == before, "a dry run changed the disk"

    real = store.gc()
    assert sorted(real.incomplete) == incomplete and sorted(map(str, real.leftovers)) == sorted(map(str, plan.leftovers))
    after = _tree(root)
    assert not [p for p in after if ".tmp-" in p or TRASH_PREFIX in p]
    assert {i.tag for i in store.list()} == {i.tag for i in store.list() if i.committed}
    assert {k: after[k] for k in protected} == protected, "gc touched committed data"
    for info in store.list():
        assert store.verify(info.tag).ok
    record("leftovers", kind="crash debris from real kills", incomplete=len(incomplete), tmp_files=len(listed),
           dry_run_changed_nothing=True, committed_untouched=True, ok=True)  # fmt: skip


def test_gc_never_touches_committed_files_named_like_temporaries(root):
    store = CheckpointStore(root)
    with store.transaction("a") as tx:
        tx.write(".cache.tmp-1", {"w": torch.ones(3)})  # a legal file name that looks temporary
        tx.write("sub/.x.tmp-2-ab", {"w": torch.zeros(3)})
        tx.commit()
    plan = store.gc()
    assert plan.leftovers == []
    assert store.verify("a").ok and torch.equal(store.load("a", ".cache.tmp-1")["w"], torch.ones(3))


def test_gc_removes_a_symlink_never_its_target(root, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"keep me")
    store = CheckpointStore(root)
    tx = store.transaction("crashed")
    tx.write("f.pt", {"w": torch.ones(1)})
    (tx.dir / "link").symlink_to(outside, target_is_directory=True)
    (tx.dir / ".f.pt.tmp-1-2").symlink_to(outside / "data.bin")
    tx.abort()
    assert store.gc().incomplete == ["crashed"]
    assert (outside / "data.bin").read_bytes() == b"keep me" and not (root / "crashed").exists()


def _save(store, tag, *, save_latest=True):
    with store.transaction(tag) as tx:
        tx.write("model.pt", {"w": torch.full((4,), float(len(tag)))})
        tx.commit(save_latest=save_latest)


def test_keep_last_never_removes_latest_and_has_a_dry_run(root):
    store = CheckpointStore(root)
    for tag in ("t1", "t2", "t3"):
        _save(store, tag)
    for tag in ("t4", "t5"):
        _save(store, tag, save_latest=False)  # `latest` stays on t3, older than the newest two
    before = _tree(root)
    plan = store.gc(keep_last=1, dry_run=True)
    assert plan.dry_run and sorted(plan.committed) == ["t1", "t2", "t4"] and sorted(plan.kept) == ["t3", "t5"]
    assert _tree(root) == before
    real = store.gc(keep_last=1)
    assert sorted(real.committed) == ["t1", "t2", "t4"]
    assert store.tags() == ["t3", "t5"] and store.latest() == "t3"
    assert store.verify("t3").ok and store.verify("t5").ok
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="keep_last must be an integer >= 1"):
            store.gc(keep_last=bad)
    record("leftovers", kind="retention keep_last with latest older than the newest", latest_kept=True, dry_run=True, ok=True)


def test_keep_last_never_removes_a_tag_being_written(zygote, tmp_path):
    root = tmp_path / "ckpts"
    store = CheckpointStore(root)
    for tag in ("old1", "old2"):
        _save(store, tag)
    # another process re-saves old1 (now incomplete, in flight) and this one's own open save
    pid = zygote.spawn(_args(tmp_path, root, "resaver", start=1, steps=1, tag="old1",
                             hold={"at": "before-commit", "seconds": 1.0}))  # fmt: skip
    wait_for_phase(tmp_path / "phase-resaver", "holding")
    mine = store.transaction("mine")
    mine.write("model.pt", {"w": torch.ones(1)})
    for tag in ("n1", "n2"):
        _save(store, tag)
    plan = store.gc(keep_last=1)
    assert "old1" not in plan.committed + plan.incomplete and "mine" not in plan.committed + plan.incomplete
    assert sorted(plan.committed) == ["n1", "old2"] and sorted(store.tags()) == ["mine", "n2", "old1"]
    with pytest.raises(CheckpointInUseError):
        store.delete("old1")
    mine.commit()
    assert zygote.wait(pid)["code"] == 0
    assert store.verify("old1").ok and store.verify("mine").ok
    record("leftovers", kind="retention while tags are being written", in_flight_kept=2, ok=True)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["gc-uncommitted", "gc-trashed", "gc-rmtree"])
def test_gc_killed_half_way(zygote, tmp_path, point):
    """A saver with retention (gc keep_last=2 after each save) killed inside gc's removal."""
    r = rng(f"gc-kill-{point}")
    root = tmp_path / "ckpts"
    for trial in range(count(1, 4)):
        journal = f"{point}-{trial}"
        nth = r.randint(1, 3) if point != "gc-rmtree" else r.randint(1, 6)
        pid = zygote.spawn(_args(tmp_path, root, journal, start=1 + 100 * trial, steps=8, gc_every=1, keep_last=2,
                                 kill={"point": point, "nth": nth}))  # fmt: skip
        assert zygote.wait(pid)["signal"] == signal.SIGKILL, zygote.tail()
        store = CheckpointStore(root)
        events = read_journal(tmp_path / f"journal-{journal}")
        last_commit = [t for ev, t, _ in events if ev == "commit"][-1]
        infos = {i.tag: i for i in store.list()}
        assert all(i.status in ("committed", "incomplete") for i in infos.values())
        assert store.latest() == last_commit and infos[last_commit].committed
        for info in infos.values():
            if info.committed:
                assert store.verify(info.tag).ok
        plan = store.gc(keep_last=2)
        assert not [p for p in root.rglob("*") if ".tmp-" in p.name or TRASH_PREFIX in p.name]
        left = store.list()
        assert all(i.committed for i in left) and len(left) == 2 and store.latest() == last_commit
        record("leftovers", kind=f"gc killed half-way ({point})", nth=nth, cleaned=len(plan.incomplete) + len(plan.leftovers),
               latest_intact=True, ok=True)  # fmt: skip
