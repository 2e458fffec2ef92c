"""One IPython shell with ``%ckpt`` loaded, shared by the tests that drive the magics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config


def shell() -> InteractiveShell:
    """The process's InteractiveShell (made once, without a history database)."""
    if InteractiveShell.initialized():
        return InteractiveShell.instance()
    cfg = Config()
    cfg.HistoryManager.enabled = False
    return InteractiveShell.instance(config=cfg)


@pytest.fixture(scope="module")
def ip():
    """The shell with ``%load_ext torchckpt``; unloaded after the module's tests."""
    ip = shell()
    ip.run_line_magic("load_ext", "torchckpt")
    yield ip
    ip.run_line_magic("unload_ext", "torchckpt")
    ip.config.CkptMagics.pop("root", None)  # unload keeps the root for %reload_ext; forget ours


@contextmanager
def ckpt_root(ip: InteractiveShell, path: Path) -> Iterator[Path]:
    """Point ``%ckpt`` at ``path``; afterwards close its checkpointers and forget the variables
    the block defined."""
    before = set(ip.user_ns)
    run(ip, f"%ckpt dir {path}")
    try:
        yield path
    finally:
        magics = ip.magics_manager.registry.get("CkptMagics")
        if magics is not None:
            magics.close()
            magics._checkpointers.clear()
        for name in set(ip.user_ns) - before:
            del ip.user_ns[name]


def run(ip: InteractiveShell, cell: str):
    """Run a cell; return its value; raise what it raised."""
    result = ip.run_cell(cell, store_history=False)
    result.raise_error()
    return result.result


def usage_error(ip: InteractiveShell, cell: str) -> str:
    """Run a cell that must fail with exactly UsageError; return the message."""
    result = ip.run_cell(cell, store_history=False)
    assert type(result.error_in_exec) is UsageError, repr(result.error_in_exec)
    return str(result.error_in_exec)
