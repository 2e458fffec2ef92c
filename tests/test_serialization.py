import argparse
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from torchckpt import serialization
from torchckpt.errors import DeviceUnavailableError, UnsafeCheckpointError

CUDA_FIXTURE = Path(__file__).parent / "data" / "saved_on_cuda0.pt"


def _save(path, obj):
    with open(path, "wb") as f:
        serialization.save(obj, f)
    return path


class Exploit:
    """Unpickling this would create a marker file (our stand-in for running arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_is_plain_torch_load_compatible(tmp_path):
    state = {"w": torch.randn(4, 5), "n": 3, "nested": [torch.ones(2, dtype=torch.int8), "s"]}
    path = _save(tmp_path / "s.pt", state)
    for loaded in (serialization.load(path), torch.load(path, weights_only=True)):
        assert torch.equal(loaded["w"], state["w"]) and loaded["n"] == 3
        assert loaded["nested"][1] == "s" and loaded["nested"][0].dtype == torch.int8


def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"payload": Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"io.open.*allow=\['io.open'\].*trusted=True") as info:
        serialization.load(path)
    assert info.value.globals_needed == ["io.open"]
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists(), "safe loading must not run the pickle's code"


def test_trusted_runs_the_pickle(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"payload": Exploit(marker)}, path)
    serialization.load(path, trusted=True)
    assert marker.exists()


class Point:
    def __init__(self, x):
        self.x = x


def test_allow_by_object_or_name(tmp_path):
    path = tmp_path / "ns.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "p": Point(2)}, path)
    with pytest.raises(UnsafeCheckpointError, match="test_serialization.Point"):
        serialization.load(path)
    loaded = serialization.load(path, allow=[Point])
    assert loaded["p"].x == 2 and loaded["args"].lr == 0.1
    assert serialization.load(path, allow=[f"{__name__}.Point"])["p"].x == 2


def test_deepspeed_globals_are_on_the_shipped_allowlist():
    for name in (
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    ):
        assert name in serialization.DEFAULT_ALLOWLIST
        assert serialization.resolve_global(name) is not None


def test_map_location_auto_and_unavailable_cuda(tmp_path):
    path = _save(tmp_path / "s.pt", {"w": torch.ones(2)})
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert serialization.load(path, map_location="auto")["w"].device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available here; use map_location='cpu' or 'auto'"):
            serialization.load(path, map_location="cuda:0")


@pytest.mark.parametrize("location", ["cpu", "auto", torch.device("cpu"), {"cuda:0": "cpu"}, lambda s, loc: s])
def test_gpu_written_checkpoint_loads_on_cpu(location):
    if torch.cuda.is_available() and location == "auto":
        pytest.skip("auto means CUDA on this machine")
    state = serialization.load(CUDA_FIXTURE, map_location=location)
    assert state["weight"].device.type == "cpu"
    assert torch.equal(state["weight"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert state["step"] == 7


def test_gpu_written_checkpoint_without_map_location_explains_the_fix():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceUnavailableError, match="saved on a CUDA device.*map_location='cpu'"):
        serialization.load(CUDA_FIXTURE)


@pytest.mark.gpu
def test_gpu_written_checkpoint_loads_on_gpu():
    state = serialization.load(CUDA_FIXTURE, map_location="auto")
    assert state["weight"].is_cuda


def test_mmap_load_does_not_copy_the_file(tmp_path):
    big = torch.randn(1 << 20)
    path = _save(tmp_path / "big.pt", {"big": big})
    loaded = serialization.load(path, map_location="cpu")
    assert torch.equal(loaded["big"], big)
    # A memory-mapped storage is backed by the file, not by fresh anonymous memory.
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    assert str(path) in maps


def test_legacy_format_still_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(serialization.load(path)["w"], torch.ones(3))
    marker = tmp_path / "m"
    torch.save({"x": Exploit(marker)}, tmp_path / "legacy_evil.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        serialization.load(tmp_path / "legacy_evil.pt")
    assert not marker.exists()


def test_save_writes_zip_format():
    buf = io.BytesIO()
    serialization.save({"a": torch.zeros(1)}, buf)
    assert buf.getvalue()[:4] == b"PK\x03\x04"


def test_save_skips_the_zip_crc_and_stays_loadable_by_plain_torch_load(tmp_path):
    import zipfile

    assert serialization._fast_save_available(), "torch's private save steps changed: saves compute CRC-32 again"
    state = {"w": torch.randn(100, 10), "i": torch.arange(5)}
    path = _save(tmp_path / "s.pt", state)
    assert all(info.CRC == 0 for info in zipfile.ZipFile(path).infolist())
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["i"], state["i"])
