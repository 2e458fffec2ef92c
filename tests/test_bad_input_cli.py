"""Every mistake a user can type into the ``torchckpt`` command, run for real in a subprocess:
the exit status, one ``torchckpt: error:`` line, no traceback, the fix in the command's own
options (never a Python keyword), and nothing changed on disk. Then the smaller truths."""

from __future__ import annotations

import fractions
import json
import os
import subprocess
import sys

import pytest
import torch

from torchckpt import Checkpointer, CheckpointStore
from torchckpt._fileio import checksum_file

PYTHON_DIALECT = ("verify=False", "allow_incomplete=True", "strict=False", "allow=[", "trusted=True",
                  "allow_latest=True", "overwrite=True", "map_location=")


def torchckpt(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchckpt", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, check=False)


def disk(path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A root with a good tag, a file of random bytes whose checksum matches, a file needing a
    global safe loading refuses, and a directory another tool wrote (no manifest)."""
    base = tmp_path_factory.mktemp("bad-cli")
    path = base / "root"
    with Checkpointer(path) as ckpt:
        torch.manual_seed(0)
        for tag in ("rb", "unsafe", "a"):
            ckpt.save(tag, {"model": torch.nn.Linear(3, 2)}, metrics={})
    store = CheckpointStore(path)
    assert store.latest() == "a"
    rb = path / "rb" / "objects" / "model.pt"
    rb.write_bytes(os.urandom(2048))
    manifest_path = path / "rb" / "torchckpt-manifest.json"
    doc = json.loads(manifest_path.read_text())
    size, checksum = checksum_file(rb)
    for rec in doc["files"]:
        if rec["path"] == "objects/model.pt":
            rec["size"], rec["checksum"] = size, checksum
    manifest_path.write_text(json.dumps(doc))
    unsafe = path / "unsafe" / "objects" / "model.pt"
    torch.save({"weight": torch.ones(2), "frac": fractions.Fraction(1, 3)}, unsafe)
    doc = json.loads((path / "unsafe" / "torchckpt-manifest.json").read_text())
    size, checksum = checksum_file(unsafe)
    for rec in doc["files"]:
        if rec["path"] == "objects/model.pt":
            rec["size"], rec["checksum"] = size, checksum
    (path / "unsafe" / "torchckpt-manifest.json").write_text(json.dumps(doc))
    (path / "foreign").mkdir()
    torch.save({"weight": torch.ones(2)}, path / "foreign" / "model.pt")
    (base / "afile").write_text("x")
    return path


CASES = [
    pytest.param(["info", "{root}", ""], 2, ["'' is empty"], id="info-empty-tag"),
    pytest.param(["verify", "{root}", ""], 2, ["'' is empty"], id="verify-empty-tag"),
    pytest.param(["ls", "{base}/afile/sub"], 2, ["does not exist"], id="root-under-file"),
    pytest.param(["ls", "{base}/afile"], 2, ["is not a directory"], id="root-is-file"),
    pytest.param(["export", "{root}", "a", "/missing-dir/x.safetensors"], 2,
                 ["/missing-dir does not exist; create it first"], id="export-missing-parent"),
    pytest.param(["export", "{root}", "rb", "{base}/out.safetensors"], 1,
                 ["not a torch.save file (zip or legacy) nor safetensors"], id="random-bytes"),
    pytest.param(["export", "{root}", "unsafe", "{base}/out.safetensors"], 2,
                 ["needs globals", "fractions.Fraction", "--allow fractions.Fraction", "--trusted"], id="unsafe-hint"),
    pytest.param(["rm", "{root}", "a"], 2, ["'latest'", "--force"], id="rm-latest-hint"),
    pytest.param(["export", "{root}", "foreign", "{base}/out.safetensors"], 2, ["--allow-incomplete"],
                 id="incomplete-hint"),
    pytest.param(["gc", "{root}", "--keep-last", "0"], 2, ["must be at least 1"], id="keep-last-0"),
    pytest.param(["diff", "{root}", "a", "zz"], 2, ["zz"], id="diff-unknown-tag"),
    pytest.param(["info", "{root}", "a", "--file", "nope.pt"], 2, ["has no file 'nope.pt'"], id="info-no-file"),
]


@pytest.mark.parametrize(("argv", "code", "says"), CASES)
def test_every_mistake_is_one_line_in_the_commands_words_and_changes_nothing(root, argv, code, says):
    base = root.parent
    before = disk(base)
    proc = torchckpt(*[a.format(root=root, base=base) for a in argv])
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("torchckpt: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for part in says:
        assert part in lines[0], lines[0]
    for kw in PYTHON_DIALECT:
        assert kw not in lines[0], f"{kw!r} (Python's spelling) in a CLI message: {lines[0]}"
    assert disk(base) == before


# -- the smaller truths ---------------------------------------------------------------------------
def test_help_texts_say_what_the_commands_do():
    assert "TAG/objects/<key>.pt" in torchckpt("import", "--help").stdout
    diff = torchckpt("diff", "--help").stdout
    assert "%%ckpt" not in diff and "%ckpt diff" in diff
    ls = torchckpt("ls", "--help").stdout
    assert "gc removes it when torchckpt wrote it" in " ".join(ls.split())


def test_adopt_all_does_not_claim_every_checkpoint_has_a_manifest(root):
    proc = torchckpt("adopt", root, "--all")
    assert proc.returncode == 0 and "every checkpoint has a manifest" not in proc.stdout
    assert "foreign" in proc.stdout and "no manifest" in proc.stdout


def test_info_prints_no_empty_metrics_line(root):
    out = torchckpt("info", root, "a", "--files-only").stdout
    assert not any(line.strip() == "metrics:" for line in out.splitlines()), out


def test_export_honours_the_umask(root, tmp_path):
    old = os.umask(0o022)
    try:
        proc = torchckpt("export", root, "a", tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert oct((tmp_path / "w.safetensors").stat().st_mode & 0o777) == oct(0o644)


def test_one_size_for_a_checkpoint_save_ls_load(tmp_path):
    from torchckpt import results

    with Checkpointer(tmp_path / "r") as ckpt:
        ns = {"model": torch.nn.Linear(3, 2)}
        saved = ckpt.save("s", ns)
        listed = CheckpointStore(tmp_path / "r").info("s").size
        assert saved.checkpoint_size == listed and results.size(listed) in saved.to_text()
        assert results.size(listed) in ckpt.load("s", ns).to_text()
    ls = torchckpt("ls", tmp_path / "r").stdout
    assert results.size(listed) in ls


def test_wide_characters_keep_columns_aligned(tmp_path):
    from torchckpt import results

    with Checkpointer(tmp_path / "r") as ckpt:
        ckpt.save("学習-1", {"x": 1})
        ckpt.save("plain", {"x": 1})
    lines = torchckpt("ls", tmp_path / "r").stdout.splitlines()
    starts = {results.width(line[: line.index("KiB") + 3]) for line in lines[1:]}
    assert len(starts) == 1, lines
