"""TorchCheckpointEngine in async mode under a real DeepSpeed engine (CPU, gloo, one rank).

DeepSpeed treats a decoupled engine's save as pending: ``save_checkpoint`` returns after the
snapshot and the commit happens at the next gradient-accumulation boundary
(``_commit_decoupled_checkpoint`` -> ``get_commit_info()`` -> ``commit``), or in ``destroy``.
"""

import pytest
import torch

import torchckpt
from torchckpt import CheckpointStore
from torchckpt.layout import MANIFEST_NAME

deepspeed = pytest.importorskip("deepspeed")

from _training import make_engine as _make_engine  # noqa: E402
from _training import params, train  # noqa: E402


def make_engine(seed: int, stage: int = 0):
    return _make_engine(stage, seed, scheduler=False)


@pytest.mark.parametrize("stage", [0, 1])
def test_async_save_commits_at_the_next_step_and_resumes_bit_identically(ds_dist, tmp_path, stage):
    root = tmp_path / "ckpt"
    first = make_engine(seed=0, stage=stage)
    ours = torchckpt.install(first, async_save=True)
    assert ours.is_decoupled() and not ours.preserves_storage_sharing()
    train(first, 0, 3)
    saved_params = params(first)
    assert first.save_checkpoint(str(root), tag="step3", client_state={"step": 3})
    # Pending: the files are being written, nothing is committed, DeepSpeed will ask for the info.
    assert ours.get_commit_info().tag == "step3"
    assert not (root / "step3" / MANIFEST_NAME).exists() and not (root / "latest").exists()
    # The snapshot was taken inside save_checkpoint: changing the live weights now must not
    # reach the files (we undo it below so the training run itself is unchanged).
    live = list(first.module.parameters())
    kept = [p.detach().clone() for p in live]
    with torch.no_grad():
        for p in live:
            p.zero_()
    writer = ours._writer
    writer.wait()
    with torch.no_grad():
        for p, k in zip(live, kept, strict=False):
            p.copy_(k)
    for name, value in params(first).items():
        assert torch.equal(value, saved_params[name]), name
    expected = train(first, 3, 3)  # the first step's boundary commits step3
    assert ours.get_commit_info() is None
    store = CheckpointStore(root)
    assert store.verify("step3").ok and store.latest() == "step3"
    assert (root / "latest").read_text() == "step3"
    expected_params = params(first)
    pooled = writer.pooled_bytes
    assert pooled > 0
    first.destroy()  # DeepSpeed calls cleanup(): buffers are returned
    assert writer.pooled_bytes == 0

    resumed = make_engine(seed=1, stage=stage)
    torchckpt.install(resumed, async_save=True)
    load_path, client_state = resumed.load_checkpoint(str(root))
    assert load_path is not None and client_state["step"] == 3
    for name, value in params(resumed).items():
        assert torch.equal(value, saved_params[name]), name
    assert train(resumed, 3, 3) == expected, "losses after resume must be bit-identical"
    for name, value in params(resumed).items():
        assert torch.equal(value, expected_params[name]), name
    resumed.destroy()


def test_a_second_save_before_any_step_commits_the_first(ds_dist, tmp_path):
    root = tmp_path / "ckpt"
    engine = make_engine(seed=0)
    ours = torchckpt.install(engine, async_save=True)
    train(engine, 0, 1)
    engine.save_checkpoint(str(root), tag="a")
    engine.save_checkpoint(str(root), tag="b")  # create("b") commits "a" first
    store = CheckpointStore(root)
    assert store.info("a").committed and not store.info("b").committed
    assert ours.get_commit_info().tag == "b"
    ours.cleanup()  # commits "b" and returns the buffers
    assert store.info("b").committed and store.latest() == "b"
    assert ours._writer.pooled_bytes == 0
    engine.destroy()


def test_a_failed_background_write_stops_the_next_step_naming_the_file(ds_dist, tmp_path):
    from torchckpt.errors import WriteError

    root = tmp_path / "ckpt"
    engine = make_engine(seed=0)
    ours = torchckpt.install(engine, async_save=True)
    train(engine, 0, 1)
    engine.save_checkpoint(str(root), tag="bad", client_state={"hook": lambda: 0})  # pickling fails later
    with pytest.raises(WriteError, match=r"mp_rank_00_model_states\.pt in the background failed"):
        train(engine, 1, 1)  # DeepSpeed commits the pending checkpoint at this step's boundary
    assert not CheckpointStore(root).info("bad").committed
    assert ours.get_commit_info() is None, "the failed checkpoint is no longer pending"
    engine.destroy()


@pytest.mark.gpu
def test_gpu_async_save_writes_the_snapshot_as_cpu_tensors(ds_dist, tmp_path):
    # The model on the GPU: pinned snapshot, non-blocking copies, then the weights are zeroed.
    root = tmp_path / "ckpt"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).cuda()
    config = {"train_batch_size": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    torchckpt.install(engine, async_save=True)
    engine.save_checkpoint(str(root), tag="g")
    saved = params(engine)
    with torch.no_grad():
        for p in engine.module.parameters():
            p.zero_()
    engine.destroy()
    state = CheckpointStore(root).load("g", "mp_rank_00_model_states.pt")
    for name, value in saved.items():
        assert torch.equal(state["module"][name], value.cpu()), name
    # DeepSpeed clones model states to the CPU before a synchronous save; our async snapshot
    # records them as CPU tensors too, so a load without map_location never lands on a GPU.
    assert all(t.device.type == "cpu" for t in state["module"].values())
