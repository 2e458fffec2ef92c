"""The ``torchckpt`` command, run for real in a subprocess, on checkpoints made by the magics,
by torchckpt's engine under DeepSpeed, and by DeepSpeed's own engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ds_roots import OWN_TAGS, make_engine, write_root

from torchckpt import CheckpointStore
from torchckpt.cli import main
from torchckpt.results import COLUMNS

pytest.importorskip("deepspeed")


def torchckpt(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python -m torchckpt ARGS`` (the console script is the same ``main``; one test runs it)."""
    return subprocess.run([sys.executable, "-m", "torchckpt", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchckpt: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def nb_root(tmp_path_factory):
    """Two tags saved by the real ``%ckpt save`` in an IPython shell."""
    from _shell import shell

    ip = shell()
    root = tmp_path_factory.mktemp("nb") / "ckpts"
    before = set(ip.user_ns)
    ip.run_line_magic("load_ext", "torchckpt")
    try:
        for cell in (
            f"%ckpt dir {root}",
            "import torch\ntorch.manual_seed(0)\nmodel = torch.nn.Linear(4, 3)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)",
            "%ckpt save t1 model opt --step 1 --metric loss=0.5 --note 'first run'",
            "model(torch.randn(2, 4)).sum().backward(); opt.step()",
            "%ckpt save t2 model opt --step 2 --metric loss=0.25",
        ):
            ip.run_cell(cell, store_history=False).raise_error()
    finally:
        ip.run_line_magic("unload_ext", "torchckpt")
        for name in set(ip.user_ns) - before:
            del ip.user_ns[name]
    return root


@pytest.fixture(scope="module")
def ds_root(ds_dist, tmp_path_factory):
    """ds-zip and ds-legacy from DeepSpeed's own engine, ours from torchckpt's (see _ds_roots)."""
    return write_root(make_engine(stage=1), tmp_path_factory.mktemp("ds") / "ckpts")


def test_help_starts_fast_without_torch_or_deepspeed():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "torchckpt", "--help"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0
    for cmd in ("ls", "info", "verify", "diff", "rm", "gc", "export", "import", "adopt"):
        assert f"    {cmd} " in proc.stdout
    assert "exit status:" in proc.stdout and "2  usage or user error" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torchckpt.cli" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "deepspeed", "numpy")}


@pytest.mark.parametrize("cmd", ["ls", "info", "verify", "diff", "rm", "gc", "export", "import", "adopt"])
def test_every_command_has_help_with_exit_codes(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: torchckpt {cmd} ") and "exit status:" in out


def test_console_script(nb_root):
    script = Path(sys.executable).parent / "torchckpt"
    assert script.exists(), "pip install -e . installs the [project.scripts] entry"
    proc = subprocess.run([str(script), "ls", str(nb_root)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "t1" in proc.stdout


def test_ls_table_and_json(nb_root, ds_root):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "torchckpt", "ls", str(nb_root)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torchckpt.store" in imported and "torch" not in imported, "ls must not wait for `import torch`"
    header, *rows = proc.stdout.splitlines()
    assert header.split() == list(COLUMNS)
    assert rows[0].split()[0] == "t1" and "loss=0.5" in rows[0] and "first run" in rows[0]
    assert rows[1].split()[0] == "t2" and rows[1].split()[-2:] == ["committed", "*"] and " 2 " in rows[1]

    proc = torchckpt("ls", ds_root, "--json")
    assert proc.returncode == 0, proc.stderr
    tags = {r["tag"]: r for r in json.loads(proc.stdout)}
    assert {t: r["status"] for t, r in tags.items()} == {"ds-zip": "deepspeed", "ds-legacy": "deepspeed", "ours": "committed"}
    assert tags["ours"]["latest"] and tags["ours"]["files"] == 2 and tags["ds-zip"]["size"] > 0


def test_info_without_loading_tensors(nb_root, ds_root):
    proc = torchckpt("info", nb_root, "latest")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tag:        t2" in out and "status:     committed, latest" in out and "step:       2" in out
    assert "objects/model.pt: zip format, 2 tensors" in out
    assert any(line.split() == ["weight", "[3,", "4]", "float32", "cpu"] for line in out.splitlines())

    proc = torchckpt("info", ds_root, "ds-legacy", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "deepspeed" and doc["file_list"][0]["checksum"] is None
    model = doc["structure"]["mp_rank_00_model_states.pt"]
    assert model["format"] == "legacy" and any("legacy" in n for n in model["notes"])
    assert {t["name"]: (t["shape"], t["dtype"], t["device"]) for t in model["tensors"]} == {
        "module.0.weight": ([8, 4], "float32", "cpu"), "module.0.bias": ([8], "float32", "cpu"),
        "module.2.weight": ([2, 8], "float32", "cpu"), "module.2.bias": ([2], "float32", "cpu"),
    }  # fmt: skip
    assert {"name": "global_steps", "type": "int", "value": "1"} in model["values"]


def test_verify_reports_each_problem_on_its_own_line(nb_root, tmp_path):
    root = shutil.copytree(nb_root, tmp_path / "ckpts")
    proc = torchckpt("verify", root)
    assert proc.returncode == 0 and proc.stdout.startswith("ok       t2 ("), proc.stdout
    target = root / "t1" / "objects" / "model.pt"
    data = bytearray(target.read_bytes())
    data[-100] ^= 0xFF
    target.write_bytes(bytes(data))
    (root / "t2" / "rng.pt").unlink()
    proc = torchckpt("verify", root, "--all")
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "PROBLEM  t1: objects/model.pt: checksum mismatch (bytes changed since commit)",
        "PROBLEM  t2: rng.pt: missing",
    ]
    assert proc.stderr.strip() == "2 problems in 2 checkpoints of 2"


def test_diff(nb_root, capsys):
    proc = torchckpt("diff", nb_root, "t1", "t2")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("t1 → t2: 2 of") and "tensors changed" in proc.stdout and "model/weight" in proc.stdout
    assert main(["diff", str(nb_root), "t2", "latest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True


def test_rm_and_gc_follow_the_notebook_rules(nb_root, tmp_path, capsys):
    root = shutil.copytree(nb_root, tmp_path / "ckpts")
    proc = torchckpt("rm", root, "t2")
    assert proc.returncode == 2
    one_error_line(proc, "'t2' is 'latest'", "--force")
    store = CheckpointStore(root)
    with store.transaction("crashed") as tx:
        tx.write("a.pt", torch.ones(1))
    with store.transaction("t3") as tx:
        tx.write("a.pt", torch.ones(1))
        tx.commit(save_latest=False)
    with store.transaction("inflight") as writing:
        proc = torchckpt("gc", root, "--keep-last", "1", "--dry-run")
        assert proc.returncode == 0
        assert proc.stdout.splitlines() == [
            "would remove 1 old checkpoint: t1",
            "would remove 1 incomplete checkpoint: crashed",
            "kept 3: t2, t3, inflight",
        ]
        assert sorted(store.tags()) == ["crashed", "inflight", "t1", "t2", "t3"]
        assert main(["gc", str(root), "--keep-last", "1", "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert (plan["committed"], plan["incomplete"]) == (["t1"], ["crashed"])
        assert sorted(store.tags()) == ["inflight", "t2", "t3"], "latest (t2) and the tag being written stay"
        writing.write("b.pt", torch.ones(1))
        assert main(["rm", str(root), "inflight"]) == 2
    assert "being written" in capsys.readouterr().err
    assert main(["rm", str(root), "t3", "inflight"]) == 0
    assert capsys.readouterr().out == "removed t3\nremoved inflight\n"


def test_rm_of_several_tags_is_all_or_nothing(nb_root, tmp_path):
    """One unknown or protected tag refuses the whole command, as %ckpt rm does."""
    root = shutil.copytree(nb_root, tmp_path / "ckpts")
    for tags, message in ((["t1", "nope"], "no checkpoint 'nope'"), (["t1", "t2"], "'t2' is 'latest'")):
        proc = torchckpt("rm", root, *tags)
        assert proc.returncode == 2, proc.stderr
        one_error_line(proc, message)
        assert sorted(CheckpointStore(root).tags()) == ["t1", "t2"], "nothing removed"
    assert torchckpt("rm", root, "t1", "t2", "--force").returncode == 0
    assert CheckpointStore(root).tags() == []


def test_export_and_import(nb_root, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    proc = torchckpt("export", nb_root, "t2", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("exported 2 tensors (60 B) from t2/objects/model.pt to")
    saved = CheckpointStore(nb_root).load("t2", "objects/model.pt")
    exported = load_file(out)
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    new_root = tmp_path / "new"
    proc = torchckpt("import", new_root, "shared", out, "--note", "from a colleague")
    assert proc.returncode == 0, proc.stderr
    store = CheckpointStore(new_root)
    info = store.info("latest")
    assert (info.tag, info.metadata["note"], info.metadata["step"]) == ("shared", "from a colleague", 2)
    assert torch.equal(store.load("shared", "objects/model.pt")["weight"], saved["weight"])


def test_deepspeed_own_checkpoints_adopt_then_verify(ds_root, tmp_path, capsys):
    root = shutil.copytree(ds_root, tmp_path / "ckpts")
    shutil.rmtree(root / "ours")
    (root / "latest").write_text("ds-legacy")  # a root only DeepSpeed's own engine wrote
    proc = torchckpt("verify", root, "--all")
    assert proc.returncode == 1
    problems = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM")]
    assert [p.split()[1] for p in problems] == [f"{t}:" for t in OWN_TAGS]
    assert all("adopt it first: torchckpt adopt" in p for p in problems)
    # `latest` is what DeepSpeed's `latest` file names, though no tag is committed.
    assert main(["info", str(root), "latest", "--files-only"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("tag:        ds-legacy\n") and "status:     deepspeed" in out
    assert err == "torchckpt: note: `latest` is ds-legacy, written by DeepSpeed's own engine (no manifest)\n"
    assert main(["adopt", str(root), "latest"]) == 0
    assert capsys.readouterr().out == "adopted ds-legacy: 2 files loaded and checksummed, manifest written (step 1)\n"
    proc = torchckpt("adopt", root, "--all")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["adopted ds-zip: 2 files loaded and checksummed, manifest written (step 1)"]
    proc = torchckpt("verify", root, "--all", "--json")
    assert proc.returncode == 0, proc.stdout
    assert [c["status"] for c in json.loads(proc.stdout)["checkpoints"]] == ["ok", "ok"]
    proc = torchckpt("export", root, "latest", tmp_path / "w.safetensors")
    assert proc.returncode == 0 and "from ds-legacy/mp_rank_00_model_states.pt:module" in proc.stdout


def test_usage_errors_are_one_line_with_exit_2(nb_root, tmp_path, capsys):
    proc = torchckpt("info", nb_root, "t3")
    assert proc.returncode == 2
    one_error_line(proc, "no checkpoint 't3'", "did you mean", "'t1'", "'t2'")
    cases = [
        (["ls", str(tmp_path / "nope")], "does not exist; check the path"),
        (["verify", str(nb_root), "t1", "--all"], "give a TAG or --all, not both"),
        (["gc", str(nb_root), "--keep-last", "0"], "--keep-last: must be at least 1, got 0; see 'torchckpt gc --help'"),
        (["ls"], "the following arguments are required: ROOT"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "no command given"),
        (["export", str(nb_root), "t1", str(tmp_path / "x.safetensors"), "--key", "ema"], "--key can be one of: model, opt"),
        (["info", str(nb_root), "../t1"], "contains a path separator"),
    ]
    for argv, needle in cases:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("torchckpt: error: ") and needle in err, (argv, err)


def test_unreadable_checkpoint_is_a_problem_not_a_usage_error(nb_root, tmp_path, capsys):
    root = shutil.copytree(nb_root, tmp_path / "ckpts")
    (root / "t1" / "objects" / "opt.pt").write_bytes(b"not a checkpoint")
    assert main(["info", str(root), "t1", "--file", "objects/opt.pt"]) == 1
    assert "objects/opt.pt: ERROR opt.pt is neither a torch.save file" in capsys.readouterr().out
    (root / "t2" / "torchckpt-manifest.json").write_text("{")
    assert main(["diff", str(root), "t1", "t2"]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["info", str(root), "t2", "--files-only"]) == 1
    out = capsys.readouterr().out
    assert "status:     unreadable" in out and "problem:    manifest" in out and "is not valid JSON" in out
