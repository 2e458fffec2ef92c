"""One rank of the two-rank DeepSpeed jobs of tests/test_distributed.py (gloo on 127.0.0.1).

``python tests/_dist_worker.py JOB.json`` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set by the launcher (the test itself, or torchrun). JOB.json holds the scenario
and its options; each rank writes what it observed to ``{out}/rank{RANK}.json`` and the test
asserts on that, so a failure shows every rank's view. Starting DeepSpeed costs seconds, so one
job checks several things in a row:

``resume``
    train, save, train on (the reference); a fresh engine with other initial weights loads
    the checkpoint and trains on: losses and parameters must be bit-identical. Then the
    manifest's ranks, per-rank ``map_location``, and a save whose write fails on rank 1 (a
    directory stands where its file goes): the commit must fail on both ranks, and a later
    save must still commit. ``async_save`` runs the same through DeepSpeed's deferred commit.
``kill``
    save a good tag, then rank 1 SIGKILLs itself in the middle of writing its file of the next
    tag (in the background writer with ``async_save``); rank 0 reports how its save failed and
    how long that took.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import _training  # tests/ is on sys.path: this file runs as a script from it
import torch

RANK = int(os.environ["RANK"])
MANIFEST = "torchckpt-manifest.json"


def quiet_deepspeed():
    import deepspeed.ops

    # DeepSpeed's shared-memory all-reduce op speeds up CPU collectives and has nothing to do
    # with checkpoints; building it is a 30-50 s C++ compile on a fresh machine. Go without it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def make_engine(stage: int, seed: int, **extra):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )
    # A frozen first layer (a "pretrained base"): the same weights whatever the seed, since an
    # exclude_frozen_parameters checkpoint does not hold them.
    frozen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(model[0].weight.shape, generator=frozen))
        model[0].bias.copy_(torch.randn(model[0].bias.shape, generator=frozen))
    model[0].requires_grad_(False)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}},
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
        "steps_per_print": 10**9,
        **extra,
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=trainable)
    return engine


def batch(step: int):
    g = torch.Generator().manual_seed(1000 * (RANK + 1) + step)
    return torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)


def train(engine, start: int, steps: int) -> list[float]:
    return _training.train(engine, start, steps, batch_of=batch)  # this rank's own batches


def full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter in full (ZeRO-3 holds only a shard of each on a rank)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().clone() for k, v in params.items()}


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def save_failing(engine, root: Path, tag: str, job: dict, out: dict, key: str) -> None:
    """Save ``tag`` with a directory standing where rank 1's optimizer file goes."""
    import torch.distributed as dist

    if RANK == 1:
        (root / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").mkdir(parents=True)
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag)
        if job["async_save"]:
            train(engine, 100, 1)  # DeepSpeed commits a deferred save at the next step
        out[key] = None
    except Exception as e:  # noqa: BLE001 - the test asserts on the message
        out[key] = error_text(e)


def resume(job: dict, out: dict) -> None:
    import torch.distributed as dist

    import torchckpt
    from torchckpt import CheckpointStore

    root = Path(job["root"])
    stage, options = job["stage"], {"async_save": job["async_save"], "commit_timeout": job["commit_timeout"]}
    exclude = job.get("exclude_frozen", False)

    first = make_engine(stage, seed=0)
    first.save_non_zero_checkpoint = True  # as DeepSpeed's fast writer leaves it: every rank writes
    ours = torchckpt.install(first, **options)  # ... and install() chooses again
    out["writes_model_states"] = bool(first.save_non_zero_checkpoint)
    train(first, 0, 3)
    first.save_checkpoint(str(root), tag="step3", client_state={"step": 3}, exclude_frozen_parameters=exclude)
    out["committed_before_next_step"] = (root / "step3" / MANIFEST).exists()
    expected = train(first, 3, 4)  # with async_save, the first of these steps commits
    expected_params = full_params(first)
    out["committed_after_next_step"] = (root / "step3" / MANIFEST).exists()
    dist.barrier()

    resumed = make_engine(stage, seed=1)  # other initial weights: the load must overwrite them
    torchckpt.install(resumed, **options)
    load_path, client_state = resumed.load_checkpoint(str(root), load_module_strict=not exclude)
    out["loaded"] = load_path is not None and client_state.get("step") == 3
    out["losses_identical"] = train(resumed, 3, 4) == expected
    params = full_params(resumed)
    out["params_differing"] = sorted(k for k in expected_params if not torch.equal(params[k], expected_params[k]))

    store = CheckpointStore(root)
    if RANK == 0:
        manifest = store.manifest("step3")
        out["world_size"] = manifest.world_size
        out["file_ranks"] = {path: rec.rank for path, rec in manifest.files.items()}
        out["verify_problems"] = store.verify("step3").problems
        model_states = next(p for p in manifest.files if p.endswith("model_states.pt"))
        module = ours.load(str(root / "step3" / model_states))["module"]
        out["saved_module_keys"] = sorted(module)

    # map_location per rank: DeepSpeed's way (cpu), and a per-rank template.
    own = root / "step3" / f"zero_pp_rank_{RANK}_mp_rank_00_optim_states.pt"
    out["cpu_devices"] = sorted({str(t.device) for t in tensors(ours.load(str(own), map_location="cpu"))})
    per_rank = torchckpt.TorchCheckpointEngine(map_location="cuda:{local_rank}")
    try:
        out["template_devices"] = sorted({str(t.device) for t in tensors(per_rank.load(str(own)))})
    except Exception as e:  # noqa: BLE001 - without CUDA: the error must name this rank's device
        out["template_devices"] = error_text(e)

    # A write that fails on rank 1 fails the commit on both ranks; the next save still commits.
    save_failing(resumed, root, "broken", job, out, "broken_error")
    out["broken_committed"] = (root / "broken" / MANIFEST).exists()
    out["latest_after_broken"] = store.latest()
    out["step3_ok_after_broken"] = store.verify("step3").ok
    resumed.save_checkpoint(str(root), tag="after")
    if job["async_save"]:
        train(resumed, 200, 1)
    dist.barrier()
    out["after_committed"] = (root / "after" / MANIFEST).exists() and store.latest() == "after"


def die_mid_write(victim: str) -> None:
    """SIGKILL this process once 512 bytes of ``victim`` reached its temporary file."""
    from torchckpt import _fileio

    write = _fileio.HashingWriter.write

    def write_then_die(self, data):
        n = write(self, data)
        if os.path.basename(getattr(self._raw, "name", "")).startswith(f".{victim}.tmp-") and self.size >= 512:
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    _fileio.HashingWriter.write = write_then_die  # sync writes and the background writer alike


def kill(job: dict, out: dict) -> None:
    import torchckpt

    root = Path(job["root"])
    engine = make_engine(job["stage"], seed=0)
    torchckpt.install(engine, async_save=job["async_save"], commit_timeout=job["commit_timeout"])
    train(engine, 0, 2)
    engine.save_checkpoint(str(root), tag="good")
    if job["async_save"]:
        train(engine, 2, 1)
    if RANK == 1:
        die_mid_write(job["kill_file"])
    start = time.monotonic()
    try:
        engine.save_checkpoint(str(root), tag="torn")
        if job["async_save"]:
            train(engine, 3, 1)  # commits, or finds the dead rank
        out["torn_error"] = None
    except Exception as e:  # noqa: BLE001 - the test asserts on the message
        out["torn_error"] = error_text(e)
    out["seconds_to_fail"] = time.monotonic() - start


def timed(out: dict, key: str, fn) -> None:
    """Run ``fn``; record its error (None: it returned) and how long it took."""
    start = time.monotonic()
    try:
        fn()
        out[key] = None
    except Exception as e:  # noqa: BLE001 - the test asserts on the message
        out[key] = error_text(e)
    out[f"{key}_seconds"] = time.monotonic() - start


def dropin(job: dict, out: dict) -> None:
    """What DeepSpeed's own engine accepts on many ranks: save_16bit_model (a file outside the tag,
    written by rank 0 only), a rank that saves nothing into the tag (ZeRO-0: only rank 0 writes),
    ranks that disagree on the tag (tag_validation "Warn"), and a failure DeepSpeed raises on one
    rank only: the others must learn it at once, not at commit_timeout."""
    import torch.distributed as dist

    import torchckpt
    from torchckpt import CheckpointStore

    root = Path(job["root"])
    options = {"commit_timeout": job["commit_timeout"]}
    engine = make_engine(job["stage"], seed=0, checkpoint={"tag_validation": "Warn"})
    torchckpt.install(engine, **options)
    train(engine, 0, 2)

    timed(out, "export_error", lambda: engine.save_16bit_model(str(root / "export")))
    out["export_keys"] = sorted(torch.load(root / "export" / "pytorch_model.bin", weights_only=True))
    out["export_dir"] = sorted(p.name for p in (root / "export").iterdir())

    timed(out, "save_error", lambda: engine.save_checkpoint(str(root / "ckpt"), tag="both"))
    dist.barrier()
    out["both_verified"] = CheckpointStore(root / "ckpt").verify("both").ok
    out["both_ranks"] = sorted({rec.rank for rec in CheckpointStore(root / "ckpt").manifest("both").files.values()})

    timed(out, "disagree_error", lambda: engine.save_checkpoint(str(root / "ckpt"), tag=f"tag-{RANK}"))
    dist.barrier()
    out["disagree_status"] = {i.tag: i.status for i in CheckpointStore(root / "ckpt").list()}
    out["latest_after_disagree"] = CheckpointStore(root / "ckpt").latest()

    blocked = root / "blocked"
    if RANK == 0:
        (blocked / "pytorch_model.bin").mkdir(parents=True)  # rank 0's export cannot be written
    dist.barrier()
    timed(out, "blocked_error", lambda: engine.save_16bit_model(str(blocked)))
    dist.barrier()
    timed(out, "after_error", lambda: engine.save_checkpoint(str(root / "ckpt"), tag="after"))
    dist.barrier()
    out["after_verified"] = CheckpointStore(root / "ckpt").verify("after").ok


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out: dict = {"rank": RANK}
    result = Path(job["out"]) / f"rank{RANK}.json"
    try:
        quiet_deepspeed()
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        {"resume": resume, "kill": kill, "dropin": dropin}[job["scenario"]](job, out)
    except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
        out["crash"] = traceback.format_exc()
    result.write_text(json.dumps(out, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: with a peer gone, gloo's destructors may wait on it.
    os._exit(0)


if __name__ == "__main__":
    main()
