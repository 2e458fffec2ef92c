"""Two-rank save benchmark: DeepSpeed's own checkpoint engine vs torchckpt (sync, async).

    python benchmarks/bench_ranks.py [--params-m 8,32] [--stage 1] [--iters 5] [--root DIR] [--report]

Starts two gloo ranks on 127.0.0.1 (ports 29750-29799), builds one DeepSpeed ZeRO engine per rank
(fp32, AdamW) and times ``engine.save_checkpoint`` with each checkpoint engine in turn, on the
same engine and the same state:

- *save_checkpoint blocks*: how long ``save_checkpoint`` takes (the slowest rank's time);
- *training time lost*: that, plus for ``async_save=True`` the extra time of the next training
  step over a plain one (DeepSpeed commits a deferred save at that step, waiting for the
  background writes that are not finished yet);
- *until committed*: from the start of the save until ``commit`` returned on the rank (for the
  async engine this includes the next step's forward and backward passes).

Each row is the median of ``--iters`` saves after one warm-up save. DeepSpeed's engine neither
fsyncs nor checksums, so it is faster than any engine that makes files durable can be on a
disk that has to write them; the ratio says what durability and verification cost here. The
table is printed and, with ``--report``, written into BENCHMARKS.md between the ``bench_ranks``
markers (the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PORTS = range(29750, 29800)
MODES = ("deepspeed", "torchckpt", "torchckpt-async")


# -- one rank ----------------------------------------------------------------------------------
def worker(job: dict) -> None:
    import deepspeed.ops

    # The shared-memory all-reduce op (a long C++ build on a fresh machine) is unrelated to saving.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine

    import torchckpt

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = dist.get_rank()
    width = 1024
    layers = max(1, round(job["params_m"] * 1e6 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": job["stage"]},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    x = torch.randn(4, width)

    def step() -> float:
        start = time.perf_counter()
        engine.backward(engine(x).square().mean())
        engine.step()
        return time.perf_counter() - start

    plain_steps = [step() for _ in range(3)]
    plain = statistics.median(plain_steps)
    root = Path(job["root"])
    out: dict = {"rank": rank, "layers": layers, "plain_step_s": plain, "modes": {}}
    for mode in MODES:
        if mode == "deepspeed":
            engine.checkpoint_engine = torch_checkpoint_engine.TorchCheckpointEngine(engine._config)
        else:
            torchckpt.install(engine, async_save=mode.endswith("async"))
        committed_at: list[float] = []
        commit = engine.checkpoint_engine.commit

        def timed_commit(info, commit=commit, committed_at=committed_at):
            done = commit(info)
            committed_at.append(time.perf_counter())
            return done

        engine.checkpoint_engine.commit = timed_commit
        rows = []
        for i in range(1 + job["iters"]):
            tag = f"{mode}-{i}"
            dist.barrier()
            start = time.perf_counter()
            engine.save_checkpoint(str(root), tag=tag)
            blocking = time.perf_counter() - start
            extra = max(0.0, step() - plain)  # the async engine commits in this step
            committed = committed_at[-1] - start
            lost = blocking + extra if mode.endswith("async") else blocking
            dist.barrier()
            size = sum(p.stat().st_size for p in (root / tag).iterdir() if p.is_file() and not p.name.startswith("."))
            if i:  # the first save warms up buffers and the page cache
                rows.append({"blocking": blocking, "lost": lost, "committed": committed, "bytes": size})
            dist.barrier()
            if rank == 0:
                shutil.rmtree(root / tag)
        out["modes"][mode] = rows
        if engine.checkpoint_engine.is_decoupled():
            engine.checkpoint_engine.cleanup()
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    os._exit(0)


# -- the launcher ------------------------------------------------------------------------------
def free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit(f"no free port in {PORTS.start}-{PORTS.stop - 1} on 127.0.0.1")


def run(params_m: float, args: argparse.Namespace) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="torchckpt-bench-ranks-"))
    root = Path(args.root) / f"{params_m:g}M" if args.root else work / "ckpt"
    job = {"params_m": params_m, "stage": args.stage, "iters": args.iters, "root": str(root), "out": str(work)}
    (work / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    env["DS_ACCELERATOR"] = "cpu"  # two gloo ranks on the CPU, GPU or not
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(work / "job.json")],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=open(work / f"rank{r}.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        for r in range(2)
    ]
    codes = [p.wait() for p in procs]
    if codes != [0, 0]:
        logs = "\n".join((work / f"rank{r}.log").read_text(errors="replace")[-2000:] for r in range(2))
        raise SystemExit(f"a rank failed (exit codes {codes}):\n{logs}")
    results = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    shutil.rmtree(work, ignore_errors=True)
    return results


NAMES = {
    "deepspeed": "DeepSpeed TorchCheckpointEngine (no fsync, no checksum)",
    "torchckpt": "torchckpt (sync)",
    "torchckpt-async": "torchckpt (async_save=True)",
}


def table(runs: dict[float, list[dict]], args: argparse.Namespace) -> str:
    setup = (
        f"Two ranks (gloo, 127.0.0.1, one CPU thread each), ZeRO-{args.stage}, fp32 parameters + AdamW; "
        f"median of {args.iters} saves after a warm-up save (min-max in brackets); the slowest rank's time."
    )
    note = (
        "With fewer cores than twice the ranks, `async_save`'s background writes compete with training "
        "for the CPU, so the next step absorbs part of the write and its time lost varies from run to "
        "run; with spare cores, or GPUs doing the training, the writes overlap it."
    )
    lines = [
        setup,
        "",
        "| state | engine | save_checkpoint blocks | training time lost | until committed | time lost vs DeepSpeed's |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for params_m, results in runs.items():

        def slowest(mode: str, key: str, results=results) -> list[float]:
            return [max(row[key] for row in rows) for rows in zip(*(r["modes"][mode] for r in results), strict=False)]

        def median_of(mode: str, key: str) -> float:
            return statistics.median(slowest(mode, key))

        size = results[0]["modes"]["deepspeed"][0]["bytes"]
        base = median_of("deepspeed", "lost")
        for mode in MODES:
            blocking, lost, committed = (median_of(mode, k) for k in ("blocking", "lost", "committed"))
            spread = slowest(mode, "lost")
            lost_text = f"{lost * 1e3:.0f} ms ({min(spread) * 1e3:.0f}-{max(spread) * 1e3:.0f})"
            ms = " | ".join([f"{blocking * 1e3:.0f} ms", lost_text, f"{committed * 1e3:.0f} ms"])
            state = f"{params_m:g}M params, {size / 2**20:.0f} MiB" if mode == MODES[0] else ""
            lines.append(f"| {state} | {NAMES[mode]} | {ms} | {lost / base:.2f}x |")
    return "\n".join([*lines, "", note]) + "\n"


BEGIN, END = "<!-- bench_ranks: begin -->", "<!-- bench_ranks: end -->"


def report(path: Path, text: str, load: tuple[str, str]) -> None:
    """Put the table into ``path`` between the bench_ranks markers; keep the rest of the file."""
    footer = (
        f"Load average at the start / end: {load[0]} / {load[1]} (on {os.cpu_count()} cores); "
        f"written by `python benchmarks/bench_ranks.py --report` on {time.strftime('%Y-%m-%d')}."
    )
    heading = "## Two ranks: `save_checkpoint` on DeepSpeed (`benchmarks/bench_ranks.py`)"
    body = f"{BEGIN}\n{heading}\n\n{text}\n{footer}\n{END}"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + body + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip() + "\n\n" + body + "\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-m", default="8,32", help="millions of parameters, comma-separated (default 8,32)")
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2, 3), help="ZeRO stage (default 1)")
    parser.add_argument("--iters", type=int, default=5, help="timed saves per engine (default 5)")
    parser.add_argument("--root", help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--report", action="store_true", help="also write the table into BENCHMARKS.md (its own section)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return
    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    runs = {float(m): run(float(m), args) for m in args.params_m.split(",")}
    load_end = " ".join(f"{x:.1f}" for x in os.getloadavg())
    text = table(runs, args)
    print(text)
    if args.report:
        report(Path(__file__).resolve().parent.parent / "BENCHMARKS.md", text, (load_start, load_end))


if __name__ == "__main__":
    main()
