"""DeepSpeed's names on disk, and who wrote a tag directory. Imports neither torch nor DeepSpeed
(the CLI's ``ls`` uses it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..manifest import started_by_torchckpt

#: File names DeepSpeed's engines write into a tag directory.
DEEPSPEED_FILE = re.compile(
    r"^(mp_rank_\d+_model_states"
    r"|(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_(optim|model)_states"
    r"|layer_\d+(-model_\d+)?-model_states"
    r"|(expp_rank_\d+_)?mp_rank_\d+_optim_states"
    r"|(layer_\d+_)?expert_\d+_mp_rank_\d+_model_states)\.pt$"
)


def origin(tag_dir: Path) -> str:
    """Who wrote a tag directory, from its names alone.

    Returns ``"torchckpt"`` (its manifest, writing marker or a rank's file list is there), ``"deepspeed"``
    (DeepSpeed's file names and nothing of torchckpt's: DeepSpeed's own engine wrote it) or
    ``"unknown"``.
    """
    if started_by_torchckpt(tag_dir):
        return "torchckpt"
    try:
        names = os.listdir(tag_dir)
    except OSError:
        return "unknown"
    if any(DEEPSPEED_FILE.match(n) for n in names):
        return "deepspeed"
    return "unknown"
