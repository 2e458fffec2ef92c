"""Checkpoint roots written by a real DeepSpeed engine on CPU, for the CLI and interop tests.

One root holds three tags of the same engine after one training step:

- ``ds-zip``:    DeepSpeed's own engine as ``deepspeed.initialize`` configures it (zip format);
- ``ds-legacy``: DeepSpeed's own ``TorchCheckpointEngine()`` without a config, which writes
  torch's legacy (non-zip) format;
- ``ours``:      torchckpt's engine (``torchckpt.install``), committed with a manifest.

DeepSpeed itself writes ``latest`` after each save; the last save is ``ours``.
"""

from __future__ import annotations

from pathlib import Path

import torch

OWN_TAGS = ("ds-zip", "ds-legacy")


def make_engine(stage: int = 1):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    config = {
        "train_batch_size": 2,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    loss = engine(torch.randn(2, 4)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return engine


def write_root(engine, root: Path) -> Path:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    import torchckpt

    original = engine.checkpoint_engine
    try:
        engine.save_checkpoint(str(root), tag="ds-zip")
        engine.checkpoint_engine = TorchCheckpointEngine()  # config_params=None: legacy format
        engine.save_checkpoint(str(root), tag="ds-legacy")
        torchckpt.install(engine)
        engine.save_checkpoint(str(root), tag="ours")
    finally:
        engine.checkpoint_engine = original
    return root
