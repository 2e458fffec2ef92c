"""One HF Trainer or Lightning run with DeepSpeed on the CPU, in a process of its own.

``python _trainer_worker.py RESULT_JSON RUN_JSON...``: the runs one after the other, in this process
(``{"kind": "hf"|"lightning", ...}``). The test sets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and
LOCAL_RANK (DeepSpeed tries MPI without them). Tiny models built from configs, data drawn from fixed
seeds, torch's AdamW (no DeepSpeed CPU-Adam build). The outcomes are written as a JSON list to
RESULT_JSON after each run; a run's final weights go to ``run["weights"]`` (torch.save) when given.
``run["flip"] = PATH`` flips a byte in the middle of that file before the run.

``spec["kill"] = {"tag": T, "files": K}`` SIGKILLs the process right after the K-th file of
DeepSpeed tag T is renamed into place: a crash in the middle of that checkpoint's save.
``spec["kill_on_save"] = N`` SIGKILLs it in the Trainer's ``on_save`` of step N (with ``async_save``:
before DeepSpeed's next step commits the checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch


def _kill_in_save(tag: str, files: int) -> None:
    real_replace = os.replace
    seen = []

    def replace(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        if Path(dst).parent.name == tag:
            seen.append(dst)
            if len(seen) >= files:
                os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace


def _full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered when ZeRO-3 partitions them."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _outcome(error: BaseException | None) -> dict:
    if error is None:
        return {}
    return {"error": {"type": type(error).__name__, "message": str(error)}}


# -- HF Trainer ---------------------------------------------------------------------------------
def _hf_dataset(n: int = 64, length: int = 16, vocab: int = 128) -> list[dict]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


class _KillOnSave:
    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class KillOnSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)

        return KillOnSave()


def run_hf(spec: dict) -> dict:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    import torchckpt

    transformers.logging.set_verbosity_error()
    if spec.get("kill"):
        _kill_in_save(spec["kill"]["tag"], spec["kill"]["files"])
    out = spec["out"]
    transformers.set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=16))
    args = TrainingArguments(
        output_dir=out,
        max_steps=spec["max_steps"],
        save_steps=spec["save_steps"],
        save_strategy="steps",
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        optim="adamw_torch",
        deepspeed=_ds_config(spec["stage"]),
        report_to="none",
        disable_tqdm=True,
        logging_steps=10**6,
        seed=0,
        save_total_limit=spec.get("save_total_limit"),
    )
    trainer = Trainer(model=model, args=args, train_dataset=_hf_dataset())
    if spec.get("kill_on_save"):
        trainer.add_callback(_KillOnSave(spec["kill_on_save"]))
    resume = spec.get("resume")
    result: dict = {}
    # "enable": "with" (the default: torchckpt.enable() as a context manager around train) or "plain"
    # (enabled for the rest of the process).
    enabled = torchckpt.enable(**spec.get("options", {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if resume == "committed":
            resume = torchckpt.last_committed_checkpoint(out)
    result["resumed_from"] = resume
    result["warnings"] = [str(w.message) for w in caught if "resum" in str(w.message)]
    try:
        with enabled if spec.get("enable", "with") == "with" else contextlib.nullcontext():
            trainer.train(resume_from_checkpoint=resume)
    except Exception as e:  # noqa: BLE001 - the test reads the error's type and message
        result.update(_outcome(e))
        return result
    engine = trainer.model_wrapped
    result["global_step"] = trainer.state.global_step
    result["engine"] = engine.checkpoint_engine.name
    result["installed"] = [type(e).__name__ for e in enabled.engines]
    store = torchckpt.CheckpointStore(Path(out) / f"checkpoint-{trainer.state.global_step}")
    last = f"global_step{trainer.state.global_step}"
    result["last_status_after_train"] = store.info(last).status if store.tag_dir(last).is_dir() else None
    if spec.get("weights"):
        torch.save(_full_weights(trainer.model), spec["weights"])
    return result


# -- an Accelerate loop of one's own ------------------------------------------------------------------
def run_accelerate(spec: dict) -> dict:
    """Train 4 steps, ``save_state``, 4 more; or (``resume``) ``load_state`` first and train the last 4."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    import torchckpt

    plugin = DeepSpeedPlugin(
        hf_ds_config={
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
        }
    )
    accelerator = Accelerator(deepspeed_plugin=plugin)
    torch.manual_seed(0 if not spec.get("resume") else 1)  # a resume starts from other weights
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torchckpt.enable():
        engine, optimizer = accelerator.prepare(model, optimizer)
    result: dict = {"engine": engine.checkpoint_engine.name}

    def steps(start: int, count: int) -> None:
        for step in range(start, start + count):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
            loss = ((engine(x) - y) ** 2).mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()

    try:
        if spec.get("resume"):
            accelerator.load_state(spec["resume"])
        else:
            steps(0, 4)
            accelerator.save_state(spec["out"])
        steps(4, 4)
    except Exception as e:  # noqa: BLE001 - the test reads the error's type and message
        result.update(_outcome(e))
        return result
    if spec.get("weights"):
        torch.save(_full_weights(engine.module), spec["weights"])
    return result


# -- Lightning ----------------------------------------------------------------------------------
def _lightning():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        """Test only: Lightning's DeepSpeed strategy refuses CPUs; DeepSpeed itself runs on them."""

        def setup_environment(self) -> None:
            self.parallel_devices = [torch.device("cpu", i) for i in range(self.num_processes)]
            DDPStrategy.setup_environment(self)

    class TinyModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

        def training_step(self, batch, _):
            x, y = batch
            return ((self.net(x) - y) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(7)
            data = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g))
            return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)

    return pl, CPUDeepSpeedStrategy, TinyModule


def run_lightning(spec: dict) -> dict:
    pl, CPUDeepSpeedStrategy, TinyModule = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    import torchckpt

    # "via": torchckpt.LightningCallback (the default) or torchckpt.enable() around fit.
    via_enable = spec.get("via") == "enable"
    options = spec.get("options", {})
    saver = ModelCheckpoint(dirpath=spec["out"], every_n_train_steps=spec["save_steps"], save_top_k=-1)
    callbacks = [saver] if via_enable else [torchckpt.LightningCallback(**options), saver]
    strategy = CPUDeepSpeedStrategy(
        config={
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "train_micro_batch_size_per_gpu": 4,
        }
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=spec["max_steps"],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = TinyModule()
    result: dict = {}
    try:
        with torchckpt.enable(**options) if via_enable else contextlib.nullcontext():
            trainer.fit(module, ckpt_path=spec.get("resume"))
    except Exception as e:  # noqa: BLE001 - the test reads the error's type and message
        result.update(_outcome(e))
        return result
    engine = trainer.strategy.deepspeed_engine
    result["global_step"] = trainer.global_step
    result["engine"] = engine.checkpoint_engine.name
    result["checkpoints"] = sorted(p.name for p in Path(spec["out"]).iterdir())
    if spec.get("weights"):
        torch.save(_full_weights(module), spec["weights"])
    return result


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def main(argv: list[str]) -> None:
    results = []
    for spec in map(json.loads, argv[1:]):
        if spec.get("flip"):
            _flip_byte(spec["flip"])
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed and the trainers print their set-up
            results.append({"hf": run_hf, "lightning": run_lightning, "accelerate": run_accelerate}[spec["kind"]](spec))
        results[-1]["seconds"] = round(time.perf_counter() - start, 2)
        Path(argv[0]).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
