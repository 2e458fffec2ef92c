"""Hostile input: pickles that run code, dangerous tag names, oversized metadata, manifests and
symbolic links that point outside the tag directory. Each is refused before it can do harm.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pickle
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _reliability import record

import torchckpt
from torchckpt import CheckpointStore
from torchckpt.errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidTagError,
    ManifestError,
    UnsafeCheckpointError,
)
from torchckpt.layout import MANIFEST_NAME
from torchckpt.manifest import MAX_METADATA_BYTES


class Evil:
    """Unpickling this creates ``marker``: the side effect that must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class EvilSystem:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payloads(marker: Path) -> dict[str, object]:
    evil = Evil(marker)
    return {
        "top-level": evil,
        "in a state dict": {"w": torch.ones(3), "extra": evil},
        "os.system": {"w": torch.ones(3), "x": EvilSystem(marker)},
        "inside an allowlisted OrderedDict": collections.OrderedDict(w=torch.ones(3), x=evil),
        "inside an allowlisted Namespace": {"args": argparse.Namespace(lr=0.1, hook=evil)},
        "as an allowlisted defaultdict's factory": collections.defaultdict(exec, {"w": torch.ones(3)}),
    }


def _write_raw(store: CheckpointStore, tag: str, files: dict[str, bytes]) -> None:
    """A committed tag whose files hold exactly these bytes (the commit records files it finds)."""
    tx = store.transaction(tag)
    for relpath, data in files.items():
        (tx.dir / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tx.dir / relpath).write_bytes(data)
    tx.commit()


def _torch_bytes(obj, *, legacy: bool = False) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw pickle"])
@pytest.mark.parametrize("payload", list(_payloads(Path("x"))))
def test_hostile_pickle_is_refused_and_nothing_runs(root, marker, payload, fmt):
    obj = _payloads(marker)[payload]
    data = pickle.dumps(obj, protocol=2) if fmt == "raw pickle" else _torch_bytes(obj, legacy=fmt == "legacy")
    store = CheckpointStore(root)
    _write_raw(store, "t", {"model.pt": data})
    assert store.verify("t").ok
    attempts = [
        {},
        {"verify": False},
        {"map_location": "cpu"},
        {"mmap": False},
        {"allow_incomplete": True},
        {"allow": ["collections.OrderedDict", "argparse.Namespace", torch.Tensor]},
    ]
    for kwargs in attempts:
        with pytest.raises(UnsafeCheckpointError) as caught:
            store.load("t", "model.pt", **kwargs)
        message = str(caught.value)
        assert "trusted=True" in message and "allow=[" in message
        if fmt != "raw pickle" or payload == "top-level":  # a raw pickle stops at its first tensor
            assert re.search(r"\bexec\b|\bsystem\b", message), message  # names the refused global
        assert not marker.exists(), f"unpickling ran code with {kwargs}"
    # The test's payload is real: trusting the file runs it. trusted=True is the only way.
    if payload != "as an allowlisted defaultdict's factory":  # that one only *stores* exec
        with contextlib.suppress(Exception):  # exec returns None: the rest of the rebuild may fail
            store.load("t", "model.pt", trusted=True)
        assert marker.exists(), "the hostile payload did not work when trusted: this test proves nothing"
    record("security", kind=f"hostile pickle ({fmt}, {payload})", refused=True, ran=False)


@pytest.mark.parametrize("crafted", ["backward hooks", "numel past its record"])
def test_what_torch_save_never_writes_is_refused_by_the_store(root, tmp_path, crafted):
    """torch's weights-only unpickler loads these; torchckpt's loads refuse them, verified or not."""
    from test_safe_load_differential import hostile_pickles, write_zip

    data = write_zip(tmp_path / "crafted.pt", hostile_pickles(tmp_path / "m")[crafted]).read_bytes()
    store = CheckpointStore(root)
    _write_raw(store, "t", {"model.pt": data})
    for kwargs in ({}, {"verify": False}, {"map_location": "cpu"}):
        with pytest.raises(UnsafeCheckpointError, match="torch.save never writes"):
            store.load("t", "model.pt", **kwargs)
    record("security", kind=f"crafted tensor ({crafted})", refused=True, ran=False)


def test_engine_and_inspect_never_run_a_hostile_pickle(root, marker):
    pytest.importorskip("deepspeed")
    from torchckpt import TorchCheckpointEngine
    from torchckpt.file_structure import inspect_file

    store = CheckpointStore(root)
    _write_raw(store, "t", {"mp_rank_00_model_states.pt": _torch_bytes({"module": {"w": torch.ones(2)}, "x": Evil(marker)})})
    (root / "foreign").mkdir()  # no manifest, nothing of torchckpt's: DeepSpeed's own engine wrote it
    (root / "foreign" / "mp_rank_00_model_states.pt").write_bytes(_torch_bytes(Evil(marker)))
    (root / "interrupted").mkdir()  # torchckpt began it and never committed it
    (root / "interrupted" / ".torchckpt-writing").write_bytes(b"")
    (root / "interrupted" / "mp_rank_00_model_states.pt").write_bytes(_torch_bytes(Evil(marker)))
    for options in ({}, {"verify_on_load": False}, {"allow_incomplete": True}, {"map_location": "cpu"}):
        engine = TorchCheckpointEngine(None, **options)
        for tag in ("t", "foreign", "interrupted"):
            interrupted = tag == "interrupted" and not options.get("allow_incomplete")
            refusal = IncompleteCheckpointError if interrupted else UnsafeCheckpointError
            with pytest.raises(refusal), warnings.catch_warnings():
                warnings.simplefilter("ignore", torchckpt.UnverifiedLoadWarning)
                engine.load(str(root / tag / "mp_rank_00_model_states.pt"))
            assert not marker.exists()
    structure = inspect_file(root / "t" / "mp_rank_00_model_states.pt")
    assert "builtins.exec" in structure.globals and not marker.exists()
    record("security", kind="hostile pickle via the DeepSpeed engine and inspect", refused=True, ran=False)


BAD_TAGS = [
    "", ".", "..", "../escape", "a/b", "/abs", "a\\b", "x\0y", "new\nline", "tab\there", "\x1b[31mred",
    " lead", "trail ", "latest", ".torchckpt-lock", "a" * 201, "rtl\u202eoverride", "zero\u200bwidth",
    "bell\x07", "del\x7f",
]


@pytest.mark.parametrize("tag", BAD_TAGS, ids=[repr(t)[:24] for t in BAD_TAGS])
def test_bad_tag_is_refused_before_touching_the_disk(tmp_path, tag):
    root = tmp_path / "ckpts"
    store = CheckpointStore(root)
    calls = {
        "transaction": lambda: store.transaction(tag),
        "set_latest": lambda: store.set_latest(tag),
        "load": lambda: store.load(tag, "model.pt"),
        "verify": lambda: store.verify(tag),
        "info": lambda: store.info(tag),
        "delete": lambda: store.delete(tag),
    }
    for name, call in calls.items():
        if tag == "latest" and name not in ("transaction", "set_latest"):
            continue  # reading, "latest" names the newest committed tag; writing, it is refused
        with pytest.raises(InvalidTagError, match="tag"):
            call()
        assert not root.exists(), f"{name} with the refused tag {tag!r} touched the disk"
    record("security", kind="bad tag name", tag=repr(tag), refused=True)


@pytest.mark.parametrize("tag", [None, 7, b"bytes", ["a"]])
def test_non_string_tag_is_refused(tmp_path, tag):
    store = CheckpointStore(tmp_path / "ckpts")
    with pytest.raises(InvalidTagError, match="tag must be a string"):
        store.transaction(tag)
    assert not store.root.exists()


def test_engine_refuses_a_bad_tag(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
        CheckpointCommitInfo,
    )

    from torchckpt import TorchCheckpointEngine

    engine = TorchCheckpointEngine(None)
    for tag in ("../escape", "a/b", "", "x\0"):
        with pytest.raises(InvalidTagError):
            engine.create(CheckpointCommitInfo(tag=tag, save_dir=str(tmp_path / "ckpts"), save_latest=True))
    assert not (tmp_path / "ckpts").exists()


BAD_RELPATHS = ["../escape.pt", "/abs.pt", "a/../../x.pt", "..", ".", "", "x\0.pt", "a\\b.pt",
                MANIFEST_NAME, ".torchckpt-writing", "ctl\x1b.pt"]  # fmt: skip


@pytest.mark.parametrize("relpath", BAD_RELPATHS, ids=[repr(p)[:24] for p in BAD_RELPATHS])
def test_bad_file_path_is_refused(root, relpath):
    store = CheckpointStore(root)
    with store.transaction("t") as tx:
        before = sorted(p.name for p in tx.dir.iterdir())
        with pytest.raises(ValueError, match="path|reserved|control"):
            tx.write(relpath, {"w": torch.ones(1)})
        assert sorted(p.name for p in tx.dir.iterdir()) == before
    with pytest.raises(ValueError):
        store.load("t", relpath, allow_incomplete=True)
    assert not (root.parent / "escape.pt").exists() and not (root / "escape.pt").exists()


def test_write_refuses_a_directory_that_is_a_symlink_outside(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = CheckpointStore(root)
    tx = store.transaction("t")
    (tx.dir / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the tag directory"):
        tx.write("sub/x.pt", {"w": torch.ones(1)})
    assert list(outside.iterdir()) == []
    tx.abort()


def test_oversized_metadata_is_refused_and_nothing_is_committed(root):
    store = CheckpointStore(root)
    with store.transaction("good") as tx:
        tx.write("model.pt", {"w": torch.ones(2)})
        tx.commit(metadata={"step": 1})
    tx = store.transaction("big")
    tx.write("model.pt", {"w": torch.zeros(2)})
    for metadata, message in [
        ({"note": "x" * MAX_METADATA_BYTES}, f"at most {MAX_METADATA_BYTES} are allowed"),
        ({"nested": _deep(100_000)}, "metadata"),
        ({"nan": float("nan")}, "not plain JSON"),
        ({"tensor": torch.ones(3)}, "not plain JSON"),
        ({"obj": object()}, "not plain JSON"),
        (["not", "a", "dict"], "must be a dict"),
    ]:
        with pytest.raises(ManifestError, match=message):
            tx.commit(metadata=metadata)
        assert not (root / "big" / MANIFEST_NAME).exists()
        assert (root / "latest").read_text() == "good" and store.latest() == "good"
    tx.commit(metadata={"step": 2})  # the transaction is still usable with sane metadata
    assert store.latest() == "big"
    record("security", kind="oversized or non-JSON metadata", refused=True)


def _deep(n: int) -> list:
    out: list = []
    for _ in range(n):
        out = [out]
    return out


@pytest.fixture
def committed(root):
    store = CheckpointStore(root)
    with store.transaction("other") as tx:
        tx.write("model.pt", {"w": torch.full((4,), 2.0)})
        tx.commit()
    with store.transaction("t") as tx:
        tx.write("model.pt", {"w": torch.ones(4)})
        tx.write("sub/opt.pt", {"step": 1})
        tx.commit()
    return store


def _rewrite_manifest(store: CheckpointStore, tag: str, edit) -> None:
    path = store.root / tag / MANIFEST_NAME
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.fixture
def spy(monkeypatch):
    """Every path the store checksums or loads."""
    import torchckpt.store as store_mod
    from torchckpt import serialization

    seen: list[Path] = []
    real_checksum, real_load = store_mod.checksum_file, serialization.load

    def checksum_file(path, *a, **kw):
        seen.append(Path(path))
        return real_checksum(path, *a, **kw)

    def load(path, *a, **kw):
        seen.append(Path(path))
        return real_load(path, *a, **kw)

    monkeypatch.setattr(store_mod, "checksum_file", checksum_file)
    monkeypatch.setattr(serialization, "load", load)
    return seen


@pytest.mark.parametrize("bad", ["../other/model.pt", "/etc/passwd", "sub/../../other/model.pt", "sub/./opt.pt",
                                 "a\\..\\b", "", ".torchckpt-writing", "x\x00"])  # fmt: skip
def test_manifest_pointing_outside_the_tag_is_refused(committed, spy, bad):
    _rewrite_manifest(committed, "t", lambda d: d["files"][0].update(path=bad))
    report = committed.verify("t")
    assert not report.ok and report.problems[0].startswith(f"{MANIFEST_NAME}: ") and "path" in report.problems[0]
    with pytest.raises(ManifestError, match="not a plain relative path|reserved|control"):
        committed.load("t", "sub/opt.pt")
    assert committed.info("t").status == "unreadable"
    assert not [p for p in spy if not p.resolve().is_relative_to((committed.root / "t").resolve())], spy
    record("security", kind="manifest path outside the tag", path=repr(bad), refused=True)


def test_manifest_with_oversized_or_deep_metadata_is_refused_on_read(committed):
    _rewrite_manifest(committed, "t", lambda d: d.update(metadata={"x": "y" * (MAX_METADATA_BYTES + 10)}))
    assert committed.info("t").status == "unreadable"
    with pytest.raises(ManifestError, match="metadata"):
        committed.load("t", "model.pt")
    path = committed.root / "t" / MANIFEST_NAME
    text = path.read_text()
    path.write_text(text.replace('"metadata": {', '"metadata": {"deep": ' + "[" * 200_000 + "]" * 200_000 + ", ", 1))
    infos = {i.tag: i for i in committed.list()}  # one hostile manifest must not break listing
    assert infos["t"].status == "unreadable" and infos["other"].committed
    assert not committed.verify("t").ok
    record("security", kind="manifest with oversized or deeply nested metadata", refused=True)


@pytest.mark.parametrize("what", ["file", "directory"])
def test_symlink_out_of_the_tag_is_never_followed(committed, spy, tmp_path, what):
    tag_dir = committed.root / "t"
    outside = tmp_path / "outside"
    outside.mkdir()
    if what == "file":  # a same-bytes copy outside: the checksum alone would not notice
        (outside / "model.pt").write_bytes((tag_dir / "model.pt").read_bytes())
        (tag_dir / "model.pt").unlink()
        (tag_dir / "model.pt").symlink_to(outside / "model.pt")
        relpath = "model.pt"
    else:
        (outside / "opt.pt").write_bytes((tag_dir / "sub" / "opt.pt").read_bytes())
        for p in (tag_dir / "sub").iterdir():
            p.unlink()
        (tag_dir / "sub").rmdir()
        (tag_dir / "sub").symlink_to(outside, target_is_directory=True)
        relpath = "sub/opt.pt"
    report = committed.verify("t")
    assert report.problems == [f"{relpath}: leads outside the tag directory (a symbolic link); refusing to read it"]
    for kwargs in ({}, {"verify": False}, {"verify": False, "allow_incomplete": True}):
        with pytest.raises(CorruptCheckpointError, match=f"{relpath}: leads outside the tag directory"):
            committed.load("t", relpath, **kwargs)
    assert not [p for p in spy if outside in p.resolve().parents], f"read through the link: {spy}"
    record("security", kind=f"symlinked {what} pointing outside the tag", refused=True)


def test_special_file_is_not_opened(committed, spy):
    tag_dir = committed.root / "t"
    (tag_dir / "model.pt").unlink()
    os.mkfifo(tag_dir / "model.pt")  # opening it for reading would block forever
    assert committed.verify("t").problems == ["model.pt: is not a regular file; refusing to read it"]
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        committed.load("t", "model.pt", verify=False)
    record("security", kind="manifest entry that is a FIFO", refused=True)


def test_engine_never_follows_a_symlink_out_of_the_tag(committed, tmp_path):
    pytest.importorskip("deepspeed")
    from torchckpt import TorchCheckpointEngine

    tag_dir = committed.root / "t"
    outside = tmp_path / "outside.pt"
    outside.write_bytes((tag_dir / "model.pt").read_bytes())
    (tag_dir / "model.pt").unlink()
    (tag_dir / "model.pt").symlink_to(outside)
    for options in ({}, {"verify_on_load": False}):
        with pytest.raises(CorruptCheckpointError, match="leads outside the tag directory"):
            TorchCheckpointEngine(None, **options).load(str(tag_dir / "model.pt"))


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("POSIX file semantics")
