"""Shared fixtures and markers for torchckpt's tests."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def root(tmp_path):
    """A fresh checkpoint root."""
    return tmp_path / "ckpts"


@pytest.fixture(autouse=True)
def _no_deepspeed_env_leak(monkeypatch):
    # DeepSpeed reads these; tests that need them set them explicitly.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name in os.environ and "TORCHCKPT_KEEP_DIST_ENV" not in os.environ:
            monkeypatch.delenv(name)
