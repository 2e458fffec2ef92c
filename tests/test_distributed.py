"""Many ranks: the commit coordinator, and DeepSpeed ZeRO jobs on two gloo ranks (127.0.0.1).

The coordinator and the transaction are tested in one process, one thread per rank over an
in-memory store. The DeepSpeed jobs run two real processes (tests/_dist_worker.py, launched
directly with torchrun's environment, or by torchrun itself); each job checks several things,
since starting DeepSpeed costs seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _net import free_port

from torchckpt import CheckpointStore
from torchckpt._distributed import TorchDistributedCoordinator, _host_id, _start_time
from torchckpt.errors import CommitError
from torchckpt.layout import MANIFEST_NAME

WORKER = Path(__file__).with_name("_dist_worker.py")
PORTS = range(29750, 29800)
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


# -- one process, one thread per rank -----------------------------------------------------------
def on_ranks(world_size: int, fn, *, timeout: float = 30.0) -> list:
    """Run ``fn(rank)`` on one thread per rank; return each rank's result or raised exception."""
    results: list = [None] * world_size

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except Exception as e:  # noqa: BLE001 - returned to the test
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rank is still waiting: the coordinator hung"
    return results


def coordinators(world_size: int, *, timeout: float, key: str):
    store = dist.HashStore()
    return [TorchDistributedCoordinator(timeout=timeout, store=store, rank=r, world_size=world_size, key=key)
            for r in range(world_size)]


def test_every_rank_gets_every_ranks_outcome():
    cos = coordinators(3, timeout=5, key="outcomes")
    errors = [None, "disk full on rank 1", None]
    results = on_ranks(3, lambda r: cos[r].gather_errors(errors[r], step="write"))
    assert results == [errors] * 3
    # The next step of the same commit starts clean.
    assert on_ranks(3, lambda r: cos[r].gather_errors(None, step="commit")) == [[None] * 3] * 3


def test_a_rank_that_never_arrives_is_named_at_the_deadline():
    cos = coordinators(3, timeout=0.4, key="late")
    start = time.monotonic()
    results = on_ranks(2, lambda r: cos[r].gather_errors(None, step="write"))  # rank 2 never comes
    assert time.monotonic() - start < 5
    for errors in results:
        assert errors[:2] == [None, None]
        assert errors[2].startswith("did not reach commit step 'write' within 0.4s")
        assert "raise commit_timeout" in errors[2]


def test_without_rank_0_the_others_give_up_after_the_grace_period():
    cos = coordinators(2, timeout=0.2, key="no-rank-0")
    start = time.monotonic()
    errors = cos[1].gather_errors(None, step="commit")
    waited = time.monotonic() - start
    assert 2.0 <= waited < 5, waited  # timeout + grace (at least 2 s), never forever
    assert errors[1] is None
    assert errors[0].startswith("did not reach commit step 'commit' within 0.2s")


def test_a_dead_rank_on_this_host_is_seen_before_the_deadline():
    store = dist.HashStore()
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # Rank 1 publishes its liveness record as every coordinator does, then its process dies.
        record = {"host": _host_id(), "pid": gone.pid, "start": _start_time(gone.pid)}
        store.set("torchckpt/0/proc/r1", json.dumps(record).encode())
        rank0 = TorchDistributedCoordinator(timeout=60, store=store, rank=0, world_size=2, key="dead")
        gone.send_signal(signal.SIGKILL)  # not reaped yet: a zombie counts as dead
        start = time.monotonic()
        errors = rank0.gather_errors(None, step="write")
        assert time.monotonic() - start < 5
    finally:
        gone.kill()
        gone.wait()
    assert errors[0] is None
    assert errors[1] == f"died (its process, pid {gone.pid} on this host, is gone) before reaching commit step 'write'"


def test_losing_the_store_is_this_ranks_error_not_a_hang():
    class DyingStore:
        """A store whose host dies after the coordinator was set up."""

        def __init__(self):
            self.data, self.dead = {}, False

        def set(self, key, value):
            if self.dead:
                raise dist.DistNetworkError("Connection reset by peer")
            self.data[key] = value

        def check(self, keys):
            if self.dead:
                raise dist.DistNetworkError("Connection reset by peer")
            return all(k in self.data for k in keys)

    store = DyingStore()
    co = TorchDistributedCoordinator(timeout=5, store=store, rank=1, world_size=2, key="lost")
    store.dead = True
    errors = co.gather_errors(None, step="write")
    assert errors[0] is None
    assert errors[1].startswith("lost contact with the other ranks at commit step 'write'")
    assert "Connection reset by peer" in errors[1] and "probably died" in errors[1]


def test_coordinator_refuses_bad_arguments():
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, got 0"):
        TorchDistributedCoordinator(timeout=0, store=dist.HashStore(), rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        TorchDistributedCoordinator(store=dist.HashStore(), rank=2, world_size=2)


def test_map_location_placeholders_are_this_ranks(monkeypatch):
    from torchckpt.deepspeed.engine import TorchCheckpointEngine, _for_this_rank

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _for_this_rank("cuda:{local_rank}") == "cuda:3"
    assert _for_this_rank("cpu") == "cpu" and _for_this_rank(None) is None
    with pytest.raises(ValueError, match=r"map_location 'cuda:\{gpu\}' may use only \{local_rank\} and \{rank\}"):
        TorchCheckpointEngine(map_location="cuda:{gpu}")


# -- the transaction on two ranks (threads) ----------------------------------------------------
def two_rank_commit(root: Path, tag: str, files: list[dict[str, object]], *, timeout: float = 10.0):
    """Rank r writes ``files[r]`` (relpath -> object) into ``tag`` and commits; returns the outcomes."""
    cos = coordinators(2, timeout=timeout, key=f"tx-{tag}")
    store = CheckpointStore(root)

    def rank(r: int):
        tx = store.transaction(tag, coordinator=cos[r])
        for relpath, obj in files[r].items():
            tx.write(relpath, obj)
        return tx.commit(metadata={"step": 1})

    return on_ranks(2, rank)


def test_manifest_records_world_size_and_the_rank_of_every_file(root):
    results = two_rank_commit(root, "t1", [{"model.pt": torch.ones(2)}, {"optim-1.pt": torch.zeros(3)}])
    assert not any(isinstance(r, Exception) for r in results), results
    manifest = CheckpointStore(root).manifest("t1")
    assert manifest.world_size == 2 and manifest.metadata == {"step": 1}
    assert {p: rec.rank for p, rec in manifest.files.items()} == {"model.pt": 0, "optim-1.pt": 1}
    assert CheckpointStore(root).verify("t1").ok and CheckpointStore(root).latest() == "t1"
    assert not list((root / "t1").glob(".torchckpt-rank-*")), "rank parts are removed once merged"


def test_a_failed_write_on_rank_1_fails_the_commit_on_both_ranks(root):
    two_rank_commit(root, "good", [{"a.pt": torch.ones(1)}, {"b.pt": torch.ones(1)}])
    (root / "bad" / "b.pt").mkdir(parents=True)  # a directory stands where rank 1's file goes
    results = two_rank_commit(root, "bad", [{"a.pt": torch.ones(1)}, {"b.pt": torch.ones(1)}])
    for r in results:
        assert isinstance(r, CommitError), r
        assert str(r).startswith("checkpoint 'bad' not committed: rank 1: writing ")
        assert "bad/b.pt failed: Is a directory" in str(r)
        # the same, as data: the rank that failed and why, and the step of the commit that found it
        assert set(r.failures) == {1} and "Is a directory" in r.failures[1] and r.step == "write", vars(r)
    store = CheckpointStore(root)
    assert not (root / "bad" / MANIFEST_NAME).exists()
    assert store.latest() == "good" and store.verify("good").ok


def test_one_file_written_differently_by_two_ranks_is_refused(root):
    results = two_rank_commit(root, "dup", [{"same.pt": torch.ones(2)}, {"same.pt": torch.zeros(2)}])
    for r in results:
        assert isinstance(r, CommitError), r
        assert "same.pt was written by rank 0 and by rank 1 with different contents" in str(r)
    assert not (root / "dup" / MANIFEST_NAME).exists()


# -- DeepSpeed on two processes ------------------------------------------------------------------
def run_job(tmp_path: Path, scenario: str, *, torchrun: bool = False, timeout: float = 150, **options) -> dict:
    """Run a two-rank job of tests/_dist_worker.py; return {"ranks": {r: findings}, "codes": [...]}."""
    out = tmp_path / f"job-{scenario}"
    out.mkdir()
    job = {"scenario": scenario, "root": str(tmp_path / "ckpt"), "out": str(out), "stage": 1,
           "async_save": False, "commit_timeout": 30.0, **options}
    (out / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port(PORTS)), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["DS_ACCELERATOR"] = "cpu"  # gloo ranks train on the CPU, GPU or not
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
               "--master-addr=127.0.0.1", f"--master-port={env['MASTER_PORT']}", "--max-restarts=0",
               str(WORKER), str(out / "job.json")]
        launches = [(cmd, env, out / "torchrun.log")]
    else:
        launches = [([sys.executable, str(WORKER), str(out / "job.json")],
                     {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}, out / f"rank{r}.log")
                    for r in range(2)]
    procs = []
    for cmd, penv, log in launches:
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(cmd, env=penv, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"the {scenario} job ran over {timeout}s\n{logs(out)}")
    ranks = {}
    for r in range(2):
        path = out / f"rank{r}.json"
        if path.exists():
            ranks[r] = json.loads(path.read_text())
            assert "crash" not in ranks[r], f"rank {r} crashed:\n{ranks[r]['crash']}\n{logs(out)}"
    return {"ranks": ranks, "codes": codes, "logs": lambda: logs(out), "root": tmp_path / "ckpt"}


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name} (tail)\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(out.glob("*.log")))


def check_resume(job: dict, *, committed_at_once: bool, stage: int) -> dict:
    ranks = job["ranks"]
    assert job["codes"] == [0] * len(job["codes"]) and set(ranks) == {0, 1}, job["logs"]()
    for r, found in ranks.items():
        assert found["loaded"], r
        assert found["losses_identical"], f"rank {r}: losses after resume differ"
        assert found["params_differing"] == [], f"rank {r}: parameters after resume differ"
        assert found["committed_before_next_step"] is committed_at_once
        assert found["committed_after_next_step"]
        # DeepSpeed's data-parallel writer rule: one model-states file, except ZeRO-3's shards.
        assert found["writes_model_states"] is (r == 0 or stage == 3)
        assert found["cpu_devices"] == ["cpu"]
        template = found["template_devices"]
        if torch.cuda.is_available() and torch.cuda.device_count() > r:
            assert template == [f"cuda:{r}"]
        else:  # this rank's device, named in the error: cuda:R is not there
            assert re.search(rf"map_location='cuda:{r}'|CUDA device {r}\b", template), template
        # A write that failed on rank 1 fails the commit on both ranks, naming rank 1 and the file.
        error = found["broken_error"]
        assert error.startswith("CommitError: checkpoint 'broken' not committed: rank 1: writing "), error
        assert "broken/zero_pp_rank_1_mp_rank_00_optim_states.pt failed: Is a directory" in error
        assert "rank 0:" not in error
        assert not found["broken_committed"] and found["step3_ok_after_broken"]
        assert found["latest_after_broken"] == "step3"
        assert found["after_committed"], "a save after a failed one must commit"
    rank0 = ranks[0]
    assert rank0["world_size"] == 2 and rank0["verify_problems"] == []
    return rank0


@pytest.mark.distributed
def test_zero1_two_ranks_resume_bit_identical_and_fail_together(tmp_path):
    job = run_job(tmp_path, "resume", stage=1)
    rank0 = check_resume(job, committed_at_once=True, stage=1)
    assert rank0["file_ranks"] == {
        "mp_rank_00_model_states.pt": 0,
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
    }
    assert "0.weight" in rank0["saved_module_keys"]  # frozen parameters saved unless excluded


@pytest.mark.distributed
def test_zero2_async_under_torchrun_with_frozen_parameters_excluded(tmp_path):
    job = run_job(tmp_path, "resume", torchrun=True, stage=2, async_save=True, exclude_frozen=True)
    rank0 = check_resume(job, committed_at_once=False, stage=2)  # async: DeepSpeed commits at the next step
    assert rank0["file_ranks"] == {
        "mp_rank_00_model_states.pt": 0,
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
    }
    assert rank0["saved_module_keys"] == ["2.bias", "2.weight", "4.bias", "4.weight"]


@pytest.mark.distributed
def test_zero3_on_cpu_two_ranks_resume_bit_identical(tmp_path):
    job = run_job(tmp_path, "resume", stage=3)
    rank0 = check_resume(job, committed_at_once=True, stage=3)
    assert rank0["file_ranks"] == {
        "zero_pp_rank_0_mp_rank_00_model_states.pt": 0,
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
        "zero_pp_rank_1_mp_rank_00_model_states.pt": 1,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1,
    }


@pytest.mark.distributed
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_rank_killed_mid_write_leaves_no_commit_and_the_previous_tag_intact(tmp_path, async_save):
    victim = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    job = run_job(tmp_path, "kill", stage=1, async_save=async_save, commit_timeout=30.0, kill_file=victim)
    assert job["codes"][1] == -signal.SIGKILL and 1 not in job["ranks"], job["logs"]()
    assert job["codes"][0] == 0, job["logs"]()
    rank0 = job["ranks"][0]
    error = rank0["torn_error"]
    ours = "CommitError: checkpoint 'torn' not committed: rank 1: died (its process, pid "
    lost_peer = error is not None and ("Connection reset by peer" in error or "Connection closed by peer" in error)
    if async_save and lost_peer:
        # The background write died while DeepSpeed still had a barrier to pass (at the end of
        # save_checkpoint): gloo reports the lost peer there, before our commit is reached.
        assert error.startswith("RuntimeError: "), error
    else:
        assert error is not None and error.startswith(ours), error
        assert "on this host, is gone) before reaching commit step 'start'" in error
    assert rank0["seconds_to_fail"] < 30, "a dead rank on this host is seen well before the timeout"

    root = job["root"]
    store = CheckpointStore(root)
    assert not (root / "torn" / MANIFEST_NAME).exists()
    assert any(p.name.startswith(f".{victim}.tmp-") for p in (root / "torn").iterdir()), "no torn write left"
    assert store.latest() == "good" and (root / "latest").read_text() == "good"
    assert store.verify("good").ok
    status = {i.tag: i.status for i in store.list()}
    assert status == {"good": "committed", "torn": "incomplete"}
    assert store.gc(dry_run=True).incomplete == ["torn"]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 3])
def test_what_deepspeeds_own_engine_accepts_on_two_ranks(tmp_path, stage):
    job = run_job(tmp_path, "dropin", stage=stage, commit_timeout=30.0)
    assert job["codes"] == [0, 0], job["logs"]()
    for rank, seen in job["ranks"].items():
        # save_16bit_model: rank 0 writes SAVE_DIR/pytorch_model.bin, outside any tag; nobody waits.
        assert seen["export_error"] is None, (rank, seen["export_error"])
        assert seen["export_dir"] == ["pytorch_model.bin"], seen["export_dir"]
        assert seen["export_keys"] == [f"{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight")]
        assert seen["export_error_seconds"] < 20
        # ZeRO-0: rank 1 saves nothing into the tag and still takes part in the commit.
        assert seen["save_error"] is None and seen["both_verified"], seen
        assert seen["both_ranks"] == ([0] if stage == 0 else [0, 1])
        # Different tags per rank (tag_validation "Warn"): as DeepSpeed's engine, no error; each
        # rank's files are in its own tag, neither is committed, `latest` stays on a whole checkpoint.
        assert seen["disagree_error"] is None, seen["disagree_error"]
        assert seen["disagree_status"] == {"both": "committed", "tag-0": "incomplete", "tag-1": "incomplete"}
        assert seen["latest_after_disagree"] == "both"
        # rank 0's export fails: both ranks know at once (not after commit_timeout=30 s).
        assert seen["blocked_error_seconds"] < 15, seen["blocked_error_seconds"]
        assert seen["after_error"] is None and seen["after_verified"], seen
    rank0, rank1 = job["ranks"][0], job["ranks"][1]
    assert rank0["blocked_error"].startswith("WriteError: ") and "pytorch_model.bin" in rank0["blocked_error"]
    assert rank1["blocked_error"].startswith("CommitError: checkpoint 'global_step2' not committed: rank 0: ")
    assert "pytorch_model.bin" in rank1["blocked_error"] and "Is a directory" in rank1["blocked_error"]


@pytest.mark.gpu
@pytest.mark.distributed
def test_map_location_per_rank_on_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    job = run_job(tmp_path, "resume", stage=1)
    check_resume(job, committed_at_once=True, stage=1)  # asserts template_devices == ["cuda:RANK"]
