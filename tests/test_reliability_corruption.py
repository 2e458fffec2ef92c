"""Corruption: flipped bytes, truncated or missing files, hand-edited manifests.

`verify` names every damaged file; `load` refuses a damaged checkpoint with a clear error
unless told otherwise (``verify=False``), and the store's other checkpoints are unaffected.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _reliability import count, record, rng

from torchckpt import CheckpointStore, LatestFallbackWarning
from torchckpt.errors import CorruptCheckpointError, FileNotInCheckpointError, ManifestError
from torchckpt.layout import MANIFEST_NAME

FILES = {"model.pt": {"w": torch.arange(4096.0), "b": torch.ones(3)}, "sub/optim.pt": {"step": 7, "m": torch.zeros(512)}}


@pytest.fixture
def store(root):
    store = CheckpointStore(root)
    for tag in ("other", "good"):
        with store.transaction(tag) as tx:
            for relpath, obj in FILES.items():
                tx.write(relpath, obj)
            tx.commit(metadata={"step": 7})
    assert store.latest() == "good"
    return store


def _assert_other_intact(store: CheckpointStore) -> None:
    assert store.verify("other").ok
    assert torch.equal(store.load("other", "model.pt")["w"], FILES["model.pt"]["w"])


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("relpath", list(FILES))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_is_named_by_verify_and_refused_by_load(store, relpath, where):
    path = store.root / "good" / relpath
    size = path.stat().st_size
    _flip(path, {"first": 0, "middle": size // 2, "last": size - 1}[where])
    report = store.verify("good")
    assert not report.ok and report.files_checked == 2
    assert report.problems == [f"{relpath}: checksum mismatch (bytes changed since commit)"]
    with pytest.raises(CorruptCheckpointError, match=rf"'good' is corrupt: {relpath}: checksum mismatch.*verify=False"):
        store.load("good", relpath)
    _assert_other_intact(store)
    record("corruption", kind="flipped byte", where=where, file=relpath, detected=True, refused=True)


@pytest.mark.slow
def test_random_byte_flips_are_always_detected(store):
    r = rng("flips")
    trials = count(20, 300)
    for _ in range(trials):
        relpath = r.choice(list(FILES))
        path = store.root / "good" / relpath
        original = path.read_bytes()
        offset = r.randrange(len(original))
        data = bytearray(original)
        data[offset] ^= r.randrange(1, 256)
        path.write_bytes(bytes(data))
        assert store.verify("good").problems == [f"{relpath}: checksum mismatch (bytes changed since commit)"]
        with pytest.raises(CorruptCheckpointError, match=relpath):
            store.load("good", relpath)
        path.write_bytes(original)
        assert store.verify("good").ok
    record("corruption", kind="random byte flips", trials=trials, detected=trials, refused=trials)


def test_corrupt_file_loads_when_explicitly_asked(store):
    path = store.root / "good" / "model.pt"
    data = path.read_bytes()
    # the tensor data is the last large record: change one float's bytes inside it
    raw = FILES["model.pt"]["w"].numpy().tobytes()
    at = data.index(raw[4 * 100 : 4 * 104])
    path.write_bytes(data[:at] + torch.tensor([-1.0]).numpy().tobytes() + data[at + 4 :])
    with pytest.raises(CorruptCheckpointError):
        store.load("good", "model.pt")
    state = store.load("good", "model.pt", verify=False)
    assert state["w"][100] == -1.0 and state["w"][101] == 101.0


@pytest.mark.parametrize("keep", [0, 1, "half", "all-but-one"])
def test_truncated_file(store, keep):
    path = store.root / "good" / "model.pt"
    size = path.stat().st_size
    new_size = {"half": size // 2, "all-but-one": size - 1}.get(keep, keep)
    with open(path, "r+b") as f:
        f.truncate(new_size)
    problem = f"model.pt: size {new_size} bytes, manifest says {size} (truncated or replaced)"
    assert store.verify("good").problems == [problem]
    with pytest.raises(CorruptCheckpointError, match=r"model\.pt: size .* \(truncated or replaced\)"):
        store.load("good", "model.pt")
    assert store.load("good", "sub/optim.pt")["step"] == 7, "an intact file of the tag still loads"
    _assert_other_intact(store)
    record("corruption", kind="truncated file", keep=str(keep), detected=True, refused=True)


def test_missing_file(store):
    (store.root / "good" / "sub" / "optim.pt").unlink()
    assert store.verify("good").problems == ["sub/optim.pt: missing"]
    with pytest.raises(CorruptCheckpointError, match=r"sub/optim\.pt: missing"):
        store.load("good", "sub/optim.pt")
    _assert_other_intact(store)
    record("corruption", kind="missing file", detected=True, refused=True)


def test_file_replaced_by_another_checkpoints_copy(store):
    """A same-named file from another save (a classic copy mistake) is caught by its checksum."""
    with store.transaction("third") as tx:
        tx.write("model.pt", {"w": torch.arange(4096.0) * 2, "b": torch.ones(3)})
        tx.commit()
    (store.root / "good" / "model.pt").write_bytes((store.root / "third" / "model.pt").read_bytes())
    assert store.verify("good").problems == ["model.pt: checksum mismatch (bytes changed since commit)"]
    record("corruption", kind="file swapped with another checkpoint's", detected=True, refused=True)


def _edit_manifest(store: CheckpointStore, tag: str, edit) -> None:
    path = store.root / tag / MANIFEST_NAME
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _file_entry(doc, relpath):
    return next(f for f in doc["files"] if f["path"] == relpath)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda d: _file_entry(d, "model.pt").update(checksum="xxh3_128:" + "0" * 32), "model.pt: checksum mismatch"),
        (lambda d: _file_entry(d, "model.pt").update(size=_file_entry(d, "model.pt")["size"] + 1), "model.pt: size"),
        (lambda d: _file_entry(d, "sub/optim.pt").update(path="sub/renamed.pt"), "sub/renamed.pt: missing"),
    ],
    ids=["checksum", "size", "path"],
)
def test_manifest_edited_by_hand_names_the_file(store, edit, problem):
    _edit_manifest(store, "good", edit)
    report = store.verify("good")
    assert len(report.problems) == 1 and report.problems[0].startswith(problem), report.problems
    relpath = problem.split(":")[0]
    with pytest.raises(CorruptCheckpointError, match=rf"{relpath}"):
        store.load("good", relpath)
    _assert_other_intact(store)
    record("corruption", kind="manifest edited: file " + problem.split(": ")[1].split()[0], detected=True, refused=True)


@pytest.mark.parametrize(
    "text, message",
    [
        (lambda t: t[: len(t) // 2], "is not valid JSON"),
        (lambda t: "", "is not valid JSON"),
        (lambda t: t.replace('"tag": "good"', '"tag": "other"'), "names tag 'other', not 'good': it was copied or edited"),
        (lambda t: t.replace('"format": "torchckpt/1"', '"format": "torchckpt/99"'), "is not a torchckpt/1 manifest"),
        (lambda t: t.replace('"files": [', '"files": 7, "x": ['), "is malformed"),
        (lambda t: b"\xff\xfe" + t.encode(), "is not UTF-8 text"),
    ],
    ids=["truncated", "empty", "wrong-tag", "wrong-format", "malformed", "binary"],
)
def test_unreadable_manifest(store, text, message):
    path = store.root / "good" / MANIFEST_NAME
    original = path.read_text()
    edited = text(original)
    path.write_bytes(edited if isinstance(edited, bytes) else edited.encode())
    report = store.verify("good")
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{MANIFEST_NAME}: manifest ")
    assert message in report.problems[0], report.problems
    info = store.info("good")
    assert info.status == "unreadable" and not info.committed
    with pytest.raises(ManifestError, match=message):
        store.load("good", "model.pt")
    # `latest` names it, but the manifests are the truth: the newest readable tag is used
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.latest() == "other"
    assert any(issubclass(w.category, LatestFallbackWarning) for w in caught)
    _assert_other_intact(store)
    record("corruption", kind="manifest unreadable: " + message, detected=True, refused=True)


def test_unlisted_file_is_not_loadable_from_a_committed_tag(store):
    _edit_manifest(store, "good", lambda d: d.update(files=[f for f in d["files"] if f["path"] != "model.pt"]))
    with pytest.raises(FileNotInCheckpointError, match="'good' has no file 'model.pt'; it has: sub/optim.pt"):
        store.load("good", "model.pt")


def test_engine_refuses_a_corrupt_file(store):
    pytest.importorskip("deepspeed")
    from torchckpt import TorchCheckpointEngine

    path = store.root / "good" / "model.pt"
    data = path.read_bytes()
    at = data.index(FILES["model.pt"]["w"].numpy().tobytes()[400:404])  # the float w[100]
    path.write_bytes(data[:at] + torch.tensor([-1.0]).numpy().tobytes() + data[at + 4 :])
    engine = TorchCheckpointEngine(None)
    with pytest.raises(CorruptCheckpointError, match=r"'good' is corrupt: model\.pt: checksum mismatch"):
        engine.load(str(path))
    assert engine.load(str(store.root / "good" / "sub" / "optim.pt"))["step"] == 7
    lenient = TorchCheckpointEngine(None, verify_on_load=False)
    assert lenient.load(str(path), map_location="cpu")["w"][100] == -1.0
    record("corruption", kind="engine load of a flipped byte", detected=True, refused=True)


def test_unreadable_manifest_can_be_bypassed_only_explicitly(store):
    (store.root / "good" / MANIFEST_NAME).write_text("{ torn")
    for kwargs in ({}, {"verify": False}, {"allow_incomplete": True}):
        with pytest.raises(ManifestError, match="to read its files anyway, load with verify=False, allow_incomplete=True"):
            store.load("good", "model.pt", **kwargs)
    state = store.load("good", "model.pt", verify=False, allow_incomplete=True)
    assert torch.equal(state["w"], FILES["model.pt"]["w"])
    record("corruption", kind="unreadable manifest: explicit bypass", detected=True, refused=True)
