"""The notebook API: Checkpointer save/commit/load and friends, on CPU (GPU cases marked)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import torchckpt
from torchckpt import serialization
from torchckpt.errors import (
    CheckpointInUseError,
    IncompleteCheckpointError,
    InvalidTagError,
    ManifestError,
    NotCheckpointableError,
    ObjectNotFoundError,
    RestoreError,
    TagNotFoundError,
    WriteError,
)
from torchckpt.notebook import Checkpointer, SaveResult, parse_metrics
from torchckpt.pending import PendingSave
from torchckpt.state import infer_step


class Counter:
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


class Unpicklable(Counter):
    def state_dict(self):
        return {"fn": lambda: self.n}


@pytest.fixture
def ckpt(root):
    c = Checkpointer(root)
    yield c
    c.close()


def objects(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    loss = ((model(torch.randn(8, 4)) - 1) ** 2).mean()
    loss.backward()
    opt.step()
    sched.step()
    return {
        "model": model, "opt": opt, "sched": sched, "scaler": torch.amp.GradScaler("cpu", init_scale=1024.0),
        "counter": Counter(seed + 1), "weights": torch.randn(5), "arr": np.arange(4.0) + seed, "step": 10 + seed,
        "cfg": {"lr": 0.01, "layers": [4, 8, 1], "name": f"run{seed}"}, "gen": torch.Generator().manual_seed(seed),
    }


def states_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b, strict=False))
    return a == b


def snapshot(objs):
    out = {}
    for name, obj in objs.items():
        if hasattr(obj, "state_dict"):
            out[name] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in obj.state_dict().items()}
        elif isinstance(obj, torch.Generator):
            out[name] = obj.get_state()
        elif isinstance(obj, (torch.Tensor, np.ndarray)):
            out[name] = torch.as_tensor(obj).clone()
        else:
            out[name] = obj
    return out


def test_round_trip_of_every_kind_in_place(ckpt, root):
    ns = objects(0)
    before = snapshot(ns)
    live_ids = {k: id(v) for k, v in ns.items() if k not in ("step", "cfg")}
    r = ckpt.save("t", ns, note="n", metrics={"loss": 0.5}, step=10)
    assert r.committed and r.size > 0 and r.step == 10
    other = objects(1)
    for name in ("model", "opt", "sched", "scaler", "counter", "weights", "arr", "gen"):  # same objects, new state
        obj = ns[name]
        if isinstance(obj, torch.Tensor):
            obj.copy_(other[name])
        elif isinstance(obj, np.ndarray):
            obj[:] = other[name]
        elif isinstance(obj, torch.Generator):
            obj.set_state(other[name].get_state())
        else:
            obj.load_state_dict(other[name].state_dict())
    ns["step"], ns["cfg"] = 99, None
    result = ckpt.load("t", ns)
    assert result.rng and set(result.names) == set(ns)
    after = snapshot(ns)
    for name in before:
        assert states_equal(before[name], after[name]), name
    assert all(id(ns[k]) == v for k, v in live_ids.items())


def test_layout_one_file_per_object_and_metadata(ckpt, root):
    ckpt.save("t", objects(0), note="hello", metrics={"loss": 0.25}, step=3)
    tag = root / "t"
    assert sorted(p.name for p in (tag / "objects").iterdir()) == sorted(f"{n}.pt" for n in objects(0))
    assert (tag / "rng.pt").is_file()
    manifest = json.loads((tag / "torchckpt-manifest.json").read_text())
    meta = manifest["metadata"]
    assert meta["format"] == "torchckpt-notebook/1" and meta["rng"] == "rng.pt"
    assert (meta["step"], meta["note"], meta["metrics"]) == (3, "hello", {"loss": 0.25})
    assert meta["objects"]["opt"] == {"kind": "optimizer", "file": "objects/opt.pt", "type": "torch.optim.adamw.AdamW"}
    # plain torch.load reads every file
    sd = torch.load(tag / "objects" / "model.pt", weights_only=True)
    assert set(sd) == set(objects(0)["model"].state_dict())


def test_loading_one_object_reads_only_its_file(ckpt, monkeypatch):
    ns = objects(0)
    ckpt.save("t", ns)
    read = []
    real = serialization.load
    monkeypatch.setattr(serialization, "load",
                        lambda path, **k: read.append(Path(path).relative_to(ckpt.root / "t").as_posix()) or real(path, **k))
    r = ckpt.load("t", ns, ["model"], rng=False)
    assert read == ["objects/model.pt"] and not r.rng
    read.clear()
    ckpt.load("t", ns, ["model"], rng=True)
    assert sorted(read) == ["objects/model.pt", "rng.pt"]


def test_default_tags(ckpt, root):
    assert ckpt.save(None, {"x": 1}, step=5).tag == "step-5"
    assert ckpt.save(None, {"x": 1}, step=5).tag == "step-5-2"
    assert ckpt.save(None, {"x": 1}).tag.startswith("ckpt-")


def test_resaving_a_committed_tag_needs_overwrite(ckpt, root):
    from torchckpt.errors import TagExistsError

    ckpt.save("t", {"a": 1, "b": 2})
    with pytest.raises(TagExistsError, match="'t' already exists .*overwrite=True"):
        ckpt.save("t", {"a": 3})
    assert ckpt.verify("t").ok and sorted(p.name for p in (root / "t" / "objects").iterdir()) == ["a.pt", "b.pt"]
    r = ckpt.save("t", {"a": 3}, overwrite=True)
    assert r.replaced
    assert sorted(p.name for p in (root / "t" / "objects").iterdir()) == ["a.pt"]
    assert ckpt.verify("t").ok


def test_case_insensitive_name_clash_gets_distinct_files(ckpt, root):
    ckpt.save("t", {"Model": 1, "model": 2})
    ns = {}
    ckpt.load("t", ns)
    assert ns == {"Model": 1, "model": 2}


@pytest.mark.parametrize(
    ("tag", "objs", "kw", "error", "message"),
    [
        ("t", {"f": lambda: 1}, {}, NotCheckpointableError, "'f' is a lambda"),
        ("t", {}, {}, NotCheckpointableError, "nothing to save"),
        ("a/b", {"x": 1}, {}, InvalidTagError, "path separator"),
        ("t", {"x": 1}, {"metrics": {"m": object()}}, ManifestError, "not plain JSON"),
        ("t", {"u": Unpicklable()}, {}, NotCheckpointableError, "could not save 'u'"),
    ],
)
def test_bad_saves_leave_nothing_behind(ckpt, root, tag, objs, kw, error, message):
    ckpt.save("good", {"x": 1})
    with pytest.raises(error, match=message):
        ckpt.save(tag, objs, **kw)
    assert ckpt.tags() == ["good"] and ckpt.store.latest() == "good"


def test_no_commit_then_commit_with_new_metadata(ckpt, root):
    r = ckpt.save("t", {"x": 1}, commit=False, note="old")
    assert r.status == "uncommitted" and ckpt.pending() == ["t"]
    assert ckpt.store.info("t").in_flight  # gc and rm leave it alone
    assert ckpt.gc().removed == []
    with pytest.raises(IncompleteCheckpointError):
        ckpt.load("t", {})
    with pytest.raises(CheckpointInUseError, match="not committed yet"):
        ckpt.remove("t")
    c = ckpt.commit("t", note="new", metrics={"loss": 1})
    assert c.committed and ckpt.pending() == []
    assert ckpt.info("t").info.metadata["note"] == "new"
    assert ckpt.commit("t").committed  # committing again is harmless


def test_async_save_commits_in_background_and_reports_once(ckpt, held_writes):
    ns = objects(0)
    expected = ns["weights"].clone()
    r = ckpt.save("a", ns, async_save=True)
    assert r.status == "committing"
    held_writes()
    ns["weights"].zero_()  # the snapshot was taken at save time
    outcomes = ckpt.wait()
    assert [o.tag for o in outcomes] == ["a"] and outcomes[0].committed
    assert ckpt.poll() == []
    fresh = {"weights": torch.zeros(5)}
    ckpt.load("a", fresh, ["weights"])
    assert torch.equal(fresh["weights"], expected)


def test_async_save_returns_a_handle_done_once_committed(ckpt, root, held_writes):
    ns = {"w": torch.arange(1 << 18, dtype=torch.float32), "b": torch.ones(1000), "step": 3}
    handle = ckpt.save("a", ns, async_save=True, step=3)
    assert isinstance(handle, PendingSave) and isinstance(handle, torchckpt.PendingSave)
    assert handle.tag == "a" and handle.names == ["w", "b", "step"] and handle.step == 3
    started = time.perf_counter()
    assert not handle.done() and time.perf_counter() - started < 0.1  # never blocks
    assert handle.status == "committing" and not handle.committed and handle.error is None
    assert handle.bytes_written == 0 and handle.total_bytes >= (1 << 20) + 4000
    assert repr(handle).startswith("<PendingSave 'a': writing 0 B of 1.0 MiB")
    assert "saving in the background, 0 B of 1.0 MiB written; commits when written" in handle.to_text()
    with pytest.raises(TimeoutError, match=r"save 'a' is still in flight after 0.05s \(0 B of 1.0 MiB written\)"):
        handle.wait(timeout=0.05)
    assert ckpt.pending() == ["a"] and not ckpt.store.info("a").committed
    seen = []
    handle.add_progress_callback(lambda done, total: seen.append((done, total)))
    finished = []
    handle.add_done_callback(finished.append)
    ns["w"].zero_()  # the snapshot was taken at save time

    held_writes()
    result = handle.wait(timeout=60)
    assert result.committed and handle.done() and handle.committed and handle.status == "committed"
    assert finished == [handle] and handle.result() == result and handle.exception() is None
    files = ckpt.store.info("a").manifest.files.values()
    assert handle.bytes_written == handle.total_bytes == sum(f.size for f in files)
    written = [done for done, _ in seen]
    assert written == sorted(written) and written[-1] == handle.total_bytes
    assert any(0 < done < handle.total_bytes for done in written), seen  # fed while writing, not only at the end
    assert repr(handle) == "<PendingSave 'a': committed>" and "a: committed" in handle.to_text()
    assert handle.objects[0].size > 0 and handle.checkpoint_size is not None
    assert ckpt.commit("a") == result  # commit(tag) of an async save waits on the same handle
    fresh = {"w": torch.ones(1 << 18)}
    ckpt.load("a", fresh, ["w"])
    assert torch.equal(fresh["w"], torch.arange(1 << 18, dtype=torch.float32))


def test_a_failed_async_save_raises_its_own_error_from_the_handle(ckpt, root, disk_full):
    ckpt.save("ok", {"x": 1})
    disk_full()
    handle = ckpt.save("bad", {"w": torch.ones(3)}, async_save=True)
    with pytest.raises(WriteError, match=r"no space left on the device while writing .*objects/w.pt"):
        handle.wait(timeout=60)
    with pytest.raises(WriteError):
        handle.result()
    assert handle.done() and handle.status == "failed" and not handle.committed
    assert isinstance(handle.error, WriteError) and handle.exception() is handle.error
    assert repr(handle).startswith("<PendingSave 'bad': FAILED: WriteError: ") and "no space left" in repr(handle)
    assert "FAILED" in handle.to_text()
    with pytest.raises(WriteError, match="no space left"):  # commit(tag) still raises it, once
        ckpt.commit("bad")
    assert ckpt.pending() == [] and ckpt.store.latest() == "ok"


def test_close_does_not_raise_again_an_error_the_handle_raised(root, disk_full):
    c = Checkpointer(root)
    disk_full()
    handle = c.save("bad", {"w": torch.ones(3)}, async_save=True)
    with pytest.raises(WriteError):
        handle.wait(timeout=60)
    c.close()  # already reported: not raised a second time
    unseen = Checkpointer(root)
    unseen.save("bad2", {"w": torch.ones(3)}, async_save=True)  # nobody asks its handle
    with pytest.raises(WriteError, match="no space left"):
        unseen.close()


def test_async_no_commit_handle_is_done_when_written(ckpt, held_writes):
    handle = ckpt.save("later", {"w": torch.ones(1000)}, async_save=True, commit=False)
    assert handle.status == "writing" and not handle.commits and not handle.done()
    held_writes()
    result = handle.wait(timeout=60)
    assert result.status == "uncommitted" and handle.status == "uncommitted" and not handle.committed
    assert repr(handle) == "<PendingSave 'later': written, not committed>"
    assert ckpt.pending() == ["later"] and ckpt.poll() == []  # still waits for commit(tag)
    assert not ckpt.store.info("later").committed
    assert ckpt.commit("later", note="now").committed
    assert handle.committed and ckpt.store.info("later").metadata["note"] == "now"


def test_async_no_commit_then_commit_waits(ckpt):
    ckpt.save("a", objects(0), async_save=True, commit=False)
    assert ckpt.pending() == ["a"]
    assert ckpt.commit("a").committed
    assert ckpt.verify("a").ok


@pytest.fixture
def disk_full(monkeypatch):
    """Every torch.save from now on fails as a full disk would."""
    import errno

    import torchckpt.serialization

    def fail(obj, stream):
        raise OSError(errno.ENOSPC, "No space left on device")

    return lambda: monkeypatch.setattr(torchckpt.serialization, "save", fail)


def test_async_failure_is_reported_by_poll_and_raised_by_commit(ckpt, root, disk_full):
    ckpt.save("ok", {"x": 1})
    disk_full()
    ckpt.save("bad", {"w": torch.ones(3)}, async_save=True)
    outcome = ckpt.wait()
    assert outcome[0].status == "failed" and "bad" in ckpt.pending()
    assert "FAILED" in outcome[0].to_text()
    with pytest.raises(WriteError, match=r"no space left on the device while writing .*objects/w.pt"):
        ckpt.commit("bad")
    assert ckpt.pending() == [] and ckpt.store.latest() == "ok"
    assert not (root / "bad").exists()


def test_async_failure_is_raised_by_close_when_never_reported(root, disk_full):
    c = Checkpointer(root)
    disk_full()
    c.save("bad", {"w": torch.ones(3)}, async_save=True)
    with pytest.raises(WriteError, match=r"no space left on the device while writing .*objects/w.pt"):
        c.close()


def test_a_failing_resave_keeps_the_previous_checkpoint_of_that_tag(ckpt, root):
    ckpt.save("t", {"x": 1})
    with pytest.raises(NotCheckpointableError, match=r"could not save 'u' .*Can't pickle"):
        ckpt.save("t", {"u": Unpicklable()})
    ns = {}
    ckpt.load("t", ns)
    assert ns == {"x": 1}


def test_sync_write_failure_leaves_no_tag(ckpt, root, disk_full):
    ckpt.save("ok", {"x": 1})
    disk_full()
    with pytest.raises(WriteError, match=r"no space left on the device while writing .*objects/w.pt"):
        ckpt.save("t", {"w": torch.ones(3)})
    assert ckpt.tags() == ["ok"] and ckpt.store.latest() == "ok"


def test_load_waits_for_an_async_save_of_that_tag(ckpt):
    ckpt.save("a", {"x": 5}, async_save=True)
    ns = {}
    ckpt.load("a", ns)
    assert ns == {"x": 5}


def test_commit_errors(ckpt, root):
    with pytest.raises(TagNotFoundError):
        ckpt.commit("nope")
    (root / "orphan").mkdir(parents=True)
    with pytest.raises(IncompleteCheckpointError, match="not saved by this kernel"):
        ckpt.commit("orphan")


def test_load_errors_name_the_problem_and_change_nothing(ckpt):
    ns = objects(0)
    ckpt.save("t", ns)
    with pytest.raises(ObjectNotFoundError, match="has no object 'modle'; did you mean 'model'"):
        ckpt.load("t", ns, ["modle"])
    with pytest.raises(TagNotFoundError, match="did you mean 't'"):
        ckpt.load("tt", ns)
    before = snapshot(ns)
    ns["model"] = torch.nn.Linear(4, 8)
    with pytest.raises(RestoreError, match="nothing was restored: model: missing keys"):
        ckpt.load("t", ns)
    assert states_equal(before["opt"], snapshot(ns)["opt"]) and ns["step"] == 10


def test_load_of_a_non_notebook_tag_is_refused(ckpt):
    with ckpt.store.transaction("raw") as tx:
        tx.write("model.pt", {"w": torch.ones(1)})
        tx.commit()
    with pytest.raises(IncompleteCheckpointError, match="not saved from a notebook"):
        ckpt.load("raw", {})


def test_into_and_map_location(ckpt):
    ns = objects(0)
    ckpt.save("t", ns)
    ckpt.load("latest", ns, ["model"], into="old", map_location="auto")
    assert ns["old"] is not ns["model"]
    ckpt.load("t", ns, ["opt"], into="opt_state", map_location="cpu")
    assert set(ns["opt_state"]) == {"state", "param_groups"}


def test_progress_callback_and_bar(ckpt, monkeypatch):
    import tqdm.auto

    seen = []
    ckpt.save("t", {"w": torch.zeros(1000)}, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (4000, 4000)
    bars = []

    class FakeBar:
        def __init__(self, total, **kw):
            bars.append(kw["desc"])

        def update(self, n): ...

        def close(self): ...

    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    ckpt.load("t", {"w": torch.zeros(1000)})
    assert bars == []  # small: no bar
    ckpt.load("t", {"w": torch.zeros(1000)}, progress=True)
    assert bars == ["load t"]
    small = Checkpointer(ckpt.root, progress_min_bytes=1000)
    small.save("u", {"w": torch.zeros(1000)})
    assert bars == ["load t", "save u"]
    small.close()


def test_list_info_verify_remove_gc_render(ckpt, root):
    ckpt.save("a", {"x": 1}, metrics={"loss": 0.125}, note="first")
    ckpt.save("b", {"x": 2})
    ckpt.save("c", {"x": 3}, commit=False)
    listing = ckpt.list()
    assert listing.tags == ["a", "b", "c"] and listing.pending == ["c"]
    text = listing.to_text()
    assert "loss=0.125" in text and "first" in text and "pending" in text
    assert "<table" in listing._repr_html_() and repr(listing).startswith("<TagList 3 tags")
    info = ckpt.info("a")
    assert "objects/x.pt" in info.to_text() and "note:       first" in info.to_text() and "<table" in info.to_html()
    assert repr(ckpt.verify("a")) == "<VerifyResult 'a' OK>"
    with pytest.raises(CheckpointInUseError, match="is 'latest'"):
        ckpt.remove("b")
    assert ckpt.gc(keep_last=1, dry_run=True).removed == ["a"]
    assert ckpt.gc(keep_last=1).removed == ["a"] and ckpt.tags() == ["b", "c"]
    ckpt.commit("c")
    assert ckpt.remove("b").removed == ["b"]


def test_result_reprs_are_short_and_quiet_hides_the_table(ckpt):
    r = ckpt.save("t", {"x": 1})
    assert repr(r) == "<SaveResult 't' committed: x>"
    assert "<table" in r._repr_html_()
    r.quiet = True
    assert r._repr_html_() is None
    assert repr(ckpt.load("t", {})) == "<LoadResult 't': x + rng>"
    assert isinstance(r, SaveResult)


def test_parse_metrics():
    assert parse_metrics(["loss=0.5", "n=3", "opt=adam"]) == {"loss": 0.5, "n": 3, "opt": "adam"}
    for bad in ("loss", "=1", "x=nan", "x=inf"):
        with pytest.raises(ValueError):
            parse_metrics([bad])


def test_closed_checkpointer_refuses_work(root):
    c = Checkpointer(root)
    c.close()
    with pytest.raises(RuntimeError, match="is closed"):
        c.save("t", {"x": 1})


def test_concurrent_saves_from_threads_all_commit(ckpt):
    errors = []

    def work(i):
        try:
            ckpt.save(f"t{i}", {"w": torch.full((100,), float(i))}, async_save=i % 2 == 0)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ckpt.wait()
    assert errors == [] and sorted(ckpt.tags()) == [f"t{i}" for i in range(6)]
    assert all(ckpt.verify(f"t{i}").ok for i in range(6))


# -- DeepSpeed ----------------------------------------------------------------------------------
def test_deepspeed_engine_is_saved_through_its_own_save_checkpoint(ds_dist, ckpt, root, caplog):
    import deepspeed

    import torchckpt

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        config = {"train_batch_size": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
                  "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        return engine

    def train(engine, n):
        out = []
        for _ in range(n):
            x = torch.randn(4, 8)
            loss = (engine(x) ** 2).mean()
            engine.backward(loss)
            engine.step()
            out.append(loss.item())
        return out

    engine = make(0)
    ns = {"engine": engine, "note": "ds"}
    train(engine, 2)
    found = ckpt.checkpointable({**ns, "model": engine.module, "optimizer": engine.optimizer})
    assert list(found) == ["engine", "note"]
    with caplog.at_level(logging.WARNING):
        r = ckpt.save(None, found, step=infer_step(ns))
    assert not [rec for rec in caplog.records if rec.name.startswith("torchckpt")]  # one clean commit
    assert r.tag == "step-2" and isinstance(engine.checkpoint_engine, torchckpt.TorchCheckpointEngine)
    files = ckpt.store.info("step-2").manifest.files
    assert "mp_rank_00_model_states.pt" in files and "objects/note.pt" in files and "rng.pt" in files
    reference = train(engine, 2)
    other = make(1)
    ns2 = {"engine": other, "note": "changed"}
    ckpt.load("step-2", ns2)
    assert ns2["note"] == "ds" and other.global_steps == 2
    assert train(other, 2) == reference
    # --no-commit and async hold for the engine's files too
    ckpt.save("later", {"engine": engine}, commit=False, async_save=True)
    assert not ckpt.store.info("later").committed
    assert ckpt.commit("later").committed and ckpt.verify("later").ok
    assert "mp_rank_00_model_states.pt" in ckpt.store.info("later").manifest.files
    d = ckpt.diff("step-2", "step-2")
    assert d.identical and any(k.startswith("mp_rank_00_model_states.pt/") for k in d.deltas)


# -- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_checkpoint_loads_on_cpu_and_back(ckpt):
    model = torch.nn.Linear(4, 2).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4, device="cuda")).sum().backward()
    opt.step()
    ckpt.save("g", {"model": model, "opt": opt, "t": torch.ones(3, device="cuda")})
    cpu_model = torch.nn.Linear(4, 2)
    cpu_ns = {"model": cpu_model, "opt": torch.optim.Adam(cpu_model.parameters()), "t": torch.zeros(3)}
    ckpt.load("g", cpu_ns, map_location="cpu")
    assert torch.equal(cpu_model.weight, model.weight.cpu()) and cpu_ns["t"].device.type == "cpu"
    new = {}
    ckpt.load("g", new, ["t"], map_location="cuda:0")
    assert new["t"].device == torch.device("cuda:0")
    ckpt.save("g-async", {"model": model}, async_save=True)
    assert ckpt.commit("g-async").committed
    sd = ckpt.store.load("g-async", "objects/model.pt")
    assert sd["weight"].device.type == "cuda"  # saved locations are kept


def test_options_reach_the_store_and_the_async_writer(root):
    from torchckpt.options import CheckpointOptions

    opts = CheckpointOptions(lock_timeout=7, max_inflight_bytes=1 << 20, pin_memory=False, progress_min_bytes=10)
    c = Checkpointer(root, options=opts)
    try:
        assert c.options is opts and c.store.lock_timeout == 7 and c.progress_min_bytes == 10
        c.save("a", {"w": torch.ones(10)}, async_save=True).wait(timeout=60)
        assert c._writer.max_inflight_bytes == 1 << 20 and c._writer.pin_memory is False
        c.options = CheckpointOptions(lock_timeout=3, max_inflight_bytes=None, auto_max_bytes=None)
        assert c.store.lock_timeout == 3 and c._writer.max_inflight_bytes is None and c.auto_max_bytes is None
        c.auto_max_bytes = 100  # the old attributes still work, through the options (validated)
        assert c.options.auto_max_bytes == 100 and c.options.lock_timeout == 3
        with pytest.raises(ValueError, match=r"^progress_min_bytes must be a whole number of bytes >= 0, got -1$"):
            c.progress_min_bytes = -1
        with pytest.raises(TypeError, match="options must be a CheckpointOptions, got dict"):
            c.options = {"lock_timeout": 3}
    finally:
        c.close()


def test_the_old_keyword_arguments_still_work_over_options(root):
    from torchckpt.options import CheckpointOptions

    c = Checkpointer(root, options=CheckpointOptions(lock_timeout=9), progress_min_bytes=5, auto_max_bytes=None)
    assert (c.options.lock_timeout, c.progress_min_bytes, c.auto_max_bytes) == (9, 5, None)
    with pytest.raises(ValueError, match="auto_max_bytes must be"):
        Checkpointer(root, auto_max_bytes=-1)
    with pytest.raises(TypeError, match="options must be a CheckpointOptions"):
        Checkpointer(root, options=3)
    c.close()


def test_every_result_has_to_dict_as_plain_json(ckpt, root):
    """The presentation layer's one JSON form (what --json prints): every result's to_dict()
    round-trips through json with the same numbers and words its tables show."""
    import json

    model = torch.nn.Linear(3, 2)
    saved = ckpt.save("a", {"model": model, "step": 5}, step=5, note="first", metrics={"loss": 0.5})
    ckpt.save("b", {"model": model, "step": 6})
    loaded = ckpt.load("a", {"model": model, "step": 0})
    dicts = {
        "save": saved.to_dict(), "load": loaded.to_dict(), "list": ckpt.list().to_dict(),
        "info": ckpt.info("a").to_dict(), "verify": ckpt.verify("a").to_dict(),
        "remove": ckpt.remove("b", force=True).to_dict(),
    }
    assert json.loads(json.dumps(dicts)) == dicts  # nothing but JSON values
    assert dicts["save"]["tag"] == "a" and dicts["save"]["status"] == "committed" and dicts["save"]["metrics"] == {"loss": 0.5}
    assert [o["name"] for o in dicts["save"]["objects"]] == ["model", "step"]
    assert dicts["save"]["root"] == str(root) and dicts["save"]["error"] is None
    assert [o["name"] for o in dicts["load"]["objects"]] == ["model", "step"]
    assert sorted(c["tag"] for c in dicts["list"]["checkpoints"]) == ["a", "b"]
    info = dicts["info"]
    assert info["tag"] == "a" and info["status"] == "committed" and info["note"] == "first" and info["step"] == 5
    assert {f["path"] for f in info["file_list"]} >= {"objects/model.pt", "objects/step.pt"}
    assert info["files"] == len(info["file_list"]) and info["objects"]["model"]["kind"] == "module"
    assert info["size"] == ckpt.info("a").info.size
    assert dicts["verify"] == {"tag": "a", "ok": True, "files_checked": info["files"], "problems": []}
    assert dicts["remove"]["removed"] == ["b"]


def test_save_namespace_is_what_every_surface_saves_through(ckpt):
    """%ckpt save and the panel's Save call one method: names checked (close names offered), or
    discovery with what it left out in the notes, and the step inferred from the namespace."""
    ns = {"model": torch.nn.Linear(2, 2), "global_step": 40, "cfg": {"act": lambda x: x}}
    with pytest.raises(ObjectNotFoundError, match=r"no variable 'modle' in the notebook; did you mean 'model'\?"):
        ckpt.save_namespace("t", ns, ["modle"])
    assert not (ckpt.root / "t").exists()
    r = ckpt.save_namespace("t", ns)
    assert r.names == ["model", "global_step"] and r.step == 40
    assert any("cfg" in n for n in r.notes), r.notes  # left out, and said so
    assert ckpt.save_namespace("u", ns, ["model"], step=7).step == 7
    with pytest.raises(NotCheckpointableError, match="nothing to save"):
        ckpt.save_namespace("v", {"act": lambda x: x})
