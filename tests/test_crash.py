"""A process SIGKILLed while saving never damages the previous committed checkpoint."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from torchckpt import CheckpointStore

WORKER = textwrap.dedent(
    """
    import sys, torch
    from torchckpt import CheckpointStore
    store = CheckpointStore(sys.argv[1])
    with store.transaction("good") as tx:
        tx.write("model.pt", {"w": torch.full((1000,), 1.0)})
        tx.commit()
    tx = store.transaction("doomed")
    tx.write("small.pt", {"x": 1})
    print("writing", flush=True)
    while True:  # keep writing large files until killed
        tx.write("big.pt", {"w": torch.randn(8 << 20)})
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_sigkill_while_saving_keeps_previous_checkpoint(tmp_path, delay):
    root = tmp_path / "ckpt"
    child = subprocess.Popen([sys.executable, "-c", WORKER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    store = CheckpointStore(root)
    assert store.latest() == "good" and (root / "latest").read_text() == "good"
    assert store.verify("good").ok
    assert torch.equal(store.load("latest", "model.pt")["w"], torch.full((1000,), 1.0))
    doomed = store.info("doomed")
    assert doomed.status == "incomplete", "the killed writer's lock is released: incomplete, not in flight"
    plan = store.gc()
    assert plan.incomplete == ["doomed"] and store.tags() == ["good"]
    assert not [p for p in root.rglob(".*tmp-*")]
