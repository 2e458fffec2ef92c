"""Everything torchckpt knows about DeepSpeed, and the only place that imports it.

- ``engine``: ``TorchCheckpointEngine`` (DeepSpeed's ``CheckpointEngine`` over the store) and
  ``install``.

Importing this package does not import DeepSpeed; its modules do.
"""
