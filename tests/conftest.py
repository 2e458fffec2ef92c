"""Shared fixtures and markers for torchckpt's tests."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

import pytest

_MISSING = [what for module, what in (("torch", "PyTorch"), ("torchckpt", "torchckpt"))
            if importlib.util.find_spec(module) is None]
if not _MISSING:
    import torch

from _net import free_port  # noqa: E402


def pytest_configure(config):
    if _MISSING:  # one line, instead of an ImportError with a traceback for every test module
        pytest.exit(f"{' and '.join(_MISSING)} not installed in this Python ({sys.executable}): run the tests with "
                    "./dev test (it sets everything up), or pip install -e '.[dev]' here", returncode=4)


#: ./dev test --fast: the pure-Python unit tests (no subprocesses, DeepSpeed, IPython or browser), ~10 s.
FAST_FILES = frozenset({
    "test_errors.py", "test_manifest.py", "test_fileio.py", "test_file_structure.py", "test_state.py",
    "test_serialization.py", "test_store.py", "test_diff.py", "test_bad_input_python.py", "test_inplace.py",
})


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if Path(str(item.fspath)).name in FAST_FILES:
            item.add_marker(pytest.mark.fast)


@pytest.fixture
def root(tmp_path):
    """A fresh checkpoint root."""
    return tmp_path / "ckpts"


@pytest.fixture(scope="session")
def ds_dist():
    """torch.distributed initialised once per test session: one gloo rank on 127.0.0.1.

    Every in-process DeepSpeed test uses this fixture rather than initialising on its own.
    """
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        # DeepSpeed reads these again in every initialize(), so they stay set for the session.
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
        for attempt in range(5):  # a port found free can be taken by another process before we listen
            os.environ["MASTER_PORT"] = str(free_port(range(29500, 29600)))
            try:
                deepspeed.init_distributed(dist_backend="gloo", verbose=False)
                break
            except RuntimeError as e:  # torch.distributed.DistNetworkError: EADDRINUSE
                if "EADDRINUSE" not in str(e) or attempt == 4:
                    raise
    return dist


@pytest.fixture
def held_writes(monkeypatch):
    """Background writes wait until the test calls the fixture's value (released at teardown too)."""
    import torchckpt.serialization

    gate = threading.Event()
    real = torchckpt.serialization.save

    def held(obj, stream, **kwargs):
        assert gate.wait(60), "held_writes: never released"
        return real(obj, stream, **kwargs)

    monkeypatch.setattr(torchckpt.serialization, "save", held)
    yield gate.set
    gate.set()
