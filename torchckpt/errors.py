"""One base error for torchckpt, with subclasses that also derive from the matching built-in.

Every message says what failed, on which value, and what to do about it. Every class says, in
``usage``, whose the problem is, so that every surface can render it without a table of its own:
``True`` -- the request cannot be done as asked (a wrong tag, option or name; a fix the user
chooses, such as ``trusted=True``): ``%ckpt`` raises IPython's ``UsageError``, the CLI exits 2;
``False`` -- a problem was found in a checkpoint, the disk or the run: the CLI exits 1.
"""

from __future__ import annotations

import pickle
from typing import ClassVar


class TorchckptError(Exception):
    """Base class of every error torchckpt raises on purpose."""

    #: True: the user's request cannot be done as asked; False: a problem was found (see the module).
    usage: ClassVar[bool] = False


class MissingExtraError(TorchckptError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` to run."""

    usage = True


class InvalidArgumentError(TorchckptError, ValueError):
    """An option's value cannot be used (a ``map_location`` that is not a device...)."""

    usage = True


class InvalidTagError(TorchckptError, ValueError):
    """A tag is not one safe path component."""

    usage = True


class TagNotFoundError(TorchckptError, KeyError):
    """No checkpoint with that tag exists under the root."""

    usage = True

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class FileNotInCheckpointError(TorchckptError, FileNotFoundError):
    """A checkpoint (or a path given to load) has no such file."""

    usage = True

    def __str__(self) -> str:  # OSError would prefix "[Errno 2]"
        return str(self.strerror if self.strerror is not None else (self.args[0] if self.args else ""))


class UnsafePathError(TorchckptError, ValueError):
    """A path leads out of its checkpoint directory (through a symbolic link) or is not a regular file."""


class ClosedError(TorchckptError, RuntimeError):
    """A Checkpointer (or panel) was used after ``close()``."""

    usage = True


class TagExistsError(TorchckptError, FileExistsError):
    """A save would replace a committed checkpoint without being told to."""

    usage = True


class IncompleteCheckpointError(TorchckptError, RuntimeError):
    """A tag has no manifest: it was never committed (or was written without torchckpt)."""

    usage = True


class CorruptCheckpointError(TorchckptError, RuntimeError):
    """A file of a committed checkpoint does not match its manifest."""


class NotTorchFileError(TorchckptError, ValueError):
    """A file is not a torch.save file (zip or legacy) nor safetensors: random bytes, another format."""


class ManifestError(TorchckptError, ValueError):
    """A manifest cannot be read, or describes something unsafe."""


class UnsafeCheckpointError(TorchckptError, pickle.UnpicklingError):
    """A checkpoint needs globals that are not allowed under safe (weights-only) loading."""

    usage = True

    def __init__(self, message: str, globals_needed: list[str] | None = None):
        super().__init__(message)
        self.globals_needed = list(globals_needed or [])  # None: when unpickled, until its state is restored


class DeviceUnavailableError(TorchckptError, RuntimeError):
    """A checkpoint's tensors were saved on a device this machine does not have."""

    usage = True


class CommitError(TorchckptError, RuntimeError):
    """A commit could not make the checkpoint complete; nothing was marked committed.

    ``failures`` maps each rank that failed to why (empty when the failure is not one rank's, such
    as two ranks writing one file differently); ``step`` is the step of the commit at which it was
    found (``"start"``, ``"write"``, ``"commit"``, or ``None``).
    """

    def __init__(self, message: str, *, failures: dict[int, str] | None = None, step: str | None = None):
        super().__init__(message)
        self.failures: dict[int, str] = dict(failures or {})
        self.step = step


class WriteError(TorchckptError, OSError):
    """Writing a checkpoint file failed (disk full, file too large, permission...)."""


class StoreLockedError(TorchckptError, TimeoutError):
    """Another process held the checkpoint root's lock for longer than the timeout."""


class CheckpointInUseError(TorchckptError, RuntimeError):
    """A tag cannot be removed: it is `latest` or is being written."""

    usage = True


class NotCheckpointableError(TorchckptError, TypeError):
    """An object cannot be saved: it is not a module, tensor, plain value or ``Stateful``."""

    usage = True


class ObjectNotFoundError(TorchckptError, KeyError):
    """A name is neither in the notebook namespace nor among a checkpoint's saved objects."""

    usage = True

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdoptError(TorchckptError, ValueError):
    """A tag cannot be adopted: already committed, empty, or a file does not load."""

    usage = True


class ExportError(TorchckptError, ValueError):
    """The weights to export (or import) cannot be found or are not plain tensors."""

    usage = True


class RestoreError(TorchckptError, ValueError):
    """Saved state does not fit the live objects; nothing was changed."""

    usage = True


# -- one message, said in the dialect of the surface that shows it ---------------------------------
#: The fixes messages suggest, as Python keyword arguments (how the API spells them), with how
#: ``%ckpt`` (and the panel, which shows the magic's words) and the ``torchckpt`` command spell
#: them. None: that surface has no such option, so the message points at the Python API.
_FIXES: tuple[tuple[str, str | None, str | None], ...] = (
    # (pattern in the Python message, %ckpt spelling, CLI spelling); \1 is the pattern's value
    (r"allow_latest=True \(or --force\)", "--force", "--force"),
    (r"allow_latest=True", "--force", "--force"),
    (r"verify=False, allow_incomplete=True", None, "--allow-incomplete"),
    (r"verify=False", "--no-verify", None),
    (r"allow_incomplete=True", None, "--allow-incomplete"),
    (r"strict=False", "--no-strict", None),
    (r"trusted=True", "--trusted", "--trusted"),
    (r"overwrite=True", "--overwrite", None),
    (r"rng=True", "--rng", None),
    (r"rng=False", "--no-rng", None),
    (r"allow=\[([^\]]*)\]", "--allow \\1", "--allow \\1"),
    (r"map_location=('[^']*'|\S+)", "--map-location \\1", None),
    (r"into=('[^']*')", "--into \\1", None),
    (r"into=", "--into", None),
)
SURFACES = ("python", "magic", "cli")


def in_dialect(message: str, surface: str) -> str:
    """``message`` (written with Python keyword arguments) as ``surface`` would say it.

    ``"python"`` leaves it as is; ``"magic"`` names ``%ckpt``'s flags (``--no-strict``), ``"cli"``
    the ``torchckpt`` command's options (``--allow-incomplete``). A fix the surface has no option
    for is named as the Python keyword, marked ``(Python API)``.
    """
    import re

    if surface not in SURFACES:
        raise ValueError(f"surface {surface!r} is not one of {', '.join(SURFACES)}")
    if surface == "python":
        return re.sub(r"allow_latest=True \(or --force\)", "allow_latest=True", message)
    column = 1 if surface == "magic" else 2
    pattern = "|".join(f"(?:{p})" for p, _, _ in _FIXES)

    def spell(m: re.Match) -> str:
        text = m.group(0)
        for entry in _FIXES:
            one = re.fullmatch(entry[0], text)
            if one is None:
                continue
            flag = entry[column]
            if flag is None:
                return f"{text} (Python API)"
            value = one.group(1) if one.groups() else ""
            if "\\1" in flag:
                if entry[0].startswith("allow="):  # allow=['a.B', 'c.D'] -> --allow a.B --allow c.D
                    names = [v.strip().strip("'\"") for v in value.split(",") if v.strip()]
                    return " ".join(f"--allow {n}" for n in names)
                return flag.replace("\\1", value.strip("'") if " " not in value.strip("'") else value)
            return flag
        return text

    return re.sub(pattern, spell, message)


def hint_options(error: BaseException) -> list[str]:
    """The Python keyword arguments an error's message suggests (``["strict=False"]``): its fix, as data."""
    import re

    pattern = "|".join(f"(?:{p})" for p, _, _ in _FIXES)
    return [m.group(0).split(" (")[0] for m in re.finditer(pattern, str(error))]
