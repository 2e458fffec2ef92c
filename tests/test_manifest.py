import json

import pytest
import torch

from torchckpt.errors import InvalidTagError, ManifestError
from torchckpt.layout import MANIFEST_NAME
from torchckpt.manifest import (
    FileRecord,
    Manifest,
    check_metadata,
    read_manifest,
    validate_relpath,
    validate_tag,
    write_manifest,
)


@pytest.mark.parametrize("tag", ["step-100", "global_step7", "v1.2", "ünïcode", "a b"])
def test_valid_tags(tag):
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    "tag, message",
    [
        ("", "tag is empty"),
        (".", "names a directory itself"),
        ("..", "names a directory itself"),
        ("a/b", "path separator"),
        ("../etc", "path separator"),
        ("a\\b", "path separator"),
        ("a\0b", "path separator"),
        ("tab\there", "control character"),
        ("new\nline", "control character"),
        (" padded", "whitespace"),
        ("latest", "reserved"),
        (".torchckpt-x", "reserved"),
        ("x" * 201, "at most 200"),
        (3, "must be a string, got int"),
        (None, "must be a string, got NoneType"),
    ],
)
def test_invalid_tags_are_refused(tag, message):
    with pytest.raises(InvalidTagError, match=message):
        validate_tag(tag)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../b", "", "./a", "a//b", MANIFEST_NAME, ".torchckpt-rank-0.json"])
def test_unsafe_relpaths_are_refused(path):
    with pytest.raises(ManifestError):
        validate_relpath(path)


def test_metadata_rules():
    assert check_metadata({"step": 3, "metrics": {"loss": torch.tensor(0.5)}}) == {"step": 3, "metrics": {"loss": 0.5}}
    with pytest.raises(ManifestError, match="not plain JSON"):
        check_metadata({"f": object()})
    with pytest.raises(ManifestError, match="not plain JSON"):
        check_metadata({"nan": float("nan")})
    with pytest.raises(ManifestError, match="at most 1048576"):
        check_metadata({"blob": "x" * (1 << 20)})
    with pytest.raises(ManifestError, match="must be a dict"):
        check_metadata(["a"])


def _manifest(tag="t"):
    return Manifest(tag=tag, created=1.5, files={"a.pt": FileRecord("a.pt", 3, "xxh3_128:00")}, metadata={"step": 1})


def test_manifest_round_trip(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    write_manifest(d, _manifest())
    assert read_manifest(d) == _manifest()
    assert read_manifest(tmp_path) is None


def test_manifest_pointing_outside_is_refused(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    doc = json.loads(_manifest().to_json())
    doc["files"][0]["path"] = "../../etc/passwd"
    (d / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="not a plain relative path"):
        read_manifest(d)


def test_manifest_for_another_tag_is_refused(tmp_path):
    d = tmp_path / "copy"
    d.mkdir()
    write_manifest(d, _manifest("original"))
    with pytest.raises(ManifestError, match="names tag 'original', not 'copy'"):
        read_manifest(d)


@pytest.mark.parametrize("text, message", [("{", "not valid JSON"), ("[]", "not a torchckpt/1"), ('{"format": "torchckpt/1"}', "malformed")])
def test_broken_manifests(tmp_path, text, message):
    d = tmp_path / "t"
    d.mkdir()
    (d / MANIFEST_NAME).write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(d)


def test_checkpoint_meta_reads_every_field_torchckpt_writes_and_tolerates_bad_ones():
    from torchckpt.manifest import CheckpointMeta, SavedObjectMeta

    good = CheckpointMeta.parse({
        "format": "torchckpt-notebook/1", "step": 7, "metrics": {"loss": 0.5}, "note": "n", "rng": "rng.pt",
        "parent": "step-6", "objects": {"model": {"kind": "module", "type": "torch.nn.Linear", "file": "objects/model.pt"}},
        "adopted": {"origin": "deepspeed"},
    })
    assert (good.step, good.metrics, good.note, good.rng, good.parent) == (7, {"loss": 0.5}, "n", "rng.pt", "step-6")
    assert good.objects == {"model": SavedObjectMeta("module", "objects/model.pt", "torch.nn.Linear")}
    assert good.extra == {"adopted": {"origin": "deepspeed"}} and good.problems == ()
    # A hand-edited or foreign manifest: each bad field reads as absent, and says why.
    bad = CheckpointMeta.parse({"step": "7", "metrics": [1], "note": 3, "rng": None, "parent": "../x",
                                "objects": {"a": {"kind": 1}, "b": {"kind": "value", "file": None}}})
    assert (bad.step, bad.metrics, bad.note, bad.parent) == (None, {}, None, None)
    assert bad.objects == {"b": SavedObjectMeta("value", None, "")}
    assert len(bad.problems) == 5 and any("step is str" in p for p in bad.problems)
    assert CheckpointMeta.parse({}) == CheckpointMeta() and CheckpointMeta.parse(None) == CheckpointMeta()
    assert CheckpointMeta.parse([1]).problems
