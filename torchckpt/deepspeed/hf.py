"""Resuming HF ``Trainer`` runs from committed checkpoints only.

``Trainer(resume_from_checkpoint=True)`` takes the highest-numbered ``checkpoint-N`` directory,
complete or not (``transformers.trainer_utils.get_last_checkpoint``): a crash in the middle of a
save, or before an ``async_save`` checkpoint was committed, makes the resume fail. Each
``checkpoint-N`` is a DeepSpeed save directory of its own (``latest`` naming the tag, usually
``global_stepN``) with the Trainer's files beside it; ``trainer_state.json`` is written last, after
DeepSpeed's ``save_checkpoint`` returned. Needs no transformers import: directories only.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from ..errors import TorchckptError
from ..layout import LATEST_NAME, origin, started_by_torchckpt
from ..manifest import validate_tag
from ..store import CheckpointStore

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR and its pattern
TRAINER_STATE_NAME = "trainer_state.json"


def last_committed_checkpoint(output_dir: str | os.PathLike, *, verify: bool = False) -> str | None:
    """The newest ``checkpoint-N`` of a Trainer's ``output_dir`` that a resume can load, or None.

    A checkpoint qualifies when the DeepSpeed tag its ``latest`` names is committed (its
    torchckpt manifest is there) and the Trainer finished it (``trainer_state.json`` is there and
    parses). Newer ones that do not qualify are named in a warning, with the reason. A tag written
    by DeepSpeed's own engine (before torchckpt was enabled: no manifest, nothing of torchckpt's)
    qualifies by the Trainer's file alone, with a warning that it cannot be verified; ``verify=True``
    skips those and also re-checks every checksum of a committed tag (reads every file).

    Pass the result as ``trainer.train(resume_from_checkpoint=...)``: None (a first run, or no
    checkpoint qualifies) starts from scratch, where ``resume_from_checkpoint=True`` would raise.

    Args:
        output_dir: the Trainer's ``args.output_dir``.
        verify: also recompute the checksums of the chosen tag's files; skip it if one differs.

    Returns:
        The path of the checkpoint directory, or None.

    Example:
        >>> torchckpt.enable()
        >>> trainer.train(resume_from_checkpoint=torchckpt.last_committed_checkpoint(args.output_dir))
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    candidates = sorted(
        ((int(m.group(1)), entry) for entry in root.iterdir()
         if (m := _CHECKPOINT_DIR.match(entry.name)) and entry.is_dir()),
        reverse=True,
    )
    skipped: list[str] = []
    for _, path in candidates:
        problem, note = _resumable(path, verify=verify)
        if problem is not None:
            skipped.append(f"{path.name}: {problem}")
            continue
        if skipped:
            warnings.warn(f"resuming from {path} and not a newer checkpoint: {'; '.join(skipped)}", stacklevel=2)
        if note:
            warnings.warn(f"resuming from {path}: {note}", stacklevel=2)
        return str(path)
    if skipped:
        warnings.warn(
            f"no checkpoint in {root} can be resumed, starting from scratch: {'; '.join(skipped)}", stacklevel=2
        )
    return None


def _resumable(path: Path, *, verify: bool) -> tuple[str | None, str | None]:
    """(why ``path`` cannot be resumed, or None; a note on the checkpoint chosen, or None)."""
    try:
        named = (path / LATEST_NAME).read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        tags = CheckpointStore(path).list()
        if tags:  # DeepSpeed writes `latest` after the commit
            states = ", ".join(f"{i.tag}: {i.status}" for i in tags)
            return f"its DeepSpeed save did not finish (no `latest`; {states})", None
        return "no DeepSpeed checkpoint in it (no `latest`; saved with save_only_model?)", None
    except OSError as e:
        return f"its `latest` file is unreadable ({e.strerror})", None
    try:
        tag = validate_tag(named)
    except ValueError:
        return f"its `latest` holds {named[:60]!r}, not a tag name (torn write?)", None
    store = CheckpointStore(path)
    if not store.tag_dir(tag).is_dir():
        return f"its `latest` names {tag!r}, which is not there", None
    info = store.info(tag)
    note = None
    if info.in_flight:
        return f"DeepSpeed tag {tag!r} is still being written", None
    if info.problem:
        return f"DeepSpeed tag {tag!r} has an unreadable manifest ({info.problem})", None
    if not info.committed:
        # The same rule as the engine's load: a tag torchckpt began is refused until committed.
        if started_by_torchckpt(info.path):
            return f"DeepSpeed tag {tag!r} was never committed (the save was interrupted)", None
        if origin(info.path) != "deepspeed":
            return f"DeepSpeed tag {tag!r} holds no DeepSpeed checkpoint files", None
        if verify:
            return f"DeepSpeed tag {tag!r} was written without torchckpt and cannot be verified", None
        note = f"DeepSpeed tag {tag!r} was written without torchckpt (no manifest): not verified"
    trainer_problem = _trainer_state_problem(path / TRAINER_STATE_NAME)
    if trainer_problem is not None:
        return trainer_problem, None
    if verify and info.committed:
        try:
            report = store.verify(tag)
        except TorchckptError as e:
            return f"DeepSpeed tag {tag!r} cannot be verified ({e})", None
        if not report.ok:
            return f"DeepSpeed tag {tag!r} fails verification ({'; '.join(report.problems)})", None
    return None, note


def _trainer_state_problem(state: Path) -> str | None:
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"the Trainer did not finish it (no {TRAINER_STATE_NAME})"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"its {TRAINER_STATE_NAME} is unreadable ({e})"
    return None
