"""Re-saves that cost nothing: unchanged objects become hard links to a committed identical file,
and everything else (verify, rm, gc, export, adopt, a kill mid-save) keeps working with them."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from torchckpt import dedup
from torchckpt.layout import MANIFEST_NAME, WRITING_NAME
from torchckpt.notebook import Checkpointer
from torchckpt.store import CheckpointStore


def _state(seed: int = 0):
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).requires_grad_(False)
    adapter = torch.nn.Linear(64, 4)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    return {"base": base, "adapter": adapter, "opt": opt}


def _train(ns) -> None:
    ns["adapter"](ns["base"](torch.randn(8, 64))).pow(2).mean().backward()
    ns["opt"].step()
    ns["opt"].zero_grad()


def _ino(path):
    st = os.stat(path)
    return st.st_ino, st.st_nlink


def test_an_unchanged_object_is_linked_not_written(tmp_path, monkeypatch):
    ns = _state()
    with Checkpointer(tmp_path) as ck:
        first = ck.save("t1", ns, step=1)
        assert first.linked == {} and not any("unchanged" in n for n in first.notes)
        _train(ns)
        from torchckpt import serialization

        written = []
        real = serialization.save
        monkeypatch.setattr(serialization, "save", lambda obj, stream, **kw: (written.append(obj), real(obj, stream, **kw)))
        second = ck.save("t2", ns, step=2)
    assert second.linked == {"base": "t1"}
    assert "base: unchanged since t1, linked" in second.notes and "base: unchanged since t1" in second.to_text()
    # the base was never serialised again: only the adapter, the optimizer and the RNG states were
    assert len(written) == 3 and not any("0.weight" in o for o in written if isinstance(o, dict))
    a, b = tmp_path / "t1/objects/base.pt", tmp_path / "t2/objects/base.pt"
    assert _ino(a) == _ino(b) and _ino(a)[1] == 2
    assert _ino(tmp_path / "t1/objects/adapter.pt")[0] != _ino(tmp_path / "t2/objects/adapter.pt")[0]
    m1, m2 = CheckpointStore(tmp_path).manifest("t1"), CheckpointStore(tmp_path).manifest("t2")
    assert m1.files["objects/base.pt"] == m2.files["objects/base.pt"]
    keys = m2.metadata[dedup.KEYS_FIELD]
    assert keys["objects/base.pt"] == m1.metadata[dedup.KEYS_FIELD]["objects/base.pt"]
    usage = dedup.disk_usage(tmp_path)
    assert usage.links == 1 and usage.unique == usage.apparent - os.path.getsize(a)
    assert torch.load(b, weights_only=True)["0.weight"].equal(ns["base"][0].weight)


def test_removing_either_tag_keeps_the_other_whole(tmp_path):
    ns = _state()
    with Checkpointer(tmp_path) as ck:
        ck.save("t1", ns)
        _train(ns)
        ck.save("t2", ns)
        _train(ns)
        ck.save("t3", ns)
        assert _ino(tmp_path / "t3/objects/base.pt")[1] == 3
        ck.remove("t1")
        assert _ino(tmp_path / "t3/objects/base.pt")[1] == 2
        ck.remove(["t3"], force=True)
        assert _ino(tmp_path / "t2/objects/base.pt")[1] == 1
        assert ck.verify("t2").ok
        fresh = _state(seed=1)
        ck.load("t2", fresh)
        assert fresh["base"][0].weight.equal(ns["base"][0].weight)


def test_gc_export_and_adopt_work_on_linked_files(tmp_path):
    from torchckpt.deepspeed.adopt import adopt
    from torchckpt.interop import export_safetensors

    ns = _state()
    with Checkpointer(tmp_path) as ck:
        for i in range(4):
            ck.save(f"t{i}", ns, step=i)
            _train(ns)
        ck.gc(keep_last=2)
        assert ck.tags() == ["t2", "t3"] and all(ck.verify(t).ok for t in ("t2", "t3"))
    store = CheckpointStore(tmp_path)
    out = tmp_path / "base.safetensors"
    export_safetensors(store, "t3", out, key="base")
    from safetensors.torch import load_file

    assert load_file(out)["0.weight"].equal(ns["base"][0].weight)
    # a linked tag that lost its manifest (as if another tool wrote it) is adopted like any other
    (tmp_path / "t2" / MANIFEST_NAME).unlink()
    (tmp_path / "t2" / WRITING_NAME).unlink(missing_ok=True)
    manifest = adopt(store, "t2")
    assert "objects/base.pt" in manifest.files and store.verify("t2").ok


def test_verify_catches_corruption_of_a_linked_file(tmp_path):
    ns = _state()
    with Checkpointer(tmp_path) as ck:
        ck.save("t1", ns)
        _train(ns)
        ck.save("t2", ns)
        path = tmp_path / "t2/objects/base.pt"
        with open(path, "r+b") as f:  # in place: both names see it (one file), and both report it
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        for tag in ("t1", "t2"):
            report = ck.verify(tag)
            assert not report.ok and "objects/base.pt: checksum mismatch" in report.report.problems[0]


def test_a_tampered_committed_file_is_never_linked(tmp_path, caplog):
    ns = _state()
    with Checkpointer(tmp_path) as ck:
        ck.save("t1", ns)
        path = tmp_path / "t1/objects/base.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum tells
        path.write_bytes(bytes(data))
        _train(ns)
        r = ck.save("t2", ns)
        assert r.linked == {}
        assert _ino(tmp_path / "t2/objects/base.pt")[0] != _ino(path)[0]
        assert ck.verify("t2").ok and not ck.verify("t1").ok
    assert any("checksum mismatch" in m for m in caplog.messages)


def test_a_symlinked_candidate_is_refused(tmp_path):
    ns = _state()
    with Checkpointer(tmp_path / "root") as ck:
        ck.save("t1", ns)
        path = tmp_path / "root/t1/objects/base.pt"
        outside = tmp_path / "outside.pt"
        os.replace(path, outside)
        os.symlink(outside, path)
        _train(ns)
        r = ck.save("t2", ns)
        assert r.linked == {}
        assert not os.path.islink(tmp_path / "root/t2/objects/base.pt") and ck.verify("t2").ok


def test_copies_where_links_fail(tmp_path, monkeypatch):
    ns = _state()

    def no_links(*a, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with Checkpointer(tmp_path) as ck:
        ck.save("t1", ns)
        monkeypatch.setattr(dedup.os, "link", no_links)
        _train(ns)
        r = ck.save("t2", ns)
        assert "base: unchanged since t1, copied" in r.notes
        assert _ino(tmp_path / "t2/objects/base.pt")[0] != _ino(tmp_path / "t1/objects/base.pt")[0]
        assert ck.verify("t2").ok


def test_identical_bytes_without_a_key_are_linked_after_the_write(tmp_path, monkeypatch):
    ns = _state()
    monkeypatch.setattr(dedup, "content_key", lambda payload: None)
    with Checkpointer(tmp_path) as ck:
        ck.save("t1", ns)
        _train(ns)
        r = ck.save("t2", ns)
    assert r.linked == {"base": "t1"}
    assert _ino(tmp_path / "t2/objects/base.pt") == _ino(tmp_path / "t1/objects/base.pt")
    assert not [p for p in (tmp_path / "t2/objects").iterdir() if p.name.startswith(".")]


def test_never_links_to_an_uncommitted_tag_and_can_be_turned_off(tmp_path):
    ns = _state()
    with Checkpointer(tmp_path) as ck:
        ck.save("open", ns, commit=False)
        assert ck.save("t1", ns).linked == {}
        ck.commit("open")
        assert ck.save("t2", ns).linked
    with Checkpointer(tmp_path, dedup=False) as ck:
        assert ck.save("t3", ns).linked == {}
        assert _ino(tmp_path / "t3/objects/base.pt")[1] == 1


def test_async_saves_link_too(tmp_path):
    ns = _state()
    with Checkpointer(tmp_path) as ck:
        ck.save("t1", ns, async_save=True)
        ck.commit("t1")
        _train(ns)
        r = ck.save("t2", ns, async_save=True)
        assert r.linked == {"base": "t1"}
        assert ck.commit("t2").committed and ck.verify("t2").ok
    assert _ino(tmp_path / "t2/objects/base.pt") == _ino(tmp_path / "t1/objects/base.pt")


def test_content_key_follows_what_torch_would_write():
    t = torch.arange(10.0)
    key = dedup.content_key({"w": t})
    assert key == dedup.content_key({"w": t.clone()})
    assert key != dedup.content_key({"w": t + 1})
    assert key != dedup.content_key({"v": t})  # the structure counts
    assert key != dedup.content_key({"w": t.to(torch.float64)})
    assert dedup.content_key({"w": t[:5]}) != dedup.content_key({"w": t[:5].clone()})  # a view saves its storage
    assert dedup.content_key({"w": torch.nn.Parameter(t)}) != key


# -- a kill in the middle of a linked save ------------------------------------------------------------
_SAVER = textwrap.dedent("""
    import os, signal, sys, json, torch
    from torchckpt.notebook import Checkpointer
    args = json.loads(sys.argv[1])
    real_replace, seen = os.replace, [0]
    def replace(src, dst, *a, **kw):
        if os.path.basename(os.fspath(dst)) == args["name"]:
            seen[0] += 1
            if seen[0] == args["nth"] and args["when"] == "before":
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, *a, **kw)
        if seen[0] == args["nth"] and args["when"] == "after" and os.path.basename(os.fspath(dst)) == args["name"]:
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 256).requires_grad_(False)
    head = torch.nn.Linear(4, 4)
    ck = Checkpointer(args["root"])
    for step in range(args["start"], args["start"] + 6):
        with torch.no_grad():
            head.weight.fill_(step)
        ck.save(f"s{step:03d}", {"base": base, "head": head}, step=step)
        print("committed", step, flush=True)
""")


@pytest.mark.parametrize("name, when", [("base.pt", "before"), ("base.pt", "after"), ("head.pt", "before"),
                                        ("torchckpt-manifest.json", "before")])
def test_a_kill_mid_save_leaves_every_committed_tag_intact(tmp_path, name, when):
    root = tmp_path / "root"
    start = 1
    for nth in (2, 3):
        proc = subprocess.run([sys.executable, "-c", _SAVER, json.dumps(
            {"root": str(root), "name": name, "nth": nth, "when": when, "start": start})],
            capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        committed = [int(line.split()[1]) for line in proc.stdout.splitlines()]
        store = CheckpointStore(root)
        done = store.tags(committed_only=True)
        assert all(f"s{s:03d}" in done for s in committed)
        for tag in done:
            assert store.verify(tag).ok, tag
            step = int(tag[1:])
            assert store.load(tag, "objects/head.pt")["weight"].eq(step).all()
        store.gc()
        assert store.tags() == done  # the killed save left an incomplete tag (removed), nothing else
        assert dedup.disk_usage(root).links >= len(done) - 1  # every base after the first is shared
        start = max(int(t[1:]) for t in store.tags()) + 1 if store.tags() else start + 10
