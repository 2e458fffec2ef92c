"""A process that checkpoints in a loop, for the crash tests to SIGKILL at random or chosen instants.

Modes (``python tests/_crash_worker.py MODE [JSON]``):

``serve``
    A zygote: imports torch and torchckpt once, then reads one JSON request per line on stdin
    and answers one JSON line on stdout. ``{"op": "spawn", "args": {...}}`` forks a saver and
    answers its pid; ``{"op": "wait", "pid": N}`` reaps it and answers how it ended. Forking a
    warm interpreter makes a trial cost milliseconds instead of a torch import.
``save JSON``
    One saver in this (fresh) interpreter.
``deepspeed JSON``
    A one-rank DeepSpeed job (gloo on 127.0.0.1) with torchckpt's engine installed: resumes from
    the store's latest committed tag if there is one, then trains and saves in a loop.

A saver appends to a journal (outside the checkpoint root) ``begin TAG`` before a save and
``commit TAG`` once the save returned: after a kill, every journaled commit must still load and
verify, and the one begun-but-not-journaled tag must be committed or incomplete, never torn.

``kill`` in the arguments makes the saver SIGKILL itself at a chosen point, counted by
occurrence (``{"point": "manifest-rename", "nth": 3}``); the points are the :data:`KILL_POINTS`.
The saver also publishes the phase it is in (``phase_file``, 64 bytes) so that the test can say
where a kill at a random instant landed.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import stat
import sys
import threading
import time
import traceback
from pathlib import Path

#: Where a saver can be told to kill itself, and what each point means.
KILL_POINTS = {
    "data-write": "in the middle of writing a data file (after its first chunk)",
    "data-fsync": "a data file fully written to its temporary name, before its fsync",
    "data-rename": "a data file fsynced, before its rename from the temporary name",
    "data-renamed": "right after a data file's rename, before the directory fsync",
    "dir-fsync": "before the fsync of the tag directory at commit",
    "manifest-write": "the manifest's bytes written to its temporary file, before its fsync",
    "manifest-rename": "the manifest fsynced under its temporary name, before its rename",
    "manifest-renamed": "right after the manifest's rename, before the directory fsync",
    "latest-rename": "the new `latest` fsynced under its temporary name, before its rename",
    "latest-renamed": "right after `latest` was replaced, before the root directory fsync",
    "async-write": "in a background writer thread, in the middle of writing a data file",
    "commit-wait": "in commit, while background writes are still in flight",
    "gc-uncommitted": "gc removing an old tag: right after its manifest was deleted",
    "gc-trashed": "gc removing an old tag: right after it was renamed to a trash directory",
    "gc-rmtree": "gc removing an old tag: in the middle of deleting the trash directory's files",
    "ds-latest-open": "DeepSpeed's own plain rewrite of `latest`: after open(..., 'w') truncated it",
    "ds-latest-partial": "DeepSpeed's own plain rewrite of `latest`: after half the tag was written",
}

MANIFEST = "torchckpt-manifest.json"
PHASE_BYTES = 64


def expected_state(step: int, index: int, numel: int):
    """The state a saver writes as file ``index`` of ``step``: values derived from both."""
    import torch

    base = torch.arange(numel, dtype=torch.float32) + (step * 1000 + index)
    return {
        "step": step,
        "index": index,
        "weight": base,
        "half": base[: numel // 2].to(torch.bfloat16),
        "view": base[1::3],  # shares storage with "weight"
        "nested": {"ids": torch.tensor([step, index], dtype=torch.int64), "name": f"s{step}-f{index}"},
    }


def tag_of(step: int) -> str:
    return f"s{step:05d}"


def step_of(tag: str) -> int:
    return int(tag[1:])


class _Killer:
    """Counts occurrences of one kill point and SIGKILLs this process at the nth."""

    def __init__(self, spec: dict | None):
        self.point = spec["point"] if spec else None
        self.nth = int(spec.get("nth", 1)) if spec else 0
        self.seen = 0
        self.lock = threading.Lock()

    def hit(self, point: str) -> None:
        if point != self.point:
            return
        with self.lock:
            self.seen += 1
            if self.seen >= self.nth:
                os.kill(os.getpid(), signal.SIGKILL)


class _Phase:
    """The saver's current phase, published in a small shared file the test reads after a kill."""

    def __init__(self, path: str | None):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if path else None
        self.main = "start"
        self.background = 0
        self.lock = threading.Lock()  # the main thread and the writer threads both publish

    def set(self, main: str | None = None, background: int = 0) -> None:
        with self.lock:
            if main is not None:
                self.main = main
            self.background += background
            if self.fd is not None:
                text = f"{self.main}|{'async-write' if self.background else ''}".encode()
                os.pwrite(self.fd, text.ljust(PHASE_BYTES, b" "), 0)


def _instrument(killer: _Killer, phase: _Phase) -> None:
    """Patch the file primitives torchckpt calls, in this process only, to count and kill."""
    import torchckpt._fileio as fileio
    from torchckpt import store as store_mod
    from torchckpt.async_writer import AsyncWriter

    real_replace, real_fsync, real_write = os.replace, os.fsync, fileio.HashingWriter.write

    def kind(path: str) -> str:
        name = os.path.basename(path)
        if name == "latest" or name.startswith(".latest."):
            return "latest"
        if name == MANIFEST or name.startswith(f".{MANIFEST}."):
            return "manifest"
        return "data"

    def replace(src, dst, *a, **kw):
        k = kind(os.fspath(dst))
        if k in ("data", "manifest", "latest"):
            killer.hit(f"{k}-rename")
        real_replace(src, dst, *a, **kw)
        killer.hit(f"{k}-renamed")

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            if phase.main == "commit":
                killer.hit("dir-fsync")
        else:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if kind(target) == "data":
                killer.hit("data-fsync")
        real_fsync(fd)

    def write(self, data):
        n = real_write(self, data)
        if threading.current_thread().name.startswith("torchckpt-writer"):
            killer.hit("async-write")
        elif phase.main == "manifest":
            killer.hit("manifest-write")
        elif phase.main == "write":
            killer.hit("data-write")
        return n

    real_rename, real_unlink = os.rename, os.unlink

    def rename(src, dst, *a, **kw):
        real_rename(src, dst, *a, **kw)
        if os.path.basename(os.fspath(dst)).startswith(".torchckpt-trash-"):
            killer.hit("gc-trashed")

    def unlink(path, *a, **kw):
        real_unlink(path, *a, **kw)
        if phase.main == "gc":
            if kw.get("dir_fd") is not None:
                killer.hit("gc-rmtree")
            elif os.path.basename(os.fspath(path)) == MANIFEST:
                killer.hit("gc-uncommitted")

    os.replace = replace
    os.fsync = fsync
    os.rename = rename
    os.unlink = unlink
    fileio.HashingWriter.write = write

    def traced(owner, name, label, *, background=False):
        real = getattr(owner, name)

        def wrapper(*a, **kw):
            previous = phase.main
            if background:
                phase.set(background=1)
            else:
                phase.set(label)
            try:
                return real(*a, **kw)
            finally:
                if background:
                    phase.set(background=-1)
                else:
                    phase.set(previous)

        setattr(owner, name, wrapper)

    traced(store_mod.Transaction, "write", "write")
    traced(store_mod.Transaction, "commit", "commit")
    traced(store_mod, "write_manifest", "manifest")
    traced(store_mod.CheckpointStore, "set_latest", "latest")
    traced(AsyncWriter, "_write", "", background=True)

    real_wait = store_mod.Transaction.wait

    def wait(self):
        if self._pending:
            killer.hit("commit-wait")
        return real_wait(self)

    store_mod.Transaction.wait = wait


class Journal:
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(self, event: str, tag: str, extra: str = "") -> None:
        os.write(self.fd, f"{event} {tag}{(' ' + extra) if extra else ''}\n".encode())


def read_journal(path: Path) -> list[tuple[str, str, str]]:
    """(event, tag, extra) per complete line; a line torn by the kill is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().split("\n")[:-1]:
        event, tag, *extra = line.split(" ", 2)
        out.append((event, tag, extra[0] if extra else ""))
    return out


def run_saver(args: dict) -> None:
    """Save ``steps`` tags through a CheckpointStore transaction each (sync or async)."""
    import torch

    from torchckpt import AsyncWriter, CheckpointStore
    from torchckpt import store as store_mod

    killer = _Killer(args.get("kill"))
    phase = _Phase(args.get("phase_file"))
    _instrument(killer, phase)
    store = CheckpointStore(args["root"], lock_timeout=args.get("lock_timeout", 60.0))
    journal = Journal(args["journal"])
    writer = AsyncWriter() if args.get("async") else None
    numel, files = int(args.get("numel", 1 << 18)), int(args.get("files", 2))
    hold = args.get("hold")  # {"at": "before-commit" | "in-commit-lock", "seconds": s}: stall there
    if hold and hold["at"] == "in-commit-lock":
        real_write_manifest = store_mod.write_manifest

        def stalled_write_manifest(*a, **kw):
            phase.set("holding")
            time.sleep(hold["seconds"])
            return real_write_manifest(*a, **kw)

        store_mod.write_manifest = stalled_write_manifest
    for step in range(args["start"], args["start"] + args["steps"]):
        tag = args["tag"] if args.get("tag") else tag_of(step)
        journal.note("begin", tag)
        phase.set("begin")
        with store.transaction(tag, writer=writer) as tx:
            for index in range(files):
                tx.write(f"f{index}.pt" if index % 2 == 0 else f"sub/f{index}.pt", expected_state(step, index, numel))
            if hold and hold["at"] == "before-commit":
                phase.set("holding")
                time.sleep(hold["seconds"])
            tx.commit(metadata={"step": step, "files": files, "numel": numel})
        phase.set("idle")
        journal.note("commit", tag)
        if args.get("gc_every") and step % args["gc_every"] == 0:
            phase.set("gc")
            store.gc(keep_last=args.get("keep_last"))
            phase.set("idle")
    if writer is not None:
        writer.shutdown()
    del torch


def _fingerprint(module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_deepspeed(args: dict) -> None:
    """A one-rank DeepSpeed job with torchckpt's engine: resume, then train and save in a loop."""
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args["port"])
    )
    import deepspeed
    import torch

    import torchckpt
    from torchckpt import CheckpointStore

    killer = _Killer(args.get("kill"))
    phase = _Phase(args.get("phase_file"))
    _instrument(killer, phase)
    real_open = builtins.open

    class TornLatest:
        """DeepSpeed's ``with open(latest, "w") as fd: fd.write(tag)``, killable half-way."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            half = max(1, len(text) // 2)
            self.f.write(text[:half])
            self.f.flush()
            killer.hit("ds-latest-partial")
            return self.f.write(text[half:])

    def ds_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)) == "latest" and "w" in mode:
            phase.set("ds-latest")
            killer.hit("ds-latest-open")
            return TornLatest(f)
        return f

    builtins.open = ds_open
    journal = Journal(args["journal"])
    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    config = {
        "train_batch_size": 4,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    ours = torchckpt.install(engine, async_save=bool(args.get("async")))
    store = CheckpointStore(args["root"])
    start = args["start"]
    resume = store.latest() if store.root.is_dir() else None
    if resume is not None:
        # DeepSpeed's loader reads `latest` itself; the store's resolution survives a torn one.
        engine.load_checkpoint(args["root"], tag=resume)
        journal.note("resumed", resume, _fingerprint(engine.module))
    fingerprints = {}
    for step in range(start, start + args["steps"]):
        x = torch.randn(4, 32, generator=torch.Generator().manual_seed(step))
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()  # an async engine commits the previous checkpoint here
        if ours._committed is not None and ours._committed in fingerprints:
            journal.note("commit", ours._committed, fingerprints.pop(ours._committed))
        tag = tag_of(step)
        fingerprints[tag] = _fingerprint(engine.module)
        journal.note("begin", tag, fingerprints[tag])
        engine.save_checkpoint(args["root"], tag=tag, client_state={"step": step})
        if not ours.is_decoupled():
            journal.note("commit", tag, fingerprints.pop(tag))
    ours.cleanup()
    if ours._committed in fingerprints:
        journal.note("commit", ours._committed, fingerprints.pop(ours._committed))


def _child(args: dict) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # the zygote's stdout is its reply channel
    code = 0
    try:
        run_saver(args)
    except BaseException:  # noqa: BLE001 - reported on stderr, exit code says it failed
        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import torch

    import torchckpt.async_writer
    import torchckpt.store  # noqa: F401

    torch.set_num_threads(1)
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                _child(request["args"])
            reply = {"pid": pid}
        elif request["op"] == "wait":
            _, status = os.waitpid(request["pid"], 0)
            reply = {
                "pid": request["pid"],
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            }
        elif request["op"] == "exit":
            break
        else:
            reply = {"error": f"unknown op {request['op']!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main(argv: list[str]) -> None:
    mode = argv[1]
    if mode == "serve":
        serve()
    elif mode == "save":
        run_saver(json.loads(argv[2]))
    elif mode == "deepspeed":
        run_deepspeed(json.loads(argv[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}; use serve, save or deepspeed")


if __name__ == "__main__":
    main(sys.argv)
