"""Shared fixtures and markers for torchckpt's tests."""

from __future__ import annotations

import os

import pytest
import torch
from _net import free_port


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


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
        os.environ["MASTER_PORT"] = str(free_port(range(29500, 29600)))
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return dist
