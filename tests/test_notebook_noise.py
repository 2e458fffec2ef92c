"""What a newcomer sees when running the notebooks: no red linker errors or guessing warnings
on stderr, and nothing left behind in the temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOISE = ("cannot find -l", "collect2", "error:", "Traceback", "Setting accelerator to")


def run_notebook(name: str, tmp: Path, monkeypatch) -> list[str]:
    """Execute a notebook in a real kernel with TMPDIR at ``tmp``; return its stderr outputs."""
    monkeypatch.setenv("TMPDIR", str(tmp))
    repo = str(NOTEBOOKS.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp)}})
    client.execute()
    return [o["text"] for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]


@pytest.mark.parametrize("name", ["02_deepspeed.ipynb", "03_panel.ipynb", "05_trainers.ipynb"])
def test_notebook_shows_no_noise_and_leaves_nothing(name, tmp_path, monkeypatch):
    if name.startswith(("02", "05")):
        pytest.importorskip("deepspeed")
    if name.startswith("05"):
        pytest.importorskip("transformers")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stderr = run_notebook(name, tmp, monkeypatch)
    for text in stderr:
        for noise in NOISE:
            assert noise not in text, f"{name} shows {noise!r} on stderr: {text[:300]}"
    leftovers = [p.name for p in tmp.iterdir() if not p.name.startswith(("pymp-", "torchinductor"))]
    assert leftovers == [], f"{name} left {leftovers} in the temporary directory"
