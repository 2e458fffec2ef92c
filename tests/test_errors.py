"""The error classes: each says whose problem it is, every class the package raises is exported, and
the surfaces map them the same way (the CLI's exit code, %ckpt's UsageError)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import torchckpt
from torchckpt import errors
from torchckpt.errors import CommitError, TorchckptError

PACKAGE = Path(torchckpt.__file__).parent
#: The user asked for something that cannot be done as asked: %ckpt's UsageError, the CLI's exit 2.
USAGE = {"AdoptError", "CheckpointInUseError", "ClosedError", "DeviceUnavailableError", "ExportError",
         "FileNotInCheckpointError", "IncompleteCheckpointError", "InvalidArgumentError", "InvalidTagError",
         "MissingExtraError", "NotCheckpointableError", "ObjectNotFoundError", "RestoreError", "TagExistsError",
         "TagNotFoundError", "UnsafeCheckpointError"}
#: A problem was found in a checkpoint, the disk or the run: the CLI's exit 1.
PROBLEMS = {"CommitError", "CorruptCheckpointError", "ManifestError", "NotTorchFileError", "StoreLockedError",
            "UnsafePathError", "WriteError"}


def _classes() -> dict[str, type[TorchckptError]]:
    return {n: c for n, c in vars(errors).items()
            if isinstance(c, type) and issubclass(c, TorchckptError) and c is not TorchckptError}


def _constructed_names() -> set[str]:
    """Every name called anywhere in the package (``raise Name(...)``, ``return Name(...)``...)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names.add(node.func.id)
    return names


def test_every_error_class_says_whose_problem_it_is():
    assert {n for n, c in _classes().items() if c.usage} == USAGE
    assert {n for n, c in _classes().items() if not c.usage} == PROBLEMS


def test_every_error_class_is_raised_and_exported():
    raised = _constructed_names()
    for name in _classes():
        assert name in raised, f"{name} is never raised: remove it"
        assert name in torchckpt.__all__ and getattr(torchckpt, name) is getattr(errors, name)


def test_the_api_raises_no_bare_value_or_runtime_error():
    """Outside the %ckpt line parser (whose errors become UsageErrors at once) and the panel's
    internal busy guard, every raise of a built-in ValueError/RuntimeError/KeyError is one of ours."""
    bare = {"ValueError", "RuntimeError", "KeyError", "FileNotFoundError"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("magics.py", "errors.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name)
                    and node.exc.func.id in bare):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.exc.func.id}")
    assert found == [f"panel.py:{_busy_guard_line()} RuntimeError"], found


def _busy_guard_line() -> int:
    source = (PACKAGE / "panel.py").read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if "raise RuntimeError(f\"the panel is busy" in line)


@pytest.mark.parametrize("name", sorted(USAGE | PROBLEMS))
def test_errors_survive_pickling_between_processes(name):
    cls = getattr(errors, name)
    if name == "UnsafeCheckpointError":
        e = cls("needs globals", ["os.system"])
    elif issubclass(cls, OSError):
        e = cls(2, "no checkpoint file x", "x")
    else:
        e = cls("message")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e)


def test_commit_error_carries_its_failures_as_data():
    e = CommitError("checkpoint 't' not committed: rank 1: disk full", failures={1: "disk full"}, step="write")
    back = pickle.loads(pickle.dumps(e))  # how a rank's error travels to the parent in tests and launchers
    assert back.failures == {1: "disk full"} and back.step == "write"
    assert CommitError("one process").failures == {} and CommitError("x").step is None


def test_a_missing_file_is_not_a_missing_tag(tmp_path):
    from torchckpt import CheckpointStore, FileNotInCheckpointError
    from torchckpt.store import load_unmanaged

    store = CheckpointStore(tmp_path / "ckpts")
    with store.transaction("t") as tx:
        tx.write("model.pt", {"w": 1})
        tx.commit()
    with pytest.raises(FileNotInCheckpointError, match="checkpoint 't' has no file 'optim.pt'; it has: model.pt"):
        store.load("t", "optim.pt")
    with pytest.raises(FileNotFoundError):  # still what code that catches the built-in expects
        store.load("t", "optim.pt")
    with pytest.raises(FileNotInCheckpointError, match="no checkpoint file"):
        load_unmanaged(tmp_path / "nothing.pt")
