import os
import subprocess
import sys
import textwrap

import pytest
import torch

from torchckpt import CheckpointStore, LatestFallbackWarning
from torchckpt.errors import (
    CheckpointInUseError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidTagError,
    StoreLockedError,
    TagNotFoundError,
)
from torchckpt.layout import MANIFEST_NAME, is_tmp_name


def save(store, tag, value=1.0, *, commit=True, save_latest=True, metadata=None):
    tx = store.transaction(tag)
    tx.write("model.pt", {"w": torch.full((4,), value)})
    tx.write("sub/opt.pt", {"step": int(value)})
    if commit:
        return tx.commit(metadata=metadata or {"step": int(value)}, save_latest=save_latest)
    tx.abort()
    return None


def test_commit_writes_manifest_and_latest(root):
    store = CheckpointStore(root)
    manifest = save(store, "a", 1.0, metadata={"step": 1, "note": "hi"})
    assert (root / "a" / MANIFEST_NAME).is_file()
    assert (root / "latest").read_text() == "a"
    assert set(manifest.files) == {"model.pt", "sub/opt.pt"}
    assert manifest.files["model.pt"].size == (root / "a" / "model.pt").stat().st_size
    assert manifest.versions["torch"] == torch.__version__
    info = store.info("a")
    assert info.committed and info.is_latest and info.metadata["note"] == "hi" and info.status == "committed"
    assert torch.equal(store.load("latest", "model.pt")["w"], torch.ones(4))
    assert store.load("a", "sub/opt.pt") == {"step": 1}


def test_nothing_visible_before_commit(root):
    store = CheckpointStore(root)
    save(store, "a", 1.0)
    tx = store.transaction("b")
    tx.write("model.pt", {"w": torch.zeros(4)})
    info = {i.tag: i for i in store.list()}
    assert info["b"].status == "writing" and not info["b"].committed
    assert store.latest() == "a"
    with pytest.raises(IncompleteCheckpointError, match="'b' .* is incomplete .*allow_incomplete=True"):
        store.load("b", "model.pt")
    assert torch.equal(store.load("b", "model.pt", allow_incomplete=True)["w"], torch.zeros(4))
    tx.commit()
    assert store.latest() == "b"


def test_abort_leaves_incomplete_tag_and_no_tmp_files(root):
    store = CheckpointStore(root)
    with pytest.raises(RuntimeError), store.transaction("x") as tx:
        tx.write("model.pt", {"w": torch.zeros(1)})
        raise RuntimeError("user code failed")
    info = store.info("x")
    assert info.status == "incomplete"
    assert not [p for p in (root / "x").iterdir() if is_tmp_name(p.name)]


@pytest.mark.parametrize(
    "latest_content, reason",
    [(None, None), ("", "is empty"), ("b", "names 'b', which is not committed"), ("../../etc", "not a committed tag"), ("gone", "not committed")],
)
def test_latest_falls_back_to_newest_committed(root, latest_content, reason):
    store = CheckpointStore(root)
    save(store, "old", 1.0)
    save(store, "new", 2.0)
    save(store, "b", 3.0, commit=False)
    if latest_content is None:
        os.unlink(root / "latest")
        assert store.latest() == "new"  # no 'latest' at all (save_latest=False): no warning needed
        return
    (root / "latest").write_text(latest_content)
    with pytest.warns(LatestFallbackWarning, match=reason + ".*newest committed tag 'new'"):
        assert store.latest() == "new"
    with pytest.warns(LatestFallbackWarning):
        assert torch.equal(store.load("latest", "model.pt")["w"], torch.full((4,), 2.0))


def test_latest_respects_save_latest_false(root):
    store = CheckpointStore(root)
    save(store, "a", 1.0)
    save(store, "b", 2.0, save_latest=False)
    assert store.latest() == "a"


def test_empty_root(root):
    store = CheckpointStore(root)
    assert store.list() == [] and store.latest() is None
    with pytest.raises(TagNotFoundError, match="no committed checkpoint .* save one first"):
        store.resolve("latest")


def test_unknown_tag_suggests_nearest(root):
    store = CheckpointStore(root)
    save(store, "step-100", 1.0)
    with pytest.raises(TagNotFoundError, match="no checkpoint 'step-10' .*did you mean 'step-100'"):
        store.info("step-10")
    with pytest.raises(InvalidTagError, match="path separator"):
        store.info("../step-100")


def test_verify_reports_every_problem_by_file(root):
    store = CheckpointStore(root)
    save(store, "a", 1.0)
    assert store.verify("a").ok
    model = root / "a" / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    os.unlink(root / "a" / "sub" / "opt.pt")
    report = store.verify("a")
    assert not report.ok and report.files_checked == 2
    assert report.problems == ["model.pt: checksum mismatch (bytes changed since commit)", "sub/opt.pt: missing"]
    with pytest.raises(CorruptCheckpointError, match="model.pt: checksum mismatch.*verify=False"):
        store.load("a", "model.pt")


def test_verify_truncated_and_unreadable_manifest(root):
    store = CheckpointStore(root)
    save(store, "a", 1.0)
    model = root / "a" / "model.pt"
    model.write_bytes(model.read_bytes()[:-10])
    assert "size" in store.verify("a").problems[0] and "truncated" in store.verify("a").problems[0]
    (root / "a" / MANIFEST_NAME).write_text("{not json")
    assert "not valid JSON" in store.verify("a").problems[0]


def test_resave_uncommits_first(root):
    store = CheckpointStore(root)
    save(store, "a", 1.0)
    tx = store.transaction("a")
    assert not (root / "a" / MANIFEST_NAME).exists(), "a tag being rewritten must not look committed"
    tx.write("model.pt", {"w": torch.full((4,), 5.0)})
    tx.commit()
    assert torch.equal(store.load("a", "model.pt")["w"], torch.full((4,), 5.0))


def test_delete_rules(root):
    store = CheckpointStore(root)
    save(store, "a", 1.0)
    save(store, "b", 2.0)
    with pytest.raises(CheckpointInUseError, match="'b' is 'latest'.*allow_latest=True"):
        store.delete("b")
    store.delete("a")
    assert store.tags() == ["b"]
    tx = store.transaction("c")
    with pytest.raises(CheckpointInUseError, match="being written"):
        store.delete("c")
    tx.abort()
    store.delete("b", allow_latest=True)
    assert not (root / "latest").exists()
    assert store.tags() == ["c"]


def test_deleting_latest_moves_latest_to_the_newest_remaining(root):
    store = CheckpointStore(root)
    save(store, "a", 1.0)
    save(store, "b", 2.0)
    store.delete("b", allow_latest=True)
    assert (root / "latest").read_text() == "a"


def test_gc_keep_last_and_leftovers(root):
    store = CheckpointStore(root)
    for i, tag in enumerate(["t1", "t2", "t3", "t4"]):
        save(store, tag, float(i))
    (root / "latest").write_text("t2")  # latest is older than the newest: must survive retention
    save(store, "broken", 9.0, commit=False)
    tmp = root / "t4" / ".model.pt.tmp-123-abcd"
    tmp.write_bytes(b"half")
    writing = store.transaction("inflight")
    plan = store.gc(keep_last=1, dry_run=True)
    assert plan.dry_run and sorted(plan.committed) == ["t1", "t3"] and plan.incomplete == ["broken"]
    assert tmp in plan.leftovers
    assert sorted(store.tags()) == ["broken", "inflight", "t1", "t2", "t3", "t4"], "dry run removes nothing"
    plan = store.gc(keep_last=1)
    assert sorted(store.tags()) == ["inflight", "t2", "t4"]
    assert not tmp.exists()
    writing.abort()
    assert store.verify("t2").ok and store.verify("t4").ok
    with pytest.raises(ValueError, match="keep_last must be an integer >= 1"):
        store.gc(keep_last=0)


def test_lock_timeout_names_the_problem(root):
    store = CheckpointStore(root, lock_timeout=0.2)
    save(store, "a", 1.0)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time, filelock
                lock = filelock.FileLock({str(root / '.torchckpt.lock')!r}); lock.acquire()
                print('held', flush=True); time.sleep(30)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match="held the lock on .* for over 0.2s"):
            save(store, "b", 2.0)
        assert store.tags(committed_only=True) == ["a"]  # refused when the transaction begins
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    save(store, "b", 2.0)  # the lock of a dead process is released by the OS
    assert store.latest() == "b"


def test_gc_keeps_a_tag_whose_manifest_is_unreadable(root):
    store = CheckpointStore(root)
    save(store, "a", 1.0)
    save(store, "b", 2.0)
    (root / "a" / MANIFEST_NAME).write_text("{edited by hand")
    assert store.info("a").status == "unreadable"
    plan = store.gc()
    assert plan.incomplete == [] and "a" in store.tags()
    assert "not valid JSON" in store.verify("a").problems[0]


def test_list_while_files_appear_and_vanish(root, monkeypatch):
    """A writer renaming its temporary files (or gc removing a tag) while we list must not break ls."""
    from pathlib import Path

    store = CheckpointStore(root)
    save(store, "a", 1.0)
    tx = store.transaction("busy")
    tx.write("model.pt", {"w": torch.zeros(8)})
    ghost = root / "busy" / ".x.pt.tmp-1-abcd"
    real_rglob = Path.rglob

    def rglob_with_a_vanished_file(self, pattern):
        yield from real_rglob(self, pattern)
        if self.name == "busy":
            yield ghost  # listed, then renamed away before we could stat it

    real_is_file = Path.is_file
    monkeypatch.setattr(Path, "rglob", rglob_with_a_vanished_file)
    # It was still there when checked; gone when its size was read.
    monkeypatch.setattr(Path, "is_file", lambda self: self == ghost or real_is_file(self))
    infos = {i.tag: i for i in store.list()}
    assert infos["busy"].status == "writing" and infos["busy"].size > 0
    tx.abort()


def test_lookup_falls_back_to_deepspeeds_own_latest_on_a_root_it_alone_wrote(tmp_path):
    """What every surface means by `latest` on a root only DeepSpeed's own engine wrote: the tag its
    `latest` file names, with a note; with any committed tag, the store's own resolution."""
    import pytest

    from torchckpt.errors import InvalidTagError

    root = tmp_path / "ds"
    (root / "global_step5").mkdir(parents=True)
    torch.save({"module": {}}, root / "global_step5" / "mp_rank_00_model_states.pt")
    (root / "latest").write_text("global_step5")
    store = CheckpointStore(root)
    assert store.deepspeed_latest() == "global_step5"
    tag, note = store.lookup("latest")
    assert tag == "global_step5" and "DeepSpeed's own engine" in note
    assert store.lookup("global_step5") == ("global_step5", None)
    with pytest.raises(InvalidTagError, match="is empty"):
        store.lookup("  ")
    with store.transaction("mine") as tx:
        tx.write("a.pt", {"x": 1})
        tx.commit(save_latest=False)
    assert store.lookup(None) == ("latest", None)  # a committed tag exists: the store resolves latest itself


def test_verify_all_reports_every_tag_and_never_raises_for_one(tmp_path):
    store = CheckpointStore(tmp_path / "ckpts")
    for tag in ("a", "b"):
        with store.transaction(tag) as tx:
            tx.write("m.pt", {"x": torch.ones(3)})
            tx.commit()
    (store.root / "b" / "m.pt").write_bytes(b"damaged")
    (store.root / "ds").mkdir()
    torch.save({"module": {}}, store.root / "ds" / "mp_rank_00_model_states.pt")
    reports = {r.tag: r for r in store.verify_all()}
    assert reports["a"].ok and reports["a"].files_checked == 1 and reports["a"].skipped is None
    assert not reports["b"].ok and "m.pt" in reports["b"].problems[0]
    assert "adopt it first: torchckpt adopt" in reports["ds"].problems[0]
    assert [r.tag for r in store.verify_all(["a"])] == ["a"]


def _flip(path, where):
    data = bytearray(path.read_bytes())
    data[where(data)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["tensor bytes", "pickle", "zip directory"])
def test_files_hashed_while_they_load_are_still_refused_when_damaged(root, damage):
    """Files of OVERLAP_BYTES or more are hashed on other threads while this one unpickles them:
    damage anywhere is still a CorruptCheckpointError naming the file, whatever the unpickler made of it."""
    from torchckpt.store import OVERLAP_BYTES

    store = CheckpointStore(root)
    tx = store.transaction("big")
    tx.write("a.pt", {"w": torch.arange(OVERLAP_BYTES // 4, dtype=torch.float32)})
    tx.write("b.pt", {"w": torch.ones(1000)})
    tx.commit(metadata={})
    path = root / "big" / "a.pt"
    raw = path.read_bytes()
    where = {"tensor bytes": lambda d: len(d) // 2, "pickle": lambda d: raw.index(b"data.pkl") + 60,
             "zip directory": lambda d: len(d) - 30}[damage]
    _flip(path, where)
    for load in (lambda: store.load("big", "a.pt"), lambda: store.load_files("big", ["b.pt", "a.pt"])):
        with pytest.raises(CorruptCheckpointError, match=r"a\.pt: checksum mismatch.*verify=False"):
            load()
    if damage == "tensor bytes":  # the damage the unpickler cannot see: only the checksum finds it
        assert store.load("big", "a.pt", verify=False)["w"].numel() == OVERLAP_BYTES // 4


def test_load_files_loads_each_file_once_and_reports_progress(root):
    from torchckpt.store import OVERLAP_BYTES

    store = CheckpointStore(root)
    tx = store.transaction("t")
    tx.write("a.pt", {"w": torch.full((OVERLAP_BYTES // 4,), 2.0)})
    tx.write("b.pt", {"n": 3})
    tx.commit(metadata={})
    seen = []
    got = store.load_files("t", ["b.pt", "a.pt", "b.pt"], on_loaded=seen.append)
    assert list(got) == ["b.pt", "a.pt"] == seen
    assert got["b.pt"] == {"n": 3} and bool(got["a.pt"]["w"].eq(2.0).all())
    assert not [t for t in __import__("threading").enumerate() if t.name == "torchckpt-verify"]


class _Marker:
    """Creates a file when unpickled with weights_only=False (the code a hostile pickle would run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_trusted_load_checks_the_bytes_before_any_pickled_code_runs(root, tmp_path):
    from torchckpt.store import OVERLAP_BYTES

    store = CheckpointStore(root)
    tx = store.transaction("t")
    tx.write("a.pt", {"w": torch.zeros(OVERLAP_BYTES // 4)})
    tx.commit(metadata={})
    marker = tmp_path / "code-ran"
    torch.save({"w": torch.zeros(OVERLAP_BYTES // 4), "x": _Marker(marker)}, root / "t" / "a.pt")  # replaced
    with pytest.raises(CorruptCheckpointError, match="a.pt: size"):
        store.load("t", "a.pt", trusted=True)
    assert not marker.exists()


def test_work_while_verifying_runs_before_the_checksums_are_known_and_yields_to_damage(root, monkeypatch):
    """``while_verifying`` (a restore's planning) runs once the files are unpickled, while their
    hashes are still being computed; when it fails on damaged bytes, the damage is the error."""
    import threading

    import torchckpt.store as store_module
    from torchckpt.store import OVERLAP_BYTES

    store = CheckpointStore(root)
    tx = store.transaction("t")
    tx.write("a.pt", {"w": torch.arange(OVERLAP_BYTES // 4, dtype=torch.float32)})
    tx.write("b.pt", {"n": 3})
    tx.commit(metadata={})
    planning, overlapped = threading.Event(), []
    real_check = store_module._check_file

    def slow_check(tag_dir, rec):
        if rec.path == "a.pt":  # a hash still running when the planning starts
            overlapped.append(planning.wait(10))
        return real_check(tag_dir, rec)

    monkeypatch.setattr(store_module, "_check_file", slow_check)
    seen = []
    got = store.load_files("t", ["a.pt", "b.pt"], while_verifying=lambda loaded: (planning.set(), seen.append(sorted(loaded))))
    assert seen == [["a.pt", "b.pt"]] and overlapped == [True] and got["b.pt"] == {"n": 3}

    def refuse(loaded):
        raise ValueError("shape (3,) saved, (4,) live")

    with pytest.raises(ValueError, match="shape"):  # intact files: the planning's own error
        store.load_files("t", ["a.pt", "b.pt"], while_verifying=refuse)
    _flip(root / "t" / "a.pt", lambda d: len(d) // 2)
    with pytest.raises(CorruptCheckpointError, match=r"a\.pt: checksum mismatch") as err:
        store.load_files("t", ["a.pt", "b.pt"], while_verifying=refuse)
    assert isinstance(err.value.__cause__, ValueError)
    with pytest.raises(CorruptCheckpointError, match=r"a\.pt: checksum mismatch"):  # planning that succeeds changes nothing
        store.load_files("t", ["a.pt", "b.pt"], while_verifying=lambda loaded: None)


def test_transaction_waits_out_a_momentary_probe_of_its_writing_lock(tmp_path):
    # A listing (dedup's candidates of a save on another thread, the panel's poll, `torchckpt list`)
    # probes each tag's writing lock by taking it exclusively for an instant: a save beginning
    # that tag at that instant must not take the probe for another writer.
    import fcntl
    import threading

    from torchckpt.layout import WRITING_NAME

    store = CheckpointStore(tmp_path / "ckpts")
    (store.root / "t").mkdir(parents=True)
    fd = os.open(store.root / "t" / WRITING_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a probe, slow to let go (the GIL, a loaded machine)
    threading.Timer(0.05, os.close, args=(fd,)).start()
    with store.transaction("t") as tx:
        tx.write("w.pt", {"w": torch.ones(3)})
        tx.commit()
    assert store.verify("t").ok
