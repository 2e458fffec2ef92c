"""Drop-in means drop-in: whatever DeepSpeed's own checkpoint engine accepts, torchckpt's accepts,
with at least the same result (a real DeepSpeed engine, CPU, gloo, one rank).

Many-rank cases are in tests/test_distributed.py; process exit in ``test_async_*_at_exit``.
"""

import logging
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import torchckpt
from torchckpt import CheckpointStore
from torchckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from torchckpt.layout import MANIFEST_NAME

deepspeed = pytest.importorskip("deepspeed")

from _training import make_engine, params, train  # noqa: E402

DS_ENGINE = deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine.TorchCheckpointEngine


def no_torchckpt_traces(path):
    return not [p for p in path.rglob(".torchckpt*")]


# -- save_16bit_model: create() then a file outside the tag directory ----------------------------
@pytest.mark.parametrize(("stage", "gather"), [(0, False), (1, False), (2, False), (3, True), (3, False)])
def test_save_16bit_model_writes_outside_the_tag_atomically(ds_dist, tmp_path, stage, gather):
    engine = make_engine(stage, seed=0, zero={"stage3_gather_16bit_weights_on_model_save": gather} if stage == 3 else None)
    torchckpt.install(engine)
    train(engine, 0, 1)
    out = tmp_path / "export"
    saved = engine.save_16bit_model(str(out))
    if stage == 3 and not gather:  # DeepSpeed declines: a sharded model is not worth exporting
        assert saved is False and not (out / "pytorch_model.bin").exists()
        return
    assert saved is True
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    expected = params(engine)
    assert set(state) == set(expected)
    for name, value in state.items():
        assert torch.equal(value, expected[name]), name
    assert zipfile.ZipFile(out / "pytorch_model.bin").testzip() is None, "exports carry zip CRCs"
    # Nothing of a checkpoint: no tag directory, no lock, no temporary file.
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_model.bin"]
    # The engine is ready for the next checkpoint.
    assert engine.checkpoint_engine._open is None
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="after")
    assert CheckpointStore(tmp_path / "ckpt").verify("after").ok


def test_save_16bit_model_after_an_async_save_of_the_same_step_keeps_it_committed(ds_dist, tmp_path):
    """save_16bit_model's create() names the tag global_stepN: the pending checkpoint of that very
    name must be committed, not reopened (and un-committed) by the export."""
    engine = make_engine(1, seed=0)
    torchckpt.install(engine, async_save=True)
    train(engine, 0, 2)
    root = tmp_path / "ckpt"
    engine.save_checkpoint(str(root))  # tag global_step2, committed at the next step
    engine.save_16bit_model(str(root))
    store = CheckpointStore(root)
    assert store.latest() == "global_step2" and store.verify("global_step2").ok
    assert (root / "pytorch_model.bin").is_file()


# -- checkpoints DeepSpeed's own engine wrote -------------------------------------------------------
def test_resume_from_deepspeed_own_checkpoint_is_bit_identical_with_one_warning(ds_dist, tmp_path, recwarn):
    root = tmp_path / "ckpt"
    first = make_engine(2, seed=0)
    assert isinstance(first.checkpoint_engine, DS_ENGINE)
    train(first, 0, 3)
    first.save_checkpoint(str(root), client_state={"step": 3})  # DeepSpeed's engine, its own `latest`
    expected = train(first, 3, 3)

    resumed = make_engine(2, seed=1)
    torchckpt.install(resumed)
    path, client_state = resumed.load_checkpoint(str(root))
    assert path is not None and client_state["step"] == 3
    assert train(resumed, 3, 3) == expected
    warned = [w for w in recwarn if issubclass(w.category, torchckpt.UnverifiedLoadWarning)]
    assert len(warned) == 1, "one warning per tag, not one per file"
    assert "global_step3 without a manifest" in str(warned[0].message)
    assert f"torchckpt adopt {root} global_step3" in str(warned[0].message)


def test_a_torn_deepspeed_file_is_refused(ds_dist, tmp_path):
    root = tmp_path / "ckpt"
    engine = make_engine(1, seed=0)
    train(engine, 0, 1)
    engine.save_checkpoint(str(root), tag="theirs")
    optim = root / "theirs" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])  # a crash mid-write of DeepSpeed's in-place save
    fresh = make_engine(1, seed=1)
    torchckpt.install(fresh)
    with pytest.raises(CorruptCheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt is torn"), \
            pytest.warns(torchckpt.UnverifiedLoadWarning):
        fresh.load_checkpoint(str(root), tag="theirs")
    flipped = bytearray(data)
    optim.write_bytes(data)
    biggest = max(zipfile.ZipFile(optim).infolist(), key=lambda i: i.file_size)
    flipped[biggest.header_offset + 128 + biggest.file_size // 2] ^= 0xFF  # inside a tensor: the zip CRC-32 sees it
    optim.write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpointError, match="is torn: Bad CRC-32"):
        fresh.load_checkpoint(str(root), tag="theirs")


# -- save() and load() outside create()/commit() ---------------------------------------------------
def test_bare_save_and_load_need_no_checkpoint(tmp_path):
    engine = torchckpt.TorchCheckpointEngine()
    path = tmp_path / "plain" / "weights.pt"
    path.parent.mkdir()
    engine.save({"w": torch.arange(4.0)}, str(path))
    assert sorted(p.name for p in path.parent.iterdir()) == ["weights.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4.0))
    with pytest.warns(torchckpt.UnverifiedLoadWarning, match="plain without a manifest"):
        assert torch.equal(engine.load(str(path), map_location="cpu")["w"], torch.arange(4.0))
    # A failed bare save leaves the previous file as it was.
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle this")

    with pytest.raises(TypeError, match="cannot pickle this"):
        engine.save({"w": torch.zeros(4), "bad": Unpicklable()}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["weights.pt"]


def test_bare_load_of_a_hostile_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(torchckpt.UnsafeCheckpointError, match="posix.system|os.system"):
        torchckpt.TorchCheckpointEngine().load(str(path))


# -- every save_checkpoint / load_checkpoint option ---------------------------------------------
def test_save_and_load_options(ds_dist, tmp_path):
    root = tmp_path / "ckpt"
    engine = make_engine(1, seed=0)
    torchckpt.install(engine)
    train(engine, 0, 2)
    engine.save_checkpoint(str(root), tag="a", client_state={"note": "first", "step": 2})
    engine.save_checkpoint(str(root), tag="b", save_latest=False)
    store = CheckpointStore(root)
    assert store.latest() == "a" and (root / "latest").read_text() == "a"
    assert store.verify("b").ok

    saved_params = params(engine)
    saved_lr = engine.lr_scheduler.state_dict()
    train(engine, 2, 3)

    other = make_engine(1, seed=1)
    torchckpt.install(other)
    _, client = other.load_checkpoint(str(root), tag="a", load_module_only=True)
    assert all(torch.equal(v, saved_params[k]) for k, v in params(other).items())
    assert other.lr_scheduler.state_dict()["last_batch_iteration"] != saved_lr["last_batch_iteration"]

    other = make_engine(1, seed=1)
    torchckpt.install(other)
    _, client = other.load_checkpoint(str(root), tag="a", load_optimizer_states=False, load_lr_scheduler_states=False)
    assert client["note"] == "first" and client["step"] == 2
    assert other.lr_scheduler.state_dict()["last_batch_iteration"] != saved_lr["last_batch_iteration"]
    other.load_checkpoint(str(root), tag="a")
    assert other.lr_scheduler.state_dict() == saved_lr


def test_exclude_frozen_parameters_then_non_strict_load(ds_dist, tmp_path):
    root = tmp_path / "ckpt"
    engine = make_engine(0, seed=0)
    engine.module[0].requires_grad_(False)
    torchckpt.install(engine)
    engine.save_checkpoint(str(root), tag="t", exclude_frozen_parameters=True)
    module = CheckpointStore(root).load("t", "mp_rank_00_model_states.pt")["module"]
    assert not any(k.startswith("0.") for k in module), sorted(module)
    other = make_engine(0, seed=0)
    torchckpt.install(other)
    assert other.load_checkpoint(str(root), tag="t", load_module_strict=False)[0] is not None


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_to_fp32_reads_our_checkpoints(ds_dist, tmp_path, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = tmp_path / "ckpt"
    engine = make_engine(stage, seed=0)
    torchckpt.install(engine)
    train(engine, 0, 2)
    engine.save_checkpoint(str(root), tag="t")
    expected = {k: v.float() for k, v in params(engine).items()} if stage != 3 else None
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag="t")
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    if expected is not None:
        for name, value in state.items():
            assert torch.equal(value, expected[name]), name


# -- asynchronous saves: never lost at the end of a run --------------------------------------------
def test_destroy_commits_the_pending_async_checkpoint(ds_dist, tmp_path, caplog):
    root = tmp_path / "ckpt"
    engine = make_engine(1, seed=0)
    torchckpt.install(engine, async_save=True)
    train(engine, 0, 1)
    engine.save_checkpoint(str(root), tag="last")
    assert not (root / "last" / MANIFEST_NAME).exists(), "DeepSpeed commits at the next step"
    logger = logging.getLogger("DeepSpeed")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="DeepSpeed"):
            engine.destroy()
    finally:
        logger.removeHandler(caplog.handler)
    assert CheckpointStore(root).verify("last").ok and CheckpointStore(root).latest() == "last"
    assert any("committing pending checkpoint last at destroy()" in r.getMessage() for r in caplog.records)


EXIT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT={port!r})
    import deepspeed, torchckpt
    from _training import make_engine, train
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    engine = make_engine(1, seed=0)
    torchckpt.install(engine, async_save=True)
    train(engine, 0, 2)
    engine.save_checkpoint({root!r}, tag="final")
    print("saved; exiting without another step", flush=True)
    """
)


def test_async_checkpoint_is_committed_when_the_process_exits(tmp_path):
    from _net import free_port

    root = tmp_path / "ckpt"
    script = EXIT_SCRIPT.format(tests=os.path.dirname(__file__), port=str(free_port(range(29650, 29700))), root=str(root))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "committing pending checkpoint final at exit" in run.stdout + run.stderr
    store = CheckpointStore(root)
    assert store.latest() == "final" and store.verify("final").ok


def test_repeated_and_stray_calls(tmp_path):
    engine = torchckpt.TorchCheckpointEngine()
    engine.create("t")  # nothing saved into the tag: committing it is a no-op, as for DeepSpeed's engine
    assert engine.commit("t") is True
    assert not (tmp_path / "t").exists() and no_torchckpt_traces(tmp_path)
    with pytest.raises(IncompleteCheckpointError, match="began writing and never committed"):
        tx = CheckpointStore(tmp_path).transaction("crashed")
        tx.write("m.pt", {"a": 1})
        engine.load(str(tmp_path / "crashed" / "m.pt"))


# -- pipeline layer files and MoE expert files ------------------------------------------------------
def _restores_params(engine, root, step):
    saved = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    engine.save_checkpoint(str(root), tag="t")
    step()  # change every trainable parameter
    assert any(not torch.equal(v, saved[k]) for k, v in engine.module.state_dict().items())
    assert engine.load_checkpoint(str(root), tag="t")[0] is not None
    for name, value in engine.module.state_dict().items():
        assert torch.equal(value, saved[name]), name
    return CheckpointStore(root).manifest("t")


def test_pipeline_module_layer_files(ds_dist, tmp_path):
    from deepspeed.pipe import PipelineModule

    torch.manual_seed(0)
    net = PipelineModule(layers=[torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)], num_stages=1,
                         loss_fn=torch.nn.MSELoss())
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**9,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=net, config=config, model_parameters=net.parameters())
    torchckpt.install(engine)
    g = torch.Generator().manual_seed(1)
    batches = iter(lambda: (torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)), None)
    manifest = _restores_params(engine, tmp_path / "ckpt", lambda: engine.train_batch(batches))
    assert {"layer_00-model_states.pt", "layer_02-model_states.pt"} <= set(manifest.files)


@pytest.mark.skipif(
    tuple(int(x) for x in deepspeed.__version__.split(".")[:2]) < (0, 19),
    reason="DeepSpeed before 0.19 reads a fp32 MoE model's optimizer state from the model-states file "
    "(KeyError: 'optimizer' with its own engine too)",
)
def test_moe_expert_files(ds_dist, tmp_path):
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(8, 16)
            self.moe = MoE(hidden_size=16, expert=torch.nn.Linear(16, 16), num_experts=2, ep_size=1, k=1)
            self.out = torch.nn.Linear(16, 1)

        def forward(self, x):
            return self.out(self.moe(torch.tanh(self.inp(x)))[0])

    torch.manual_seed(0)
    net = Net()
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(net.parameters()), "name": "p"})
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(groups, lr=1e-2),
                                      config={"train_batch_size": 4, "steps_per_print": 10**9})
    torchckpt.install(engine)

    def step():
        loss = engine(torch.randn(4, 8)).pow(2).mean()
        engine.backward(loss)
        engine.step()

    step()
    manifest = _restores_params(engine, tmp_path / "ckpt", step)
    assert {"layer_0_expert_0_mp_rank_00_model_states.pt", "expp_rank_0_mp_rank_00_optim_states.pt"} <= set(manifest.files)


def test_universal_checkpoint_conversion_and_load(ds_dist, tmp_path):
    """DeepSpeed's offline converter reads our files; the universal checkpoint it writes (no
    manifest) loads through our engine into an engine with other initial weights."""
    root = tmp_path / "ckpt"
    engine = make_engine(2, seed=0)
    torchckpt.install(engine)
    train(engine, 0, 2)
    info = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}  # as Megatron-DeepSpeed records
    engine.save_checkpoint(str(root), tag="t", client_state=info)
    expected = train(engine, 2, 2)
    convert = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(root / "t"),
         "--output_folder", str(root / "t_universal"), "--num_extract_workers", "1", "--num_merge_workers", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert convert.returncode == 0, convert.stderr[-3000:]
    universal = make_engine(2, seed=1, checkpoint={"load_universal": True})
    torchckpt.install(universal)
    with pytest.warns(torchckpt.UnverifiedLoadWarning, match="t_universal without a manifest"):
        assert universal.load_checkpoint(str(root), tag="t_universal")[0] is not None
    assert train(universal, 2, 2) == expected
