"""``torchckpt.LightningCallback``: torchckpt's checkpoint engine for one Lightning ``Trainer``.

Lightning's ``DeepSpeedStrategy`` creates the DeepSpeed engine in ``setup`` and restores
``fit(ckpt_path=...)`` after ``Callback.on_fit_start``: an engine installed there reads the resume
files, and every later ``save_checkpoint`` writes through it. Unlike :func:`torchckpt.enable`
nothing process-wide is patched.
"""

from __future__ import annotations

from typing import Any

try:  # the unified package, else the standalone one (the same classes under another name)
    from lightning.pytorch import Callback
except ModuleNotFoundError as missing_lightning:  # pragma: no cover - depends on what is installed
    try:
        # the same class under the standalone package's module path, which mypy sees as another type
        from pytorch_lightning import Callback  # type: ignore[assignment]
    except ModuleNotFoundError:
        raise missing_lightning from None  # named as `lightning`: torchckpt[trainers] installs it

from .enable import _check_options, _commit_pending
from .engine import TorchCheckpointEngine, install


class LightningCallback(Callback):
    """Install torchckpt on the ``DeepSpeedStrategy``'s engine, before Lightning restores a checkpoint.

    ``on_fit_start`` installs (Lightning's restore of ``fit(ckpt_path=...)`` comes after it, so the
    resume is verified and weights-only); ``on_fit_end`` commits a checkpoint that ``async_save``
    left pending (DeepSpeed would commit it at the next step, and there is none). An engine that
    already has torchckpt (from :func:`torchckpt.enable`) is left as it is. ``validate``, ``test``
    and ``predict`` have no such hook before their restore: use :func:`torchckpt.enable` there.

    Args:
        **options: fields of :class:`~torchckpt.deepspeed.engine.EngineOptions`, checked now.

    Raises:
        TypeError: an unknown option; or, at ``fit``, a strategy other than DeepSpeed's.
        ValueError: a bad option value.

    Example:
        >>> trainer = L.Trainer(strategy="deepspeed_stage_2", callbacks=[torchckpt.LightningCallback()])
        >>> trainer.fit(model, ckpt_path="last")
    """

    def __init__(self, **options: Any):
        _check_options(options)
        self.options = options

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        engine = _engine_of(trainer)
        if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
            install(engine, **self.options)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        _commit_pending(_engine_of(trainer), "at the end of fit")


def _engine_of(trainer: Any) -> Any:
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    if engine is None:
        raise TypeError(
            f"torchckpt.LightningCallback needs Lightning's DeepSpeed strategy, not {type(trainer.strategy).__name__}; "
            'use Trainer(strategy="deepspeed_stage_2") or another DeepSpeedStrategy'
        )
    return engine
