"""TorchCheckpointEngine under a real DeepSpeed engine (CPU, gloo, one rank)."""

import logging
import os
import subprocess
import sys

import pytest
import torch

import torchckpt
from torchckpt import CheckpointStore
from torchckpt.errors import CommitError, CorruptCheckpointError, IncompleteCheckpointError
from torchckpt.layout import MANIFEST_NAME

deepspeed = pytest.importorskip("deepspeed")

from _training import make_engine, params, train  # noqa: E402


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_resume_is_bit_identical(ds_dist, tmp_path, stage):
    root = tmp_path / "ckpt"
    first = make_engine(stage, seed=0)
    ours = torchckpt.install(first, metadata={"run": "test"})
    assert first.checkpoint_engine is ours and isinstance(ours, torchckpt.TorchCheckpointEngine)
    train(first, 0, 3)
    assert first.save_checkpoint(str(root), tag="step3", client_state={"step": 3})
    expected = train(first, 3, 3)
    expected_params = params(first)

    store = CheckpointStore(root)
    manifest = store.manifest("step3")
    assert manifest.metadata == {"run": "test"}
    assert "mp_rank_00_model_states.pt" in manifest.files
    if stage > 0:
        assert any(name.endswith("optim_states.pt") for name in manifest.files)
    assert store.verify("step3").ok
    assert store.latest() == "step3" and (root / "latest").read_text() == "step3"

    resumed = make_engine(stage, seed=1)  # different initial weights: the load must overwrite them
    torchckpt.install(resumed)
    load_path, client_state = resumed.load_checkpoint(str(root))
    assert load_path is not None and client_state["step"] == 3
    assert train(resumed, 3, 3) == expected, "losses after resume must be bit-identical"
    for name, value in params(resumed).items():
        assert torch.equal(value, expected_params[name]), name


def test_load_refuses_incomplete_and_corrupt(ds_dist, tmp_path):
    root = tmp_path / "ckpt"
    engine = make_engine(1, seed=0)
    torchckpt.install(engine)
    train(engine, 0, 1)
    engine.save_checkpoint(str(root), tag="good")
    # A tag written by DeepSpeed's own engine has no manifest: it loads, weights-only, with a warning.
    engine.checkpoint_engine = deepspeed.runtime.checkpoint_engine.TorchCheckpointEngine()
    engine.save_checkpoint(str(root), tag="theirs")
    fresh = make_engine(1, seed=1)
    torchckpt.install(fresh)
    with pytest.warns(torchckpt.UnverifiedLoadWarning, match="theirs without a manifest.*torchckpt adopt"):
        assert fresh.load_checkpoint(str(root), tag="theirs")[0] is not None
    # A tag torchckpt began and never committed (a crash mid-save) stays refused unless allowed.
    CheckpointStore(root).transaction("interrupted").write("mp_rank_00_model_states.pt", {"module": {}})
    with pytest.raises(IncompleteCheckpointError, match="began writing and never committed.*allow_incomplete=True"):
        fresh.load_checkpoint(str(root), tag="interrupted")

    model_file = root / "good" / "mp_rank_00_model_states.pt"
    data = bytearray(model_file.read_bytes())
    data[-100] ^= 0x01
    model_file.write_bytes(bytes(data))
    torchckpt.install(fresh)
    with pytest.raises(CorruptCheckpointError, match="'good' is corrupt: mp_rank_00_model_states.pt: checksum mismatch"):
        fresh.load_checkpoint(str(root), tag="good")
    torchckpt.install(fresh, verify_on_load=False)
    fresh.load_checkpoint(str(root), tag="good")  # the flip is inside tensor data: loads, unverified


def test_torn_latest_after_deepspeed_rewrite_falls_back(ds_dist, tmp_path):
    root = tmp_path / "ckpt"
    engine = make_engine(0, seed=0)
    torchckpt.install(engine)
    engine.save_checkpoint(str(root), tag="a")
    train(engine, 0, 1)
    engine.save_checkpoint(str(root), tag="b")
    (root / "latest").write_text("")  # DeepSpeed's plain rewrite of 'latest', torn by a crash
    with pytest.warns(torchckpt.LatestFallbackWarning, match="is empty.*'b'"):
        assert CheckpointStore(root).latest() == "b"


def test_engine_without_deepspeed_engine_and_bare_tags(tmp_path):
    """Older DeepSpeed versions call create(tag)/commit(tag) with a bare string."""
    engine = torchckpt.TorchCheckpointEngine()
    engine.create("old-style")
    engine.makedirs(str(tmp_path / "old-style"), exist_ok=True)
    engine.save({"w": torch.ones(3)}, str(tmp_path / "old-style" / "model.pt"))
    assert engine.commit("old-style") is True
    assert (tmp_path / "old-style" / MANIFEST_NAME).is_file()
    assert torch.equal(engine.load(str(tmp_path / "old-style" / "model.pt"))["w"], torch.ones(3))
    assert engine.commit("old-style") is True  # a repeated commit (cleanup) is harmless

    with pytest.raises(CommitError, match="without a matching create"):
        torchckpt.TorchCheckpointEngine().commit("nope")
    with pytest.raises(torchckpt.InvalidTagError, match="path separator"):
        torchckpt.TorchCheckpointEngine().create("../evil")
    with pytest.raises(TypeError, match="CheckpointCommitInfo or a tag string, got int"):
        torchckpt.TorchCheckpointEngine().create(5)
    with pytest.raises(ValueError, match="commit_timeout must be positive"):
        torchckpt.TorchCheckpointEngine(commit_timeout=0)


def test_engine_interface_matches_deepspeed():
    base = deepspeed.runtime.checkpoint_engine.checkpoint_engine.CheckpointEngine
    engine = torchckpt.TorchCheckpointEngine()
    assert isinstance(engine, base)
    for name in ("create", "save", "load", "commit", "makedirs", "is_data_parallel_writer", "is_decoupled",
                 "set_commit_info", "get_commit_info", "cleanup", "preserves_storage_sharing"):
        assert callable(getattr(engine, name))
    assert engine.is_data_parallel_writer(0) and not engine.is_data_parallel_writer(1)
    assert not engine.is_decoupled() and engine.preserves_storage_sharing()


def test_logs_through_deepspeed_logger(caplog, tmp_path):
    logger = logging.getLogger("DeepSpeed")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="DeepSpeed"):
            engine = torchckpt.TorchCheckpointEngine()
            engine.create("t")
            engine.save({"a": 1}, str(tmp_path / "t" / "a.pt"))
            engine.commit("t")
    finally:
        logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint t committed" in m for m in messages), messages


def test_import_is_light_and_fast():
    code = (
        "import sys, time; t = time.perf_counter(); import torchckpt; dt = time.perf_counter() - t; "
        "print(dt, 'deepspeed' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    seconds, ds_loaded, torch_loaded = out.stdout.split()
    assert ds_loaded == "False" and torch_loaded == "False"
    assert float(seconds) < 0.5
