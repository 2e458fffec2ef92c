"""``python -m torchckpt``: the same as the ``torchckpt`` command."""

from .cli import main

raise SystemExit(main())
