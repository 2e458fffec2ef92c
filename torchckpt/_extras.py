"""Optional dependencies (pyproject's extras): a missing one is one line naming the install."""

from __future__ import annotations

from .errors import MissingExtraError

#: The top-level module each extra provides -> the extra that installs it.
EXTRAS = {"deepspeed": "deepspeed", "jupyterlab": "lab", "lightning": "trainers", "ipywidgets": "", "IPython": "",
          "matplotlib": "lab"}


def missing(error: ModuleNotFoundError, what: str) -> MissingExtraError | None:
    """The error to raise instead of ``error`` when it is an extra's module that is missing."""
    top = (error.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    extra = EXTRAS[top]
    install = f"pip install 'torchckpt[{extra}]'" if extra else "pip install torchckpt (its core dependencies)"
    return MissingExtraError(f"{what} needs {top}, which is not installed here: {install}")
