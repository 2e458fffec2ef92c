"""Lineage: each notebook save's parent, ``%ckpt log`` through a real IPython shell, ``torchckpt
log``, and a tree that stays readable after rm, gc and hand-edited manifests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _shell import ckpt_root, ip, run, usage_error  # noqa: F401 - ip is a fixture

from torchckpt.errors import InvalidTagError, TagNotFoundError
from torchckpt.layout import MANIFEST_NAME
from torchckpt.lineage import LineageLog, build_log, draw
from torchckpt.notebook import Checkpointer


def _objects(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    return {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.1)}


def _train(ns, lr: float = 0.1) -> None:
    for g in ns["opt"].param_groups:
        g["lr"] = lr
    ns["model"](torch.randn(3, 4)).pow(2).sum().backward()
    ns["opt"].step()
    ns["opt"].zero_grad()


# -- the parent, through the API --------------------------------------------------------------------
def test_parent_is_the_last_tag_loaded_or_saved(tmp_path):
    ns = _objects()
    with Checkpointer(tmp_path) as ck:
        assert ck.save("base", ns, step=1).parent is None
        _train(ns)
        assert ck.save("a1", ns, step=2).parent == "base"
        assert ck.save("a2", ns, step=3).parent == "a1"
        ck.load("base", ns)
        _train(ns, lr=1.0)
        r = ck.save("b1", ns, step=2)
        assert r.parent == "base" and "from base" in r.to_text()
        assert ck.store.info("b1").metadata["parent"] == "base"
        ck.load("a1", ns, ["model"], into="copy")  # a new variable: the namespace's objects did not change
        assert ck.save("b2", ns, step=3).parent == "b1"
        assert ck.save("other", ns, parent=None).parent is None
        assert ck.save("explicit", ns, parent="a2").parent == "a2"
        with pytest.raises(InvalidTagError):
            ck.save("bad", ns, parent="../x")
        log = ck.log()
    assert log.parent("a2") == "a1" and log.parent("b2") == "b1" and log.parent("b1") == "base"
    assert log.branches()["b2"] == ["base", "b1", "b2"]
    assert log.branches()["explicit"] == ["base", "a1", "a2", "explicit"]


def test_overwriting_a_tag_keeps_its_own_parent(tmp_path):
    ns = _objects()
    with Checkpointer(tmp_path) as ck:
        ck.save("base", ns)
        ck.save("t", ns)
        _train(ns)
        r = ck.save("t", ns, overwrite=True)  # head is "t": never its own parent
    assert r.parent == "base"


def test_async_save_records_the_parent_too(tmp_path):
    ns = _objects()
    with Checkpointer(tmp_path) as ck:
        ck.save("base", ns)
        ck.save("next", ns, async_save=True)
        ck.commit("next")
        assert ck.store.info("next").metadata["parent"] == "base"
        assert ck.head == "next"


# -- the drawing --------------------------------------------------------------------------------------
def _tree(tmp_path) -> Checkpointer:
    ns = _objects()
    ck = Checkpointer(tmp_path / "root")
    ck.save("base", ns, step=1, metrics={"loss": 1.0}, note="start")
    _train(ns)
    ck.save("a1", ns, step=2, metrics={"loss": 0.5})
    ck.load("base", ns)
    _train(ns, lr=1.0)
    ck.save("b1", ns, step=2, metrics={"loss": 0.7})
    ck.save("b2", ns, step=3, metrics={"loss": 0.6})
    return ck


def test_log_draws_branches_newest_first(tmp_path):
    ck = _tree(tmp_path)
    log = ck.log()
    assert log.order == ["b2", "b1", "a1", "base"]
    assert [g for _, g in log.graph] == ["*", "*", "| *", "|/", "*"]
    text = log.to_text()
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["*", "b2", "step", "3"] and "latest" in lines[0]
    assert "loss=0.5" in lines[2] and "start" in lines[4]
    html = log._repr_html_()
    assert "<table" in html and "b2" in html and "latest" in html
    ck.close()


def test_log_of_one_tag_shows_its_ancestors_and_descendants(tmp_path):
    ck = _tree(tmp_path)
    assert ck.log("b1").order == ["b2", "b1", "base"]
    assert ck.log("a1").order == ["a1", "base"]
    assert ck.log("latest").focus == "b2"
    with pytest.raises(TagNotFoundError, match="did you mean .*'b1'"):
        ck.log("b")
    ck.close()


def test_draw_folds_three_children_into_their_parent():
    from torchckpt.lineage import Node, _display_order

    nodes = {"r": Node("r", None, created=1), "a": Node("a", "r", created=2), "b": Node("b", "r", created=3),
             "c": Node("c", "r", created=4), "c2": Node("c2", "c", created=5)}
    for n in list(nodes.values()):
        if n.parent:
            nodes[n.parent].children.append(n.tag)
    order = _display_order(nodes)
    assert order == ["c2", "c", "b", "a", "r"]
    assert [g for _, g in draw(nodes, order)] == ["*", "*", "| *", "| | *", "| |/", "|/", "*"]


# -- removed tags and hand-edited manifests -------------------------------------------------------
def test_removing_a_tag_in_the_middle_keeps_its_children_named(tmp_path):
    ck = _tree(tmp_path)
    ck.remove("b1")
    log = ck.log()
    assert log.nodes["b1"].status == "removed" and log.parent("b2") == "b1"
    text = log.to_text()
    assert "(removed)" in text and "parent b1 removed" in text
    assert ck.info("b2").to_text().count("parent:     b1 (removed)") == 1
    assert log.branches()["b2"] == ["b2"]  # its line starts after the gap
    assert ck.plot(["loss"]).data("loss")["b2"] == [(3, 0.6)]
    ck.close()


def test_gc_keep_last_leaves_a_readable_tree(tmp_path):
    ck = _tree(tmp_path)
    ck.gc(keep_last=1)
    log = ck.log()
    assert log.tags == ["b2"] and log.nodes["b1"].status == "removed"
    assert "(removed)" in log.to_text()
    ck.close()


def _edit_metadata(root, tag, **changes):
    path = root / tag / MANIFEST_NAME
    doc = json.loads(path.read_text())
    doc["metadata"].update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("bad", [5, "../etc", "", ["a"], {"x": 1}, "latest"])
def test_an_invalid_parent_in_a_manifest_is_ignored_and_named(tmp_path, bad):
    ck = _tree(tmp_path)
    _edit_metadata(ck.root, "b2", parent=bad)
    log = ck.log()
    assert log.parent("b2") is None and "invalid parent" in log.nodes["b2"].problem
    assert "invalid parent" in log.to_text()
    assert "invalid parent" in ck.info("b2").to_text()
    ck.close()


def test_a_cycle_of_parents_is_broken(tmp_path):
    ck = _tree(tmp_path)
    _edit_metadata(ck.root, "base", parent="b2")
    _edit_metadata(ck.root, "a1", parent="a1")
    log = ck.log()
    assert set(log.order) == {"base", "a1", "b1", "b2"}
    assert "cycle" in log.nodes["base"].problem and "itself" in log.nodes["a1"].problem
    log.to_text()
    ck.close()


def test_tags_without_lineage_and_an_empty_root(tmp_path):
    from torchckpt.store import CheckpointStore

    store = CheckpointStore(tmp_path / "r")
    assert build_log(store).to_text().startswith("no committed checkpoints")
    for tag in ("x", "y"):
        with store.transaction(tag) as tx:
            tx.write("f.pt", {"a": 1})
            tx.commit(metadata={"step": 1})
    with store.transaction("open") as tx:
        tx.write("f.pt", {"a": 1})  # never committed: not in the tree
    log = build_log(store)
    assert sorted(log.order) == ["x", "y"] and [g for _, g in log.graph] == ["*", "", "*"]


# -- %ckpt log through IPython ------------------------------------------------------------------------
@pytest.fixture
def root(ip, tmp_path):
    with ckpt_root(ip, tmp_path / "ckpts") as path:
        yield path


CELLS = [
    "import torch\ntorch.manual_seed(0)\nmodel = torch.nn.Linear(4, 2)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)",
    "%ckpt save base model opt --step 1 --metric loss=1.0",
    "model(torch.randn(3, 4)).sum().backward(); opt.step()",
    "%ckpt save a1 model opt --step 2 --metric loss=0.5",
    "%ckpt load base",
    "opt.param_groups[0]['lr'] = 1.0; model(torch.randn(3, 4)).pow(2).sum().backward(); opt.step()",
    "%ckpt save b1 model opt --step 2 --metric loss=0.7",
]


def test_magic_log_info_and_errors(ip, root):
    for cell in CELLS:
        run(ip, cell)
    log = run(ip, "r = %ckpt log\nr")
    assert isinstance(log, LineageLog) and log.order == ["b1", "a1", "base"] and log.parent("b1") == "base"
    assert [g for _, g in log.graph] == ["*", "| *", "|/", "*"]
    assert run(ip, "%ckpt log a1").order == ["a1", "base"]
    assert "parent:     base" in run(ip, "%ckpt info b1").to_text()
    assert "log" in ip.magics_manager.magics["line"]["ckpt"].__doc__
    msg = usage_error(ip, "%ckpt log nosuchtag")
    assert "no checkpoint 'nosuchtag'" in msg and "known tags" in msg and "\n" not in msg
    run(ip, "%ckpt rm a1")
    run(ip, "%ckpt save b2 model opt --step 3")
    run(ip, "%ckpt rm b1")
    text = run(ip, "%ckpt log").to_text()
    assert "(removed)" in text and "b2" in text


# -- torchckpt log ------------------------------------------------------------------------------------
def torchckpt(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchckpt", *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False)


def test_cli_log_text_json_and_errors(tmp_path):
    ck = _tree(tmp_path)
    ck.remove("b1")
    ck.close()
    proc = torchckpt("log", ck.root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split()[:2] == ["*", "b2"] and "(removed)" in proc.stdout
    doc = json.loads(torchckpt("log", ck.root, "--json").stdout)
    by_tag = {t["tag"]: t for t in doc["tags"]}
    assert by_tag["b2"]["parent"] == "b1" and by_tag["b1"]["status"] == "removed"
    assert by_tag["a1"]["parent"] == "base" and by_tag["base"]["children"] == ["a1"]
    assert json.loads(torchckpt("log", ck.root, "a1", "--json").stdout)["focus"] == "a1"
    for args, needle in (((tmp_path / "nope",), "does not exist"), ((ck.root, "nosuch"), "no checkpoint 'nosuch'")):
        proc = torchckpt("log", *args)
        assert proc.returncode == 2
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("torchckpt: error: ") and needle in lines[0], proc.stderr


def test_a_parent_being_rewritten_or_unreadable_is_named_so(tmp_path):
    ck = _tree(tmp_path)
    (ck.root / "b1" / MANIFEST_NAME).write_text("{not json")
    log = ck.log()
    assert log.nodes["b1"].status == "unreadable" and log.parent("b2") == "b1"
    assert "parent b1 unreadable" in log.to_text()
    ck.close()
