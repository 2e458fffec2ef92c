"""torchckpt under the trainers people use: ``enable()``, ``last_committed_checkpoint``, ``LightningCallback``.

The in-process tests drive ``deepspeed.initialize`` directly (the ``ds_dist`` fixture's process
group). The trainer runs (HF ``Trainer`` with ZeRO 1/2/3, Lightning's DeepSpeed strategy) each run
in a process of their own (``_trainer_worker.py``): accelerate's and torch.distributed's state is
process-wide, and a crash in the middle of a save is a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _net import free_port
from _training import make_engine, train

import torchckpt
from torchckpt import CheckpointStore, CorruptCheckpointError, TorchCheckpointEngine

WORKER = Path(__file__).with_name("_trainer_worker.py")
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_the_trainer_names_load_nothing_heavy_until_used():
    code = (
        "import sys, torchckpt; names = {'enable', 'last_committed_checkpoint', 'LightningCallback'}; "
        "assert names <= set(torchckpt.__all__) and names <= set(dir(torchckpt)); "
        "heavy = ('torch', 'deepspeed', 'transformers', 'accelerate', 'lightning'); "
        "print([m for m in heavy if m in sys.modules]); torchckpt.last_committed_checkpoint; "
        "print([m for m in heavy if m in sys.modules], 'torchckpt.deepspeed.hf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.split("\n")[:2] == ["[]", "[] True"]  # reading directories needs no torch, trainer or DeepSpeed


# -- enable() ---------------------------------------------------------------------------------------
@pytest.fixture
def deepspeed_initialize(ds_dist):
    """deepspeed.initialize as it was; every test leaves it so."""
    import deepspeed

    before = deepspeed.initialize
    yield before
    assert deepspeed.initialize is before, "a test left deepspeed.initialize patched"


def test_enable_installs_on_every_new_engine_and_undoes_itself(deepspeed_initialize):
    import deepspeed

    with torchckpt.enable(metadata={"run": "a"}, map_location="cpu") as enabled:
        assert deepspeed.initialize is not deepspeed_initialize
        first, second = make_engine(1, seed=0), make_engine(2, seed=0)
    for engine in (first, second):
        assert isinstance(engine.checkpoint_engine, TorchCheckpointEngine)
        assert engine.checkpoint_engine.options.metadata == (("run", "a"),)
        assert engine.checkpoint_engine.options.map_location == "cpu"
    assert set(map(id, enabled.engines)) == {id(first), id(second)}
    assert deepspeed.initialize is deepspeed_initialize
    assert not isinstance(make_engine(1, seed=0).checkpoint_engine, TorchCheckpointEngine)
    assert "off" in repr(enabled)


def test_enable_is_in_place_before_the_first_load(deepspeed_initialize, tmp_path):
    # What a trainer does: initialize, then load the resume checkpoint at once, before any callback.
    engine = make_engine(1, seed=0)
    torchckpt.install(engine)
    train(engine, 0, 2)
    engine.save_checkpoint(str(tmp_path), tag="step2")
    _flip_byte(tmp_path / "step2" / OPTIM_FILE)

    unprotected = make_engine(1, seed=1)
    unprotected.load_checkpoint(str(tmp_path))  # DeepSpeed's own engine: loaded without a word
    with torchckpt.enable():
        resumed = make_engine(1, seed=1)
        with pytest.raises(CorruptCheckpointError, match=f"{OPTIM_FILE}: checksum mismatch"):
            resumed.load_checkpoint(str(tmp_path))


def test_enable_nested_innermost_options_win(deepspeed_initialize):
    import deepspeed

    outer = torchckpt.enable(metadata={"who": "outer"})
    try:
        with torchckpt.enable(metadata={"who": "inner"}) as inner:
            assert make_engine(1, seed=0).checkpoint_engine.options.metadata == (("who", "inner"),)
        assert len(inner.engines) == 1
        assert make_engine(1, seed=0).checkpoint_engine.options.metadata == (("who", "outer"),)
        assert deepspeed.initialize is not deepspeed_initialize
    finally:
        outer.disable()
        outer.disable()  # idempotent
    assert len(outer.engines) == 1


def test_enable_refuses_bad_options_before_patching_anything(deepspeed_initialize):
    import deepspeed

    with pytest.raises(TypeError, match=r"unknown option\(s\) 'asyncsave'; the options are: .*async_save"):
        torchckpt.enable(asyncsave=True)
    with pytest.raises(ValueError, match="async_save must be True or False"):
        torchckpt.enable(async_save="yes")
    with pytest.raises(ValueError, match="commit_timeout must be positive"):
        torchckpt.enable(commit_timeout=0)
    assert deepspeed.initialize is deepspeed_initialize


def test_leaving_enable_commits_pending_async_saves(deepspeed_initialize, tmp_path):
    with torchckpt.enable(async_save=True):
        engine = make_engine(2, seed=0)
        train(engine, 0, 2)
        engine.save_checkpoint(str(tmp_path), tag="last")  # a trainer's final save: no step follows
        assert CheckpointStore(tmp_path).info("last").status == "writing"
    store = CheckpointStore(tmp_path)
    assert store.info("last").status == "committed"
    assert store.verify("last").ok and store.latest() == "last"
    train(engine, 2, 1)  # DeepSpeed's own commit at the next step finds nothing left to commit
    assert store.latest() == "last"


def test_commit_pending_names_the_tags(deepspeed_initialize, tmp_path):
    enabled = torchckpt.enable(async_save=True)
    try:
        engine = make_engine(1, seed=0)
        train(engine, 0, 1)
        engine.save_checkpoint(str(tmp_path), tag="a")
        assert enabled.commit_pending() == ["a"]
        assert enabled.commit_pending() == []
    finally:
        enabled.disable()


def test_disable_leaves_a_wrapper_added_on_top_of_ours(deepspeed_initialize):
    import deepspeed

    enabled = torchckpt.enable()
    ours = deepspeed.initialize
    calls = []

    def theirs(*a, **kw):
        calls.append(1)
        return ours(*a, **kw)

    deepspeed.initialize = theirs
    try:
        enabled.disable()
        assert deepspeed.initialize is theirs  # not torn out from under the other wrapper
        assert not isinstance(make_engine(1, seed=0).checkpoint_engine, TorchCheckpointEngine)  # ours passes through
        with torchckpt.enable():
            assert deepspeed.initialize is theirs
            assert isinstance(make_engine(1, seed=0).checkpoint_engine, TorchCheckpointEngine)
        assert len(calls) == 2
    finally:
        deepspeed.initialize = deepspeed_initialize
        import torchckpt.deepspeed.enable as module

        module._original = module._wrapper = None


def test_lightning_callback_checks_options_and_strategy():
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    with pytest.raises(TypeError, match="unknown option"):
        torchckpt.LightningCallback(asyncsave=True)
    callback = torchckpt.LightningCallback(async_save=True)
    trainer = SimpleNamespace(strategy=SimpleNamespace())  # e.g. DDPStrategy: no deepspeed_engine
    with pytest.raises(TypeError, match=r"needs Lightning's DeepSpeed strategy, not SimpleNamespace; use Trainer\(strategy="):
        callback.on_fit_start(trainer, None)


def test_lightning_callback_without_lightning_is_one_line_naming_the_install():
    code = (
        "import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
        "import torchckpt\n"
        "try:\n    torchckpt.LightningCallback\n"
        "except torchckpt.TorchckptError as e:\n    print(type(e).__name__, e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout.strip() == (
        "MissingExtraError torchckpt.LightningCallback needs lightning, which is not installed here: "
        "pip install 'torchckpt[trainers]'"
    ), proc.stdout + proc.stderr


# -- last_committed_checkpoint -------------------------------------------------------------------------
def _trainer_checkpoint(out: Path, step: int, *, tag: str = "committed", state: str | None = "{}", latest: bool = True):
    """A checkpoint-N as HF Trainer + torchckpt leave it: a DeepSpeed tag, `latest`, trainer_state.json.

    ``tag``: "committed"; "killed" (files, no manifest: the saver died); "writing" (the transaction
    returned is still open, as in a save in progress)."""
    path = out / f"checkpoint-{step}"
    tx = CheckpointStore(path).transaction(f"global_step{step}")
    tx.write("mp_rank_00_model_states.pt", {"w": torch.full((4,), float(step))})
    if tag == "committed":
        tx.commit(save_latest=latest)
    elif tag == "killed":
        tx.abort()  # releases the writing lock as the death of the process does; the files stay
    if tag != "committed" and latest:
        (path / "latest").write_text(f"global_step{step}")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path, tx


def _quiet_pick(out, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picked = torchckpt.last_committed_checkpoint(out, **kw)
    return picked, [str(w.message) for w in caught]


def test_last_committed_checkpoint_takes_the_newest_by_step(tmp_path):
    for step in (2, 9, 10):
        _trainer_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-11").write_text("a file, not a checkpoint")
    (tmp_path / "runs").mkdir()
    picked, said = _quiet_pick(tmp_path)
    assert picked == str(tmp_path / "checkpoint-10") and said == []
    if _has("transformers"):
        from transformers.trainer_utils import get_last_checkpoint

        assert get_last_checkpoint(str(tmp_path)) == picked  # the same choice when all are complete


def test_last_committed_checkpoint_of_a_first_run_is_none(tmp_path):
    assert _quiet_pick(tmp_path / "not-yet") == (None, [])
    assert _quiet_pick(tmp_path) == (None, [])


def test_last_committed_checkpoint_skips_what_a_resume_cannot_load(tmp_path):
    _trainer_checkpoint(tmp_path, 2)
    _, tx = _trainer_checkpoint(tmp_path, 4, tag="writing")  # an async save, not committed yet
    picked, said = _quiet_pick(tmp_path)
    assert picked == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4: DeepSpeed tag 'global_step4' is still being written" in said[0]
    tx.abort()

    _trainer_checkpoint(tmp_path, 6, tag="killed", latest=False)  # killed mid-save: no manifest, no latest
    _trainer_checkpoint(tmp_path, 8, state=None)  # killed after DeepSpeed's save, before the Trainer's
    _trainer_checkpoint(tmp_path, 10, state='{"global_step": 1')  # torn trainer_state.json
    path12, _ = _trainer_checkpoint(tmp_path, 12)
    (path12 / "latest").write_text("global_step99")
    path14, _ = _trainer_checkpoint(tmp_path, 14)
    (path14 / "latest").write_text("../escape")
    (tmp_path / "checkpoint-16").mkdir()  # save_only_model: no DeepSpeed checkpoint at all
    (tmp_path / "checkpoint-18" / "global_step18").mkdir(parents=True)
    (tmp_path / "checkpoint-18" / "latest").write_text("global_step18")
    picked, said = _quiet_pick(tmp_path)
    assert picked == str(tmp_path / "checkpoint-2")
    (message,) = said
    assert message.startswith(f"resuming from {tmp_path / 'checkpoint-2'} and not a newer checkpoint: checkpoint-18:")
    for expected in (
        "checkpoint-18: DeepSpeed tag 'global_step18' holds no DeepSpeed checkpoint files",
        "checkpoint-16: no DeepSpeed checkpoint in it",
        "checkpoint-14: its `latest` holds '../escape', not a tag name",
        "checkpoint-12: its `latest` names 'global_step99', which is not there",
        "checkpoint-10: its trainer_state.json is unreadable",
        "checkpoint-8: the Trainer did not finish it (no trainer_state.json)",
        "checkpoint-6: its DeepSpeed save did not finish (no `latest`; global_step6: incomplete)",
        "checkpoint-4: DeepSpeed tag 'global_step4' was never committed (the save was interrupted)",
    ):
        assert expected in message


def test_last_committed_checkpoint_none_qualifies(tmp_path):
    _trainer_checkpoint(tmp_path, 2, tag="killed")
    picked, said = _quiet_pick(tmp_path)
    assert picked is None
    expected = (
        f"no checkpoint in {tmp_path} can be resumed, starting from scratch: "
        "checkpoint-2: DeepSpeed tag 'global_step2' was never committed (the save was interrupted)"
    )
    assert said == [expected]


def test_last_committed_checkpoint_deepspeed_written_tags(tmp_path):
    # Written by DeepSpeed's own engine before torchckpt was enabled: no manifest, nothing of ours.
    _trainer_checkpoint(tmp_path, 2)
    path = tmp_path / "checkpoint-4"
    (path / "global_step4").mkdir(parents=True)
    torch.save({"w": torch.zeros(4)}, path / "global_step4" / "mp_rank_00_model_states.pt")
    (path / "latest").write_text("global_step4")
    (path / "trainer_state.json").write_text("{}")
    picked, said = _quiet_pick(tmp_path)
    assert picked == str(path)
    assert said == [f"resuming from {path}: DeepSpeed tag 'global_step4' was written without torchckpt (no manifest): not verified"]
    picked, said = _quiet_pick(tmp_path, verify=True)
    assert picked == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4: DeepSpeed tag 'global_step4' was written without torchckpt and cannot be verified" in said[0]


def test_last_committed_checkpoint_verify_skips_a_corrupt_tag(tmp_path):
    _trainer_checkpoint(tmp_path, 2)
    path, _ = _trainer_checkpoint(tmp_path, 4)
    _flip_byte(path / "global_step4" / "mp_rank_00_model_states.pt")
    assert _quiet_pick(tmp_path) == (str(path), [])  # committed: the load will refuse it, naming the file
    picked, said = _quiet_pick(tmp_path, verify=True)
    assert picked == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4: DeepSpeed tag 'global_step4' fails verification (mp_rank_00_model_states.pt: checksum" in said[0]


# -- real trainers, each run in a process of its own ---------------------------------------------------
def _run(tmp_path: Path, *runs: dict, expect_kill: bool = False) -> list[dict]:
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port(range(29850, 29900))),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(Path(torchckpt.__file__).parents[1]), env.get("PYTHONPATH", "")]),
    )
    result = tmp_path / f"result-{len(list(tmp_path.glob('result-*')))}.json"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(result), *map(json.dumps, runs)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-3000:]
        return []
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())


def _weights_equal(a: Path, b: Path) -> bool:
    wa, wb = torch.load(a), torch.load(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _hf(out: Path, stage: int, **spec) -> dict:
    return {"kind": "hf", "out": str(out), "stage": stage, "max_steps": 8, "save_steps": 2, **spec}


@pytest.mark.parametrize(
    "stage", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)]
)
def test_hf_trainer_killed_mid_save_resumes_from_the_last_committed_checkpoint(tmp_path, stage):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers.trainer_utils import get_last_checkpoint

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    _run(tmp_path, _hf(killed, stage, kill={"tag": "global_step6", "files": 1}), expect_kill=True)
    assert get_last_checkpoint(str(killed)) == str(killed / "checkpoint-6")  # what resume_from_checkpoint=True takes
    with pytest.warns(UserWarning, match="checkpoint-6: its DeepSpeed save did not finish"):
        assert torchckpt.last_committed_checkpoint(killed, verify=True) == str(killed / "checkpoint-4")

    reference, resumed, corrupt = _run(
        tmp_path,
        _hf(whole, stage, weights=str(tmp_path / "whole.pt")),
        _hf(killed, stage, resume="committed", weights=str(tmp_path / "resumed.pt")),
        _hf(whole, stage, max_steps=10, resume="committed", flip=str(whole / "checkpoint-8" / "global_step8" / OPTIM_FILE)),
    )
    assert reference["engine"] == "torchckpt.TorchCheckpointEngine" and reference["installed"] == ["DeepSpeedEngine"]
    for step in (2, 4, 6, 8):  # (checkpoint-8 was corrupted on purpose since)
        store = CheckpointStore(whole / f"checkpoint-{step}")
        assert store.latest() == f"global_step{step}" and (step == 8 or store.verify(f"global_step{step}").ok)
    # the resume: from checkpoint-4, saying why not checkpoint-6; bit-identical to the uninterrupted run
    assert resumed["resumed_from"] == str(killed / "checkpoint-4")
    assert "checkpoint-6: its DeepSpeed save did not finish" in resumed["warnings"][0]
    assert resumed["global_step"] == 8
    assert _weights_equal(tmp_path / "whole.pt", tmp_path / "resumed.pt")
    assert CheckpointStore(killed / "checkpoint-6").info("global_step6").status == "committed"  # saved again
    # a flipped byte in the newest checkpoint: refused on resume, naming the file
    assert corrupt["resumed_from"] == str(whole / "checkpoint-8")
    assert corrupt["error"]["type"] == "CorruptCheckpointError"
    assert f"{OPTIM_FILE}: checksum mismatch" in corrupt["error"]["message"]


def test_hf_trainer_async_save_commits_its_last_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = tmp_path / "out"
    scoped, plain = _run(
        tmp_path,
        _hf(tmp_path / "scoped", 2, max_steps=4, options={"async_save": True}),  # `with torchckpt.enable(...)`
        _hf(out, 2, max_steps=6, options={"async_save": True}, enable="plain"),  # on until the process exits
    )
    # as a context manager: committed when the block is left, in the same process
    assert scoped["global_step"] == 4 and scoped["last_status_after_train"] == "committed"
    # enabled for the process: train() returned with checkpoint-6 pending (DeepSpeed commits at a next
    # step that never comes); the normal exit committed it.
    assert plain["global_step"] == 6 and plain["last_status_after_train"] in ("writing", "committed")
    for step in (2, 4, 6):
        store = CheckpointStore(out / f"checkpoint-{step}")
        assert store.info(f"global_step{step}").status == "committed" and store.verify(f"global_step{step}").ok
    assert torchckpt.last_committed_checkpoint(out) == str(out / "checkpoint-6")


@pytest.mark.slow
def test_hf_trainer_killed_after_an_async_save_resumes_from_the_committed_one(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers.trainer_utils import get_last_checkpoint

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    asynchronous = {"async_save": True}
    _run(tmp_path, _hf(killed, 2, max_steps=6, options=asynchronous, kill_on_save=4), expect_kill=True)
    # the Trainer finished checkpoint-4 (trainer_state.json is there); DeepSpeed had not committed its tag
    assert (killed / "checkpoint-4" / "trainer_state.json").is_file()
    assert get_last_checkpoint(str(killed)) == str(killed / "checkpoint-4")
    with pytest.warns(UserWarning, match=r"checkpoint-4: its DeepSpeed save did not finish \(no `latest`; global_step4: incomplete\)"):
        assert torchckpt.last_committed_checkpoint(killed) == str(killed / "checkpoint-2")
    _, resumed = _run(
        tmp_path,
        _hf(whole, 2, max_steps=6, options=asynchronous, weights=str(tmp_path / "whole.pt")),
        _hf(killed, 2, max_steps=6, options=asynchronous, resume="committed", weights=str(tmp_path / "resumed.pt")),
    )
    assert resumed["resumed_from"] == str(killed / "checkpoint-2") and resumed["global_step"] == 6
    assert _weights_equal(tmp_path / "whole.pt", tmp_path / "resumed.pt")


@pytest.mark.slow
def test_an_accelerate_loop_saves_and_resumes_through_torchckpt(tmp_path):
    pytest.importorskip("accelerate")
    state = tmp_path / "state"
    (whole,) = _run(tmp_path, {"kind": "accelerate", "out": str(state), "weights": str(tmp_path / "whole.pt")})
    assert whole["engine"] == "torchckpt.TorchCheckpointEngine"
    store = CheckpointStore(state)  # accelerator.save_state: DeepSpeed's tag "pytorch_model"
    assert store.latest() == "pytorch_model" and store.verify("pytorch_model").ok
    # a second Accelerator cannot take a DeepSpeed plugin in the same process: resume in another one
    (resumed,) = _run(tmp_path, {"kind": "accelerate", "resume": str(state), "weights": str(tmp_path / "resumed.pt")})
    assert "error" not in resumed and _weights_equal(tmp_path / "whole.pt", tmp_path / "resumed.pt")
    _flip_byte(state / "pytorch_model" / OPTIM_FILE)
    (corrupt,) = _run(tmp_path, {"kind": "accelerate", "resume": str(state)})
    assert corrupt["error"]["type"] == "CorruptCheckpointError"


def _lightning(out: Path, **spec) -> dict:
    return {"kind": "lightning", "out": str(out), "max_steps": 8, "save_steps": 4, **spec}


def test_lightning_deepspeed_zero2_saves_and_resumes_through_torchckpt(tmp_path):
    pytest.importorskip("lightning")
    first, again = tmp_path / "first", tmp_path / "again"
    step4, step8 = first / "epoch=0-step=4.ckpt", first / "epoch=1-step=8.ckpt"
    whole, resumed, corrupt = _run(
        tmp_path,
        _lightning(first, weights=str(tmp_path / "whole.pt")),
        _lightning(again, resume=str(step4), weights=str(tmp_path / "resumed.pt")),
        _lightning(tmp_path / "third", via="enable", max_steps=12, resume=str(step8), flip=str(step8 / "checkpoint" / OPTIM_FILE)),
    )
    assert whole["engine"] == "torchckpt.TorchCheckpointEngine"
    assert whole["checkpoints"] == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    for name in whole["checkpoints"]:
        store = CheckpointStore(first / name)
        assert store.latest() == "checkpoint" and (name == step8.name or store.verify("checkpoint").ok)
        assert OPTIM_FILE in store.manifest("checkpoint").files  # ZeRO-2's optimizer partition
    assert resumed["global_step"] == 8
    assert _weights_equal(tmp_path / "whole.pt", tmp_path / "resumed.pt")
    # torchckpt.enable() works for Lightning too: the restore is verified
    assert corrupt["error"]["type"] == "CorruptCheckpointError"
    assert f"{OPTIM_FILE}: checksum mismatch" in corrupt["error"]["message"]
