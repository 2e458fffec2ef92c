"""torchckpt.file_structure: the structure of checkpoint files, without reading tensor data or running pickled code."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile

import pytest
import torch

from torchckpt.file_structure import foreign_globals, inspect_file
from torchckpt.layout import MANIFEST_NAME, origin


def sample_state():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    base = torch.arange(10, dtype=torch.int64)
    return {
        "model": lin.state_dict(),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "half": torch.zeros(5, dtype=torch.bfloat16),
        "f8": torch.zeros(3, dtype=torch.float8_e4m3fn),
        "meta": torch.empty(2, 7, device="meta"),
        "view": base[2:5],
        "same": base,
        "step": 7,
        "betas": (0.9, 0.999),
        "name": "run-1",
    }


def save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_names_shapes_dtypes_devices(tmp_path, fmt):
    s = inspect_file(save(sample_state(), tmp_path / "x.pt", fmt))
    assert s.error is None and s.format == fmt
    t = {m.name: m for m in s.tensors}
    assert set(t) == {"model.weight", "model.bias", "param", "half", "f8", "meta", "view", "same"}
    assert (t["model.weight"].shape, t["model.weight"].dtype, t["model.weight"].device) == ((3, 4), "float32", "cpu")
    assert t["param"].parameter and t["param"].requires_grad and not t["model.weight"].parameter
    assert (t["half"].dtype, t["f8"].dtype) == ("bfloat16", "float8_e4m3fn")
    assert (t["meta"].shape, t["meta"].device, t["meta"].storage) == ((2, 7), "meta", None)
    # A view records its offset into the storage it shares with the whole tensor.
    assert t["view"].storage == t["same"].storage and (t["view"].offset, t["view"].shape) == (2, (3,))
    assert s.storages[t["same"].storage] == 80 and t["view"].nbytes == 24
    values = {v.name: v.value for v in s.values}
    assert values == {"step": "7", "betas": "(0.9, 0.999)", "name": "'run-1'"}
    assert "torch._utils._rebuild_tensor_v2" in s.globals
    assert ("legacy" in " ".join(s.notes)) == (fmt == "legacy")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_tensor_data_is_never_read(tmp_path, fmt):
    """The tensor bytes can be missing altogether: the structure is still described."""
    path = save({"w": torch.randn(1000, 100)}, tmp_path / "x.pt", fmt)
    if fmt == "legacy":
        with open(path, "r+b") as f:  # drop the storages: only the pickles remain
            f.truncate(os.path.getsize(path) - 400_000)
    else:
        _rewrite_zip(path, lambda name, data: None if "/data/" in name else data)
    s = inspect_file(path)
    assert s.error is None and path.stat().st_size < 10_000
    assert [(m.name, m.shape) for m in s.tensors] == [("w", (1000, 100))]
    assert any(("truncated" if fmt == "legacy" else "missing from the archive") in n for n in s.notes)


def test_zip_without_crc(tmp_path):
    """torchckpt's own saves carry no zip CRC-32 (torch.load never checks it): still described."""
    from torchckpt import CheckpointStore

    store = CheckpointStore(tmp_path)
    with store.transaction("t") as tx:
        tx.write("state.pt", {"ema": {"w": torch.ones(2)}})
        tx.commit()
    s = inspect_file(tmp_path / "t" / "state.pt")
    assert s.error is None and [m.name for m in s.tensors] == ["ema.w"]


def _rewrite_zip(path, change):
    src = zipfile.ZipFile(path)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = change(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info, data)
    path.write_bytes(out.getvalue())


def _with_location(path, old: bytes, new: bytes):
    """Rewrite the saved location of every storage, as if saved on another device."""
    old_op, new_op = b"X" + struct.pack("<I", len(old)) + old, b"X" + struct.pack("<I", len(new)) + new

    def change(name, data):
        if name.endswith("data.pkl"):
            assert old_op in data
            return data.replace(old_op, new_op)
        return data

    _rewrite_zip(path, change)


def test_device_saved_on_is_reported(tmp_path):
    path = save({"w": torch.ones(3)}, tmp_path / "x.pt", "zip")
    _with_location(path, b"cpu", b"cuda:1")
    assert [(m.name, m.device) for m in inspect_file(path).tensors] == [("w", "cuda:1")]


@pytest.mark.gpu
def test_device_of_a_real_cuda_save(tmp_path):
    path = save({"w": torch.ones(3, device="cuda:0"), "c": torch.ones(2)}, tmp_path / "x.pt", "zip")
    assert {m.name: m.device for m in inspect_file(path).tensors} == {"w": "cuda:0", "c": "cpu"}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evil2:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pickled_code_never_runs(tmp_path, fmt):
    marker, marker2 = tmp_path / "pwned", tmp_path / "pwned2"
    payload = {"w": torch.ones(2), "evil": _Evil(marker), "evil2": [_Evil2(marker2)]}
    path = tmp_path / "evil.pt"
    torch.save(payload, path, _use_new_zipfile_serialization=(fmt == "zip"))
    s = inspect_file(path)
    assert not marker.exists() and not marker2.exists()
    assert s.error is None and [m.name for m in s.tensors] == ["w"]
    values = {v.name: v.type for v in s.values}
    assert values["evil"] == f"{os.system.__module__}.system" and values["evil2.0"] == "builtins.eval"
    assert foreign_globals(s) == {f"{os.system.__module__}.system": "needs --allow", "builtins.eval": "needs --allow"}


def test_allowlisted_classes_are_told_apart(tmp_path):
    import argparse

    path = save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "x.pt", "zip")
    s = inspect_file(path)
    assert foreign_globals(s) == {"argparse.Namespace": "allowed"}
    assert {v.name: v.value for v in s.values} == {"args.lr": "0.1"}


def test_safetensors_header(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, str(path), metadata={"step": "5"})
    s = inspect_file(path)
    assert s.format == "safetensors" and s.error is None
    assert {(m.name, m.shape, m.dtype, m.device) for m in s.tensors} == {("a", (2, 3), "float32", None), ("b", (4,), "bfloat16", None)}
    assert [(v.name, v.value) for v in s.values] == [("__metadata__.step", "'5'")]
    assert s.tensor_bytes == 24 + 8 and any("device" in n for n in s.notes)


def test_files_that_are_not_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    assert "neither a torch.save file" in inspect_file(junk).error
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"a": 1}))
    assert "is a pickle, not a torch.save file" in inspect_file(plain).error
    torn = tmp_path / "torn.pt"
    torn.write_bytes(save({"w": torch.ones(3)}, tmp_path / "x.pt", "zip").read_bytes()[:200])
    assert inspect_file(torn).error.startswith("torn.pt is not a readable torch.save file")
    assert "cannot read missing.pt" in inspect_file(tmp_path / "missing.pt").error


def test_origin(tmp_path):
    ds, ours, other = tmp_path / "ds", tmp_path / "ours", tmp_path / "other"
    for d in (ds, ours, other):
        d.mkdir()
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    (ds / "layer_00-model_states.pt").write_bytes(b"")  # a pipeline layer file
    (ours / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ours / ".torchckpt-writing").write_bytes(b"")
    (other / "weights.bin").write_bytes(b"")
    assert (origin(ds), origin(ours), origin(other), origin(tmp_path / "nope")) == ("deepspeed", "torchckpt", "unknown", "unknown")
    (ds / MANIFEST_NAME).write_text("{}")
    assert origin(ds) == "torchckpt"
