"""Every name torchckpt, DeepSpeed and the notebook put on disk, and who wrote a tag directory.

This module is the one owner of the on-disk layout (docs/ARCHITECTURE.md, "On-disk contract"):
the store, the manifest, the notebook, the DeepSpeed engine and the CLI take names from here and
spell none of their own. It imports nothing of torchckpt's and neither torch nor DeepSpeed, so the
CLI's ``ls`` can use it.

::

    ROOT/latest                          LATEST_NAME
    ROOT/.torchckpt.lock                 LOCK_NAME
    ROOT/.torchckpt-trash-<tag>-<rand>   TRASH_PREFIX: a deletion in progress
    ROOT/TAG/torchckpt-manifest.json     MANIFEST_NAME: the commit marker
    ROOT/TAG/.torchckpt-writing          WRITING_NAME: flock'd by every process writing the tag
    ROOT/TAG/.torchckpt-rank-00001.json  rank_part_name(1): a rank's file list before the commit
    ROOT/TAG/.<name>.tmp-<pid>-<rand>    tmp_name(final): a file being written
    ROOT/TAG/objects/<name>.pt           object_file(name): a notebook object
    ROOT/TAG/rng.pt                      RNG_FILE: the notebook's RNG states
    ROOT/TAG/mp_rank_00_model_states.pt  DEEPSPEED_FILE: DeepSpeed's own names
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

# -- the root ------------------------------------------------------------------------------------
LATEST_NAME = "latest"
#: Names starting with this prefix are torchckpt's own bookkeeping, never checkpoint data.
RESERVED_PREFIX = ".torchckpt"
#: The lock held while a manifest, `latest` or a deletion is written.
LOCK_NAME = ".torchckpt.lock"
#: A tag directory renamed here is being deleted.
TRASH_PREFIX = ".torchckpt-trash-"

# -- a tag ---------------------------------------------------------------------------------------
MANIFEST_NAME = "torchckpt-manifest.json"
WRITING_NAME = ".torchckpt-writing"
RANK_PART_PREFIX = ".torchckpt-rank-"
#: Temporary files carry this infix; gc recognises leftovers by it.
TMP_INFIX = ".tmp-"


def rank_part_name(rank: int) -> str:
    """The file in which ``rank`` leaves its list of written files for rank 0's commit."""
    return f"{RANK_PART_PREFIX}{rank:05d}.json"


def tmp_name(final: Path) -> Path:
    """A fresh temporary name beside ``final``, unique to this process."""
    return final.with_name(f".{final.name}{TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and TMP_INFIX in name


# -- a notebook checkpoint -----------------------------------------------------------------------
OBJECTS_DIR = "objects"
RNG_FILE = "rng.pt"


def object_file(name: str) -> str:
    """The path, inside its tag, of the notebook object ``name``."""
    return f"{OBJECTS_DIR}/{name}.pt"


# -- DeepSpeed's names ---------------------------------------------------------------------------
#: File names DeepSpeed's engines write into a tag directory.
DEEPSPEED_FILE = re.compile(
    r"^(mp_rank_\d+_model_states"
    r"|(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_(optim|model)_states"
    r"|layer_\d+(-model_\d+)?-model_states"
    r"|(expp_rank_\d+_)?mp_rank_\d+_optim_states"
    r"|(layer_\d+_)?expert_\d+_mp_rank_\d+_model_states)\.pt$"
)


# -- who wrote a tag -----------------------------------------------------------------------------
def started_by_torchckpt(tag_dir: Path) -> bool:
    """Whether torchckpt committed or began writing this tag directory (its manifest, writing marker
    or a rank's file list is there), as opposed to DeepSpeed's own engine or another tool."""
    try:
        names = os.listdir(tag_dir)
    except OSError:
        return False
    return _ours(names)


def _ours(names: list[str]) -> bool:
    return MANIFEST_NAME in names or WRITING_NAME in names or any(n.startswith(RANK_PART_PREFIX) for n in names)


def origin(tag_dir: Path) -> str:
    """Who wrote a tag directory, from its names alone.

    Returns ``"torchckpt"`` (its manifest, writing marker or a rank's file list is there),
    ``"deepspeed"`` (DeepSpeed's file names and nothing of torchckpt's: DeepSpeed's own engine wrote
    it) or ``"unknown"``.
    """
    try:
        names = os.listdir(tag_dir)
    except OSError:
        return "unknown"
    if _ours(names):
        return "torchckpt"
    if any(DEEPSPEED_FILE.match(n) for n in names):
        return "deepspeed"
    return "unknown"
