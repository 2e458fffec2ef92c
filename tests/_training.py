"""A tiny deterministic DeepSpeed training loop shared by the in-process engine tests."""

from __future__ import annotations

import torch


def make_engine(stage: int, seed: int, *, scheduler: bool = True, zero: dict | None = None, **config_extra):
    """A DeepSpeed engine over a small MLP (CPU, torch's Adam), weights drawn from ``seed``.
    ``zero`` adds keys to ``zero_optimization``; ``config_extra`` adds top-level config keys."""
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    config = {
        "train_batch_size": 4,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage, **(zero or {})},
        "steps_per_print": 10**9,
        **config_extra,
    }
    if scheduler:
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 4, "warmup_max_lr": 1e-2}}
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    return engine


def batch(step: int):
    """The batch of a step: the same for every run, so resumed training is comparable."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)


def train(engine, start: int, steps: int, *, batch_of=batch) -> list[float]:
    """Train ``steps`` steps from ``start``; the losses, as Python floats."""
    losses = []
    for step in range(start, start + steps):
        x, y = batch_of(step)
        loss = ((engine(x) - y) ** 2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def params(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
