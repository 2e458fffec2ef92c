"""AsyncWriter: snapshot isolation, storage sharing, back-pressure, errors, memory reuse."""

import errno
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from torchckpt import CheckpointStore, async_writer
from torchckpt.async_writer import AsyncWriter, write_file
from torchckpt.errors import WriteError


class GatedWrite:
    """A ``write_file`` hook that holds every write until the test opens the gate."""

    def __init__(self):
        self.gate = threading.Event()
        self.started = threading.Event()

    def __call__(self, path, obj):
        self.started.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return write_file(path, obj)


def wait_until(predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_state():
    torch.manual_seed(0)
    flat = torch.randn(4096)
    return {
        "w": torch.randn(64, 32),
        "p": torch.nn.Parameter(torch.randn(16)),
        "head": flat[:100],  # two views of one storage...
        "tail": flat[3000:3100].view(10, 10),  # ...far apart inside it
        "ints": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(9).half(),
        "empty": torch.empty(0, 4),
        "nested": {"step": 12, "lr": [0.1, 0.01], "t": (torch.ones(3), "x")},
    }, flat


def clone_values(state):
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items() if k != "nested"}


def test_caller_may_mutate_and_free_tensors_as_soon_as_save_returns(root):
    state, flat = make_state()
    expected = clone_values(state)
    gated = GatedWrite()
    writer = AsyncWriter(write_file=gated)
    store = CheckpointStore(root)
    tx = store.transaction("t1", writer=writer)
    tx.write("state.pt", state)  # returns once the snapshot is taken; the write is held
    assert gated.started.wait(10)
    # Overwrite, zero and free every tensor of the caller before a single byte is written.
    state["w"].fill_(7)
    state["p"].data.zero_()
    flat.fill_(-1)
    state["ints"].zero_()
    state["half"].fill_(3)
    state["nested"]["t"][0].zero_()
    state["nested"]["step"] = 99
    state["nested"]["lr"].append(5)
    for t in (state["w"], flat, state["ints"], state["half"]):
        t.untyped_storage().resize_(0)  # the caller's memory is gone
    del flat, state
    gc.collect()
    gated.gate.set()
    tx.commit()
    loaded = store.load("t1", "state.pt")
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    assert isinstance(loaded["p"], torch.nn.Parameter) and loaded["p"].requires_grad
    nested = loaded["nested"]
    assert nested["step"] == 12 and nested["lr"] == [0.1, 0.01] and nested["t"][1] == "x"
    assert torch.equal(nested["t"][0], torch.ones(3))
    writer.shutdown()


def test_module_and_optimizer_state_dicts_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    expected_model = {k: v.clone() for k, v in state["model"].items()}
    expected_optim = {k: v.clone() for k, v in state["optim"]["state"][0].items()}
    writer = AsyncWriter()
    future = writer.submit(tmp_path / "m.pt", state)
    opt.step()  # changes the weights and the optimizer state in place
    future.result()
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    assert loaded["model"]._metadata == state["model"]._metadata, "the state_dict's version metadata is kept"
    assert all(torch.equal(loaded["model"][k], v) for k, v in expected_model.items())
    assert all(torch.equal(loaded["optim"]["state"][0][k], v) for k, v in expected_optim.items())
    assert float(loaded["optim"]["state"][0]["step"]) == 1.0
    assert loaded["optim"]["param_groups"][0]["lr"] == 0.1
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optim"])
    writer.shutdown()


def test_views_share_one_compacted_storage_in_the_file(tmp_path):
    flat = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB
    state = {"a": flat[1000:1010], "b": flat[1005:1025].view(4, 5), "own": torch.ones(3)}
    writer = AsyncWriter()
    written = writer.submit(tmp_path / "v.pt", state).result()
    loaded = torch.load(tmp_path / "v.pt", weights_only=True)
    assert torch.equal(loaded["a"], flat[1000:1010]) and torch.equal(loaded["b"], flat[1005:1025].view(4, 5))
    storage = loaded["a"].untyped_storage()
    assert storage.data_ptr() == loaded["b"].untyped_storage().data_ptr(), "views must still share a storage"
    assert storage.nbytes() < 256, f"the view's storage must hold only the span used, not {storage.nbytes()} bytes"
    assert written.size < 8192, "the 4 MiB buffer the views came from must not be in the file"
    loaded["a"][5] = -1  # still views of each other after loading
    assert loaded["b"][0, 0] == -1
    writer.shutdown()


def test_second_save_waits_while_the_cap_is_reached(tmp_path):
    one = {"x": torch.randn(256, 1024)}  # 1 MiB
    two = {"y": torch.randn(256, 1024)}
    gated = GatedWrite()
    writer = AsyncWriter(max_inflight_bytes=(3 << 20) // 2, write_file=gated)  # room for one state
    first = writer.submit(tmp_path / "one.pt", one)
    assert writer.inflight_bytes == 1 << 20
    done = threading.Event()

    def second():
        writer.submit(tmp_path / "two.pt", two).result()
        done.set()

    thread = threading.Thread(target=second)
    thread.start()
    wait_until(lambda: writer.waits == 1, "the second save to start waiting")
    assert writer.inflight_bytes == 1 << 20, "the waiting save must not have taken memory yet"
    assert not done.is_set() and not first.done()
    gated.gate.set()
    thread.join(10)
    assert done.is_set() and first.result().size > 0
    assert writer.inflight_bytes == 0
    assert torch.equal(torch.load(tmp_path / "two.pt", weights_only=True)["y"], two["y"])
    writer.shutdown()


def test_a_state_larger_than_the_cap_still_saves(tmp_path):
    writer = AsyncWriter(max_inflight_bytes=1024)
    state = {"x": torch.randn(4096)}
    writer.submit(tmp_path / "big.pt", state).result()
    assert writer.waits == 0
    assert torch.equal(torch.load(tmp_path / "big.pt", weights_only=True)["x"], state["x"])
    writer.shutdown()


def test_background_error_surfaces_at_commit_naming_the_file(root):
    writer = AsyncWriter()
    store = CheckpointStore(root)
    tx = store.transaction("bad", writer=writer)
    tx.write("ok.pt", {"x": torch.ones(2)})
    tx.write("sub/unpicklable.pt", {"x": torch.ones(2), "fn": lambda: 0})  # pickling fails in the background
    with pytest.raises(WriteError, match=r"sub/unpicklable\.pt in the background failed: .*lambda"):
        tx.commit()
    assert store.list()[0].committed is False, "a failed write must leave the tag incomplete"
    writer.shutdown()


def test_os_error_of_a_background_write_names_the_file(tmp_path):
    # RLIMIT_FSIZE in a child: the kernel refuses the write (EFBIG) on the writer thread.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        import torch
        from torchckpt import CheckpointStore
        from torchckpt.async_writer import AsyncWriter
        from torchckpt.errors import WriteError
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        tx = CheckpointStore({str(tmp_path)!r}).transaction("t", writer=AsyncWriter())
        tx.write("big.pt", {{"x": torch.zeros(1 << 20)}})
        try:
            tx.commit()
        except WriteError as e:
            print("ERR", e.errno, e)
            sys.exit(0)
        sys.exit("commit did not fail")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ERR {errno.EFBIG}" in out.stdout and "big.pt" in out.stdout and "file too large" in out.stdout
    assert not (tmp_path / "t" / "big.pt").exists()


def test_second_save_of_the_same_shapes_allocates_nothing(tmp_path):
    state, _ = make_state()
    writer = AsyncWriter()
    writer.submit(tmp_path / "1.pt", state).result()
    pooled = writer.pooled_bytes
    assert pooled > 0
    for name in ("2.pt", "3.pt"):
        state["w"].add_(1)
        writer.submit(tmp_path / name, state).result()
        assert writer.pooled_bytes == pooled
    smaller = {"w": torch.randn(8, 8)}
    writer.submit(tmp_path / "small.pt", smaller).result()
    assert writer.pooled_bytes == pooled, "a smaller state reuses the same memory"
    assert torch.equal(torch.load(tmp_path / "3.pt", weights_only=True)["w"], state["w"])
    writer.shutdown()


def test_memory_follows_the_state_rather_than_growing_with_each_shape(tmp_path):
    writer = AsyncWriter()
    writer.submit(tmp_path / "a.pt", {"x": torch.zeros(1 << 20)}).result()  # 4 MiB
    writer.submit(tmp_path / "b.pt", {"x": torch.zeros(4 << 20)}).result()  # 16 MiB: a new mapping
    assert writer.pooled_bytes == 16 << 20, "the idle 4 MiB mapping must have been returned"
    writer.shutdown()


def test_concurrent_snapshots_get_separate_memory(tmp_path):
    gated = GatedWrite()
    writer = AsyncWriter(write_file=gated)
    a, b = {"x": torch.full((1000,), 1.0)}, {"x": torch.full((1000,), 2.0)}
    fa = writer.submit(tmp_path / "a.pt", a)
    fb = writer.submit(tmp_path / "b.pt", b)
    gated.gate.set()
    fa.result(), fb.result()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["x"], a["x"])
    assert torch.equal(torch.load(tmp_path / "b.pt", weights_only=True)["x"], b["x"])
    writer.shutdown()


def test_close_returns_the_memory_and_the_writer_stays_usable(tmp_path):
    writer = AsyncWriter()
    state = {"x": torch.ones(16 << 20)}  # 64 MiB
    writer.submit(tmp_path / "x.pt", state).result()
    assert writer.pooled_bytes == 64 << 20
    gc.collect()
    before = rss_bytes()
    writer.close()
    gc.collect()
    assert writer.pooled_bytes == 0
    assert before - rss_bytes() > 48 << 20, "closing must return the snapshot memory to the OS"
    writer.submit(tmp_path / "y.pt", {"y": torch.ones(3)}).result()
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True)["y"], torch.ones(3))
    writer.shutdown()


def test_unusual_tensors_are_copied_too(tmp_path):
    sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,)).coalesce()
    base = torch.tensor([1 + 2j])
    state = {"sparse": sparse, "conj": base.conj()}
    gated = GatedWrite()
    writer = AsyncWriter(write_file=gated)
    future = writer.submit(tmp_path / "u.pt", state)
    sparse.values().zero_()  # in place, after the snapshot
    base.zero_()
    gated.gate.set()
    future.result()
    loaded = torch.load(tmp_path / "u.pt", weights_only=True)
    assert torch.equal(loaded["sparse"].to_dense(), torch.tensor([1.0, 0.0, 2.0, 0.0]))
    assert torch.equal(loaded["conj"].resolve_conj(), torch.tensor([1 - 2j]))
    writer.shutdown()


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_inflight_bytes must be a positive integer or None, got 0"):
        AsyncWriter(max_inflight_bytes=0)
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        AsyncWriter(workers=0)


@pytest.mark.gpu
def test_gpu_snapshot_is_pinned_isolated_and_keeps_its_device(tmp_path):
    x = torch.randn(1 << 20, device="cuda")
    expected = x.cpu()
    writer = AsyncWriter()
    future = writer.submit(tmp_path / "g.pt", {"x": x, "view": x[10:20]})
    x.zero_()  # queued on the same stream right after our copy; the snapshot must not see it
    del x
    future.result()
    assert all(chunk.pinned for chunk in writer._arena._chunks)
    assert not async_writer._SNAPSHOT_LOCATIONS, "device tags are dropped once written"
    loaded = torch.load(tmp_path / "g.pt", weights_only=True)
    assert loaded["x"].device.type == "cuda" and torch.equal(loaded["x"].cpu(), expected)
    assert torch.equal(loaded["view"].cpu(), expected[10:20])
    on_cpu = AsyncWriter(keep_device=False)
    on_cpu.submit(tmp_path / "c.pt", {"x": torch.ones(4, device="cuda")}).result()
    assert torch.load(tmp_path / "c.pt", weights_only=True)["x"].device.type == "cpu"
    writer.shutdown()
    on_cpu.shutdown()


def test_on_write_reports_the_bytes_as_they_are_written(tmp_path):
    writer = AsyncWriter()
    seen: list[int] = []
    state = {"a": torch.randn(1 << 16), "b": torch.randn(100), "step": 3}
    written = writer.submit(tmp_path / "f.pt", state, on_write=seen.append).result()
    assert sum(seen) == written.size == (tmp_path / "f.pt").stat().st_size
    assert len(seen) > 1  # piece by piece, not once at the end
    gated = GatedWrite()  # a write_file without on_write=: the file is reported whole when written
    gated.gate.set()
    other: list[int] = []
    written = AsyncWriter(write_file=gated).submit(tmp_path / "g.pt", state, on_write=other.append).result()
    assert other == [written.size]
    writer.shutdown()
