"""Disk full and file too large: a save fails with an error that says so, leaves no temporary
file and no committed partial tag, and the previous checkpoint stays intact.

RLIMIT_FSIZE (a per-process file-size limit) always runs, in a subprocess. A real full
filesystem is a small tmpfs, mounted when this process may mount (root); skipped otherwise.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from _reliability import record

from torchckpt import AsyncWriter, CheckpointStore
from torchckpt.errors import CommitError, TorchckptError, WriteError
from torchckpt.layout import MANIFEST_NAME


def _good(root: Path) -> CheckpointStore:
    store = CheckpointStore(root)
    with store.transaction("good") as tx:
        tx.write("model.pt", {"w": torch.arange(100.0)})
        tx.commit(metadata={"step": 1})
    return store


def _assert_intact(store: CheckpointStore, failed_tag: str) -> None:
    root = store.root
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name], "a temporary file was left behind"
    assert (root / "latest").read_text() == "good"
    assert store.latest() == "good"
    assert store.verify("good").ok
    assert torch.equal(store.load("good", "model.pt")["w"], torch.arange(100.0))
    if (root / failed_tag).exists():
        info = store.info(failed_tag)
        assert not info.committed and not (root / failed_tag / MANIFEST_NAME).exists()
        assert info.status == "incomplete", info.status
    assert store.tags(committed_only=True) == ["good"]


FSIZE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from torchckpt import AsyncWriter, CheckpointStore
    store = CheckpointStore(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    out = []
    from torchckpt import serialization
    for mode, writer in (("sync", None), ("async", AsyncWriter()), ("torch.save", None)):
        tag = "big-" + mode.replace(".", "-")
        # torch.save itself (used where torch's private save steps differ) wraps the error
        serialization._FAST_SAVE = mode != "torch.save"
        try:
            with store.transaction(tag, writer=writer) as tx:
                tx.write("small.pt", {"w": torch.zeros(10)})
                tx.write("sub/big.pt", {"w": torch.zeros(1 << 18)})
                tx.commit(metadata={"step": 2})
            out.append({"mode": mode, "error": None})
        except Exception as e:
            out.append({"mode": mode, "tag": tag, "type": [c.__name__ for c in type(e).__mro__],
                        "errno": getattr(e, "errno", None), "message": str(e)})
    print(json.dumps(out))
    """
)


def test_file_too_large_rlimit_fsize(tmp_path):
    store = _good(tmp_path / "ckpts")
    limit = 256 << 10  # the 1 MiB file cannot be written; the small one and the manifest can
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(store.root), str(limit)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for result in results:
        assert "message" in result, f"the {result['mode']} save succeeded despite the file-size limit"
        assert "WriteError" in result["type"] and "TorchckptError" in result["type"] and "OSError" in result["type"], result
        assert result["errno"] == errno.EFBIG
        assert "file too large while writing" in result["message"] and "sub/big.pt" in result["message"], result
        assert "ulimit -f" in result["message"]
        _assert_intact(store, result["tag"])
        record("disk", kind="RLIMIT_FSIZE", mode=result["mode"], error=result["message"].replace(str(store.root), "ROOT"), ok=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs, or a skip when this process may not mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", f"torchckpt-test-{uuid.uuid4().hex[:8]}", str(mnt)],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot run mount: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(mnt: Path, leave: int) -> None:
    """Fill the filesystem so that exactly ``leave`` bytes stay free."""
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * (_free(mnt) - leave))
    assert _free(mnt) == leave, (_free(mnt), leave)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_while_writing_data(small_fs, mode):
    store = _good(small_fs / "ckpts")
    full = r"no space left on the device while writing .*big\.pt: free space there"
    writer = AsyncWriter() if mode == "async" else None
    with pytest.raises(WriteError, match=full) as caught, store.transaction("big", writer=writer) as tx:
        tx.write("big.pt", {"w": torch.zeros(1 << 19)})  # 2 MiB on a 1 MiB filesystem
        tx.commit()
    _assert_intact(store, "big")
    record("disk", kind="tmpfs full: data file", mode=mode, error=str(caught.value).replace(str(store.root), "ROOT"), ok=True)


def _size_on_disk(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return -(-len(buf.getvalue()) // 4096) * 4096


@pytest.mark.parametrize("stage", ["manifest", "latest"])
def test_disk_full_while_committing(small_fs, stage):
    """Room for the data but not for the manifest (or not for the new `latest`): nothing committed."""
    store = _good(small_fs / "ckpts")
    obj = {"w": torch.zeros(20_000)}
    leave = _size_on_disk(obj) + (4096 if stage == "latest" else 0)  # the manifest takes one page
    _fill(small_fs, leave)
    tx = store.transaction("new")
    tx.write("model.pt", obj)
    with pytest.raises((CommitError, WriteError), match="no space left on the device while writing") as caught:
        tx.commit(metadata={"step": 2})
    assert isinstance(caught.value, TorchckptError)
    name = MANIFEST_NAME if stage == "manifest" else "latest"
    assert name in str(caught.value)
    os.unlink(small_fs / "filler")
    _assert_intact(store, "new")
    record("disk", kind=f"tmpfs full: {stage}", mode="sync", error=str(caught.value).replace(str(store.root), "ROOT"), ok=True)
