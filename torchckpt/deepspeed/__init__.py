"""Everything torchckpt knows about DeepSpeed, and the only place that imports it.

- ``engine``: ``TorchCheckpointEngine`` (DeepSpeed's ``CheckpointEngine`` over the store) and
  ``install``.
- ``enable``: ``torchckpt.enable()``, installing on every engine ``deepspeed.initialize`` creates
  (HF Trainer / Accelerate, Lightning, any code).
- ``hf``: ``last_committed_checkpoint``, the HF Trainer checkpoint a resume can load.
- ``lightning``: ``LightningCallback``, installing on one Lightning Trainer's engine.

Importing this package does not import DeepSpeed; its modules do.
"""
