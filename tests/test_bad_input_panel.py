"""Every mistake a user can make in the checkpoint panel, through its widgets: one line on the
status line, the fix in ``%ckpt``'s words (the panel's users are notebook users), no traceback
in the log for torchckpt's own errors, and nothing changed on disk or in the namespace."""

from __future__ import annotations

import html
import os
import re

import pytest
import torch

from torchckpt.panel import CheckpointPanel

PYTHON_DIALECT = ("verify=False", "allow_incomplete=True", "strict=False", "allow=[", "trusted=True",
                  "allow_latest=True", "overwrite=True", "into=", "map_location=", "rng=")


def text(widget) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", widget.value))


def log_text(p) -> str:
    return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in p.log.outputs)


def disk(path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return out


def do_save(p, tag, *, metrics=""):
    p.tag_input.value = tag
    p.metrics_input.value = metrics
    p.save_button.click()
    p.wait()


def do_load(p, tag):
    p.select(tag)
    p.load_button.click()
    p.wait()


def value_over_module(p, ns):
    ns["model"] = 42
    p.refresh()
    do_save(p, "b")
    ns["model"] = torch.nn.Linear(2, 2)
    return lambda: do_load(p, "b")


def tensor_shape(p, ns):
    ns["t"] = torch.zeros(3)
    p.refresh()
    do_save(p, "b")
    ns["t"] = torch.zeros(4)
    return lambda: do_load(p, "b")


def unsafe(p, ns):
    do_save(p, "u")
    path = p.checkpointer.root / "u" / "objects" / "x.pt"
    import fractions
    import json

    from torchckpt._fileio import checksum_file

    torch.save(fractions.Fraction(1, 3), path)
    manifest = p.checkpointer.root / "u" / "torchckpt-manifest.json"
    doc = json.loads(manifest.read_text())
    for rec in doc["files"]:
        if rec["path"] == "objects/x.pt":
            rec["size"], rec["checksum"] = checksum_file(path)
    manifest.write_text(json.dumps(doc))
    p.refresh()
    return lambda: do_load(p, "u")


def bad_tag(p, ns):
    return lambda: do_save(p, "a/b")


def bad_metric(p, ns):
    return lambda: do_save(p, "m", metrics="loss")


CASES = [
    pytest.param(value_over_module, "load", ["saved as a plain value", "torch.nn.modules.linear.Linear", "--into model_saved"],
                 id="value-over-module"),
    pytest.param(tensor_shape, "load", ["shape (3,) saved, (4,) live", "--no-strict"], id="tensor-shape"),
    pytest.param(unsafe, "load", ["needs globals", "--allow fractions.Fraction", "--trusted"], id="unsafe-hints"),
    pytest.param(bad_tag, "save", ["contains a path separator"], id="bad-tag"),
    pytest.param(bad_metric, "save", ["is not key=value"], id="bad-metric"),
]


@pytest.mark.parametrize(("arrange", "action", "says"), CASES)
def test_every_mistake_is_one_line_in_ckpt_words_and_changes_nothing(root, arrange, action, says):
    ns = {"x": 1}
    p = CheckpointPanel(root=root, namespace=ns, executor="inline", poll_interval=None)
    try:
        act = arrange(p, ns)
        before_disk, before_ns = disk(root), dict(ns)
        act()
        status = text(p.status)
        assert "\n" not in status and status.startswith(action), status
        for part in says:
            assert part in status, status
        for kw in PYTHON_DIALECT:
            assert kw not in status, f"{kw!r} (Python's spelling) in the panel: {status}"
        assert "Traceback" not in log_text(p)
        assert disk(root) == before_disk
        assert ns.keys() == before_ns.keys() and all(ns[k] is v for k, v in before_ns.items())
    finally:
        p.close()


def test_a_partial_load_restores_the_rng_and_says_so(root):
    ns = {"model": torch.nn.Linear(2, 2), "x": 1}
    p = CheckpointPanel(root=root, namespace=ns, executor="inline", poll_interval=None)
    try:
        do_save(p, "s")
        p.objects_select.value = ("model",)  # untick x: load only the model
        state = torch.get_rng_state()
        torch.rand(3)
        do_load(p, "s")
        assert p.last_error is None, text(p.status)
        assert "loaded 's': model + RNG" in text(p.status)
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        p.close()


def test_the_objects_list_says_what_it_leaves_out(root):
    ns = {"model": torch.nn.Linear(2, 2), "cfg": {"act": lambda x: x}}
    p = CheckpointPanel(root=root, namespace=ns, executor="inline", poll_interval=None)
    try:
        assert [v for _, v in p.objects_select.options] == ["model"]
        assert "not in the objects list: cfg: cfg['act'] is a lambda" in log_text(p)
        p.refresh()
        assert log_text(p).count("cfg['act'] is a lambda") == 1
    finally:
        p.close()
