"""``%ckpt`` through a real IPython shell: every subcommand, every error path, the resume."""

from __future__ import annotations

import json
import time

import pytest
import torch
from _shell import ckpt_root, ip, run, usage_error  # noqa: F401 - ip is a fixture

from torchckpt.errors import WriteError
from torchckpt.magics import CkptMagics


@pytest.fixture
def root(ip, tmp_path):
    """Point %ckpt at a fresh root; forget the test's variables afterwards."""
    with ckpt_root(ip, tmp_path / "ckpts") as path:
        yield path


SETUP = """
import random, numpy as np, torch
torch.manual_seed({seed}); random.seed({seed}); np.random.seed({seed})
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
X = torch.randn(64, 8); Y = X.sum(1, keepdim=True)
step = 0
def train(n):
    global step
    losses = []
    for _ in range(n):
        idx = torch.randint(0, 64, (16,))
        noise = random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        loss = ((model(X[idx]) - Y[idx]) ** 2).mean() + noise
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        step += 1
        losses.append(loss.item())
    return losses
"""


# -- the resume ---------------------------------------------------------------------------------
def test_resume_after_load_is_bit_identical_to_uninterrupted_training(ip, root):
    run(ip, SETUP.format(seed=0))
    reference = run(ip, "train(10)")
    run(ip, SETUP.format(seed=0))
    assert run(ip, "train(5)") == reference[:5]
    run(ip, "%ckpt save mid -q")
    assert run(ip, "train(3)") == reference[5:8]  # saving does not disturb training (RNG included)
    run(ip, "%ckpt load mid")
    assert run(ip, "step") == 5
    assert run(ip, "train(5)") == reference[5:]  # exact float equality: bit-identical
    # A fresh set of objects (as after a kernel restart, seeded differently) resumes the same way.
    run(ip, SETUP.format(seed=123))
    run(ip, "%ckpt load mid")
    assert run(ip, "train(5)") == reference[5:]


@pytest.mark.gpu
def test_resume_on_gpu_is_bit_identical_including_cuda_rng(ip, root):
    setup = SETUP.replace("torch.nn.Linear(16, 1))", "torch.nn.Linear(16, 1)).cuda()").replace(
        "X = torch.randn(64, 8)", "X = torch.randn(64, 8, device='cuda')").replace(
        "torch.randint(0, 64, (16,))", "torch.randint(0, 64, (16,), device='cuda')")
    run(ip, setup.format(seed=0))
    reference = run(ip, "train(8)")
    run(ip, setup.format(seed=0))
    run(ip, "train(4)")
    run(ip, "%ckpt save gpu-mid")
    run(ip, "train(3)")
    run(ip, "%ckpt load gpu-mid --map-location auto")
    assert run(ip, "train(4)") == reference[4:]
    run(ip, "%ckpt load gpu-mid model --into cpu_model --map-location cpu")
    assert run(ip, "next(cpu_model.parameters()).device.type") == "cpu"
    assert run(ip, "torch.equal(next(cpu_model.parameters()).cuda(), next(model.parameters()))")


# -- each subcommand ----------------------------------------------------------------------------
def test_save_without_names_saves_every_checkpointable_object_and_lists_them(ip, root):
    run(ip, SETUP.format(seed=0))
    run(ip, "train(2)")
    r = run(ip, "%ckpt save")
    assert r.tag == "step-2" and r.committed
    assert set(r.names) == {"model", "opt", "sched", "X", "Y", "step"}
    assert {o.name: o.kind for o in r.objects}["sched"] == "scheduler"
    html = r._repr_html_()
    assert "<table" in html and "model" in html and "Sequential" in html
    assert repr(r) == "<SaveResult 'step-2' committed: " + ", ".join(r.names) + ">"
    assert (root / "step-2" / "objects" / "model.pt").is_file() and (root / "step-2" / "rng.pt").is_file()


def test_save_names_note_metrics_and_step_go_into_the_manifest(ip, root):
    run(ip, SETUP.format(seed=0))
    r = run(ip, '%ckpt save warm model opt --note "after warm-up" --metric loss=0.25 acc=91 opt=adam --step 7')
    assert r.names == ["model", "opt"] and r.step == 7
    meta = json.loads((root / "warm" / "torchckpt-manifest.json").read_text())["metadata"]
    assert meta["note"] == "after warm-up" and meta["step"] == 7
    assert meta["metrics"] == {"loss": 0.25, "acc": 91, "opt": "adam"}
    assert meta["objects"]["model"] == {"file": "objects/model.pt", "kind": "module",
                                        "type": "torch.nn.modules.container.Sequential"}


def test_save_async_returns_a_handle_and_commit_waits(ip, root, capsys, held_writes):
    from torchckpt.pending import PendingSave

    run(ip, SETUP.format(seed=0))
    r = run(ip, "%ckpt save a1 model --async")
    assert isinstance(r, PendingSave) and r.tag == "a1" and r.names == ["model"]
    assert r.status == "committing" and not r.done() and r.bytes_written == 0 and r.total_bytes > 0
    shown = ip.display_formatter.format(r)[0]
    text = shown["text/plain"]
    assert "a1: saving in the background, 0 B of" in text and "commits when written" in text
    assert "saving in the background" in shown["text/html"] and "model" in shown["text/html"]
    assert run(ip, "%ckpt save a1b model --async -q") is not None
    assert ip.display_formatter.format(run(ip, "_"))[0]["text/plain"].startswith("<PendingSave ")
    held_writes()
    done = run(ip, "%ckpt commit a1")
    assert done.committed and done.objects[0].size > 0
    assert r.done() and r.committed and r.bytes_written == r.total_bytes == done.checkpoint_size
    assert ip.display_formatter.format(r)[0]["text/plain"].startswith("a1: committed")
    assert run(ip, "%ckpt verify a1").ok
    ip.user_ns["handle"] = r
    assert run(ip, "handle.wait(timeout=5).committed")


def test_post_run_cell_reports_a_finished_async_save_once(ip, root, capsys):
    run(ip, SETUP.format(seed=0))
    magics = ip.magics_manager.registry["CkptMagics"]
    magics.report_async = False  # so the save's own cell cannot report it: no race below
    run(ip, "%ckpt save a2 model --async")
    magics.report_async = True
    ckpt = magics.checkpointer
    deadline = time.monotonic() + 30
    while ckpt.pending() and time.monotonic() < deadline:  # pending() does not consume the outcome
        time.sleep(0.01)
    capsys.readouterr()
    run(ip, "1")
    assert "async save 'a2' committed" in capsys.readouterr().out
    run(ip, "1")
    assert "a2" not in capsys.readouterr().out


def test_a_failed_async_save_is_reported_after_the_cell_and_by_commit(ip, root, capsys, monkeypatch):
    import errno

    import torchckpt.serialization

    def full(obj, stream):
        raise OSError(errno.ENOSPC, "No space left on device")

    run(ip, "x = torch.ones(3)" if "torch" in ip.user_ns else "import torch; x = torch.ones(3)")
    magics = ip.magics_manager.registry["CkptMagics"]
    monkeypatch.setattr(torchckpt.serialization, "save", full)
    magics.report_async = False
    handle = run(ip, "%ckpt save bad x --async")
    magics.report_async = True
    ckpt = magics.checkpointer
    deadline = time.monotonic() + 30
    while any(p.future is not None and not p.future.done() for p in ckpt._pending.values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    capsys.readouterr()
    run(ip, "1")
    err = capsys.readouterr().err
    assert "torchckpt: async save 'bad' FAILED" in err and "no space left" in err
    with pytest.raises(WriteError, match="no space left on the device"):
        handle.wait(timeout=5)  # what %ckpt save --async returned: the save's own error
    assert handle.done() and handle.status == "failed"
    assert "no space left on the device" in usage_error(ip, "%ckpt commit bad")
    assert "no checkpoint 'bad'" in usage_error(ip, "%ckpt commit bad")  # reported once; nothing left


def test_save_no_commit_then_commit(ip, root):
    run(ip, SETUP.format(seed=0))
    r = run(ip, "%ckpt save later model --no-commit")
    assert r.status == "uncommitted"
    listing = run(ip, "%ckpt ls")
    assert [i.tag for i in listing] == ["later"] and "pending" in listing.to_text()
    assert "incomplete" in usage_error(ip, "%ckpt load later")
    c = run(ip, '%ckpt commit later --note "kept"')
    assert c.committed
    assert run(ip, "%ckpt info later").info.metadata["note"] == "kept"


def test_load_names_map_location_no_strict_and_into(ip, root):
    run(ip, SETUP.format(seed=0))
    run(ip, "%ckpt save base model opt")
    run(ip, "saved_w = model[0].weight.detach().clone()")
    run(ip, "with torch.no_grad(): model[0].weight.zero_()")
    r = run(ip, "%ckpt load base model --map-location cpu --no-rng")
    assert r.names == ["model"] and not r.rng and "not asked for" in r.to_text()
    assert run(ip, "torch.equal(model[0].weight, saved_w)")
    r = run(ip, "%ckpt load latest model --into copy")
    assert run(ip, "copy is not model and torch.equal(copy[0].weight, model[0].weight)")
    assert r.objects[0].action == "into" and r.objects[0].target == "copy"
    run(ip, "model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.ReLU())")
    assert "unexpected keys 3.weight, 3.bias" in usage_error(ip, "%ckpt load base model")
    r = run(ip, "%ckpt load base model --no-strict")
    assert any("unexpected keys" in n for n in r.notes)


def test_ls_info_diff_verify(ip, root):
    run(ip, SETUP.format(seed=0))
    run(ip, "%ckpt save one model --metric loss=1.5")
    run(ip, "train(2)")
    run(ip, "%ckpt save two model --metric loss=0.5")
    listing = run(ip, "%ckpt ls")
    assert listing.tags == ["one", "two"]
    text = listing.to_text()
    assert "two" in text and "loss=0.5" in text and "*" in text
    assert "<table" in listing._repr_html_()
    info = run(ip, "%ckpt info one")
    assert "objects/model.pt" in info.to_text() and "loss=1.5" in info.to_text()
    d = run(ip, "%ckpt diff one two")
    assert set(d.changed_tensors) == {"model/0.weight", "model/0.bias", "model/3.weight", "model/3.bias"}
    assert ("metrics.loss", 1.5, 0.5) in d.metadata_changes
    assert "max |Δ|" in d._repr_html_()
    assert run(ip, "%ckpt verify two").ok
    (root / "two" / "objects" / "model.pt").write_bytes(b"garbage")
    v = run(ip, "%ckpt verify two")
    assert not v.ok and "objects/model.pt" in v.to_text()


def test_rm_and_gc(ip, root):
    run(ip, "x = 1")
    for tag in ("a", "b", "c", "d"):
        run(ip, f"%ckpt save {tag} x")
    assert "is 'latest'" in usage_error(ip, "%ckpt rm d")
    r = run(ip, "%ckpt rm a")
    assert r.removed == ["a"] and not (root / "a").exists()
    plan = run(ip, "%ckpt gc --keep-last 1 --dry-run")
    assert plan.dry_run and plan.removed == ["b", "c"] and (root / "b").exists()
    plan = run(ip, "%ckpt gc --keep-last 1")
    assert plan.removed == ["b", "c"] and run(ip, "%ckpt ls").tags == ["d"]
    assert run(ip, "%ckpt rm d --force").removed == ["d"]


def test_dir_and_config(ip, root, tmp_path):
    assert run(ip, "%ckpt dir") == root
    other = tmp_path / "other"
    run(ip, f"%config CkptMagics.root = {str(other)!r}")
    assert run(ip, "%ckpt dir") == other
    (tmp_path / "afile").write_text("")
    assert "is a file, not a directory" in usage_error(ip, f"%ckpt dir {tmp_path / 'afile'}")


def test_quiet_results_show_only_their_repr(ip, root):
    run(ip, "x = 1")
    r = run(ip, "%ckpt save q x -q")
    assert r.quiet and r._repr_html_() is None
    assert run(ip, "%ckpt ls -q")._repr_html_() is None


def test_ui_shows_the_panel_or_a_clear_message(ip, root, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchckpt.panel" else real(name, *a))
    assert run(ip, "%ckpt ui") is None
    assert "panel is not part of this torchckpt version" in capsys.readouterr().out


def test_ui_displays_the_panel_over_the_magics_checkpointer(ip, root, monkeypatch):
    pytest.importorskip("torchckpt.panel")
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kw: shown.append(obj))
    monkeypatch.setattr("torchckpt.magics._shows_widgets", lambda shell: True)  # as in a Jupyter kernel
    run(ip, "x = 1")
    assert run(ip, "%ckpt ui") is None
    (panel,) = shown
    try:
        assert type(panel).__name__ == "CheckpointPanel"
        assert panel.checkpointer is ip.magics_manager.registry["CkptMagics"].checkpointer
        assert panel.namespace is ip.user_ns
    finally:
        panel.close()
    assert run(ip, "%ckpt save after-ui x").committed  # closing the panel left our checkpointer open


def test_help(ip, root, capsys):
    doc = ip.magics_manager.magics["line"]["ckpt"].__doc__
    for sub in ("save", "commit", "load", "ls", "info", "diff", "verify", "rm", "gc", "dir", "ui"):
        assert f"%ckpt {sub}" in doc
    assert run(ip, "%ckpt save --help") is None
    out = capsys.readouterr().out
    assert "--no-commit" in out and "--metric" in out
    run(ip, "%ckpt")
    assert "%ckpt load" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:`Completer.complete` is pending deprecation:PendingDeprecationWarning")
def test_completion_of_subcommands_tags_names_and_options(ip, root):
    run(ip, "x = 1")
    run(ip, "%ckpt save alpha x")
    def complete(line):
        return ip.complete(None, line, len(line))[1]

    assert complete("%ckpt lo") == ["load", "log"]
    assert complete("%ckpt loa") == ["load"]
    assert complete("%ckpt load al") == ["alpha"]
    assert complete("%ckpt diff alpha al") == ["alpha"]
    assert complete("%ckpt load alpha ") == ["x"]
    assert complete("%ckpt save t ") == ["x"]
    assert complete("%ckpt load --ma") == ["--map-location"]


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("%ckpt loda", "unknown %ckpt subcommand 'loda'; did you mean 'load'?"),
        ("%ckpt load nope", "no checkpoint 'nope'"),
        ("%ckpt load alpah", "did you mean 'alpha'?"),
        ("%ckpt info alpah", "did you mean 'alpha'?"),
        ("%ckpt diff alpha nope", "no checkpoint 'nope'"),
        ("%ckpt verify nope", "no checkpoint 'nope'"),
        ("%ckpt rm nope", "no checkpoint 'nope'"),
        ("%ckpt commit nope", "no checkpoint 'nope'"),
        ("%ckpt save t nosuchvar", "no variable 'nosuchvar' in the notebook"),
        ("%ckpt save t xx", "did you mean 'x'?"),
        ("%ckpt save ../evil x", "contains a path separator"),
        ("%ckpt save latest x", "reserved"),
        ("%ckpt save t x --metric loss", "is not key=value"),
        ("%ckpt save t fn", "cannot save"),
        ("%ckpt load alpha nothere", "has no object 'nothere'"),
        ("%ckpt load alpha x --into a y", "exactly one object, got 2: x, y"),
        ("%ckpt load alpha --into a", "exactly one object, got 2: x, y"),
        ("%ckpt load alpha --map-location cuda:0" if not torch.cuda.is_available() else "%ckpt load zz",
         "this machine has no CUDA device" if not torch.cuda.is_available() else "no checkpoint"),
        ("%ckpt gc --keep-last 0", "must be at least 1"),
        ("%ckpt gc --keep-last x", "is not a whole number"),
        ("%ckpt diff", "the following arguments are required: a"),
        ("%ckpt save --bogus", "unrecognized arguments: --bogus"),
        ("%ckpt load 'unclosed", "No closing quotation"),
    ],
)
def test_user_mistakes_raise_exactly_usage_error(ip, root, cell, message):
    run(ip, "x = 1\ny = 2\nfn = lambda: 1")
    run(ip, "%ckpt save alpha x y")
    assert message in usage_error(ip, cell)


def test_failed_load_changes_no_live_object(ip, root):
    run(ip, SETUP.format(seed=0))
    run(ip, "%ckpt save good")
    run(ip, "train(2)")
    run(ip, "before = {k: v.clone() for k, v in model.state_dict().items()}; step_before = step")
    run(ip, "opt_before = repr(opt.state_dict()['state'][0]['exp_avg'])")
    run(ip, "X = torch.zeros(3)")  # X now has another shape: the load must be refused as a whole
    assert "X: shape (64, 8) saved, (3,) live" in usage_error(ip, "%ckpt load good")
    assert run(ip, "all(torch.equal(before[k], v) for k, v in model.state_dict().items())")
    assert run(ip, "step == step_before and repr(opt.state_dict()['state'][0]['exp_avg']) == opt_before")


# -- extension lifecycle ------------------------------------------------------------------------
def test_load_unload_reload_leave_no_duplicate_hooks(ip, tmp_path):
    def counts():
        magics = [m for m in ip.configurables if isinstance(m, CkptMagics)]
        hooks = [cb for cb in ip.events.callbacks["post_run_cell"] if getattr(cb, "__self__", None) in magics]
        chain = ip.strdispatchers["complete_command"].strs.get("%ckpt")
        return len(magics), len(hooks), len(list(chain)) if chain is not None else 0

    assert counts() == (1, 1, 1)
    for _ in range(3):
        run(ip, "%reload_ext torchckpt")
    assert counts() == (1, 1, 1)
    from torchckpt import load_ipython_extension

    load_ipython_extension(ip)  # a direct second load replaces the first
    assert counts() == (1, 1, 1)
    run(ip, f"%ckpt dir {tmp_path}")
    run(ip, "%unload_ext torchckpt")
    assert counts() == (0, 0, 0)
    assert "ckpt" not in ip.magics_manager.magics["line"]
    run(ip, "%load_ext torchckpt")
    assert counts() == (1, 1, 1)
    assert run(ip, "%ckpt dir") == tmp_path  # the root survives a reload


# trait -> (a good value, how the Checkpointer shows it)
OPTION_TRAITS = {
    "lock_timeout": (5, lambda c: c.options.lock_timeout == 5 and c.store.lock_timeout == 5),
    "progress_min_mb": (1, lambda c: c.progress_min_bytes == 1 << 20),
    "auto_max_mb": (2, lambda c: c.auto_max_bytes == 2 << 20),
    "max_inflight_mb": (64, lambda c: c.options.max_inflight_bytes == 64 << 20),
    "pin_memory": (False, lambda c: c.options.pin_memory is False),
    "poll_interval": (0.5, lambda c: c.options.poll_interval == 0.5),
    "dedup": (False, lambda c: c.dedup is False),
}


@pytest.fixture
def settings(ip):
    """The magics; their option traits are put back to their defaults afterwards."""
    magics = ip.magics_manager.registry["CkptMagics"]
    yield magics
    for name in OPTION_TRAITS:
        setattr(magics, name, magics.trait_defaults(name))
        ip.config.CkptMagics.pop(name, None)  # %config keeps even refused values in the shell's config


@pytest.mark.parametrize("name", list(OPTION_TRAITS))
def test_each_config_setting_reaches_the_checkpointer(ip, root, settings, name):
    before = settings.checkpointer  # made before the %config
    value, shows = OPTION_TRAITS[name]
    assert not shows(before)
    run(ip, f"%config CkptMagics.{name} = {value!r}")
    assert getattr(settings, name) == value and shows(before)
    run(ip, f"%ckpt dir {root}-elsewhere")  # a Checkpointer made after it
    assert settings.checkpointer is not before and shows(settings.checkpointer)


def test_config_reaches_the_async_writer_already_made(ip, root, settings):
    run(ip, "import torch; w = torch.ones(10)")
    run(ip, "%ckpt save a w --async").wait(timeout=60)
    writer = settings.checkpointer._writer
    assert writer.max_inflight_bytes is None
    run(ip, "%config CkptMagics.max_inflight_mb = 0.5")
    run(ip, "%config CkptMagics.pin_memory = False")
    assert writer.max_inflight_bytes == 1 << 19 and writer.pin_memory is False
    run(ip, "%config CkptMagics.max_inflight_mb = None")
    run(ip, "%config CkptMagics.auto_max_mb = None")
    assert writer.max_inflight_bytes is None and settings.checkpointer.auto_max_bytes is None
    run(ip, "%config CkptMagics.auto_max_mb = -1")  # negative: no limit, as before
    assert settings.checkpointer.auto_max_bytes is None


@pytest.mark.parametrize(("line", "message"), [
    ("lock_timeout = -1", ("CkptMagics.lock_timeout = -1.0 is not valid: it must be a number of seconds >= 0; "
                           "the setting is unchanged")),
    ("progress_min_mb = -2", "CkptMagics.progress_min_mb = -2.0 is not valid: it must be a number of MiB >= 0"),
    ("auto_max_mb = float('nan')", ("CkptMagics.auto_max_mb = nan is not valid: it must be a number of MiB "
                                    "(negative or None: no limit)")),
    ("max_inflight_mb = 0", "CkptMagics.max_inflight_mb = 0.0 is not valid: it must be a number of MiB > 0, or None"),
    ("poll_interval = 0", "CkptMagics.poll_interval = 0.0 is not valid: it must be a number of seconds > 0, or None"),
    ("lock_timeout = 'soon'", "The 'lock_timeout' trait of a CkptMagics instance expected a float, not the str 'soon'"),
    ("pin_memory = 'yes'", "The 'pin_memory' trait of a CkptMagics instance expected a boolean, not the str 'yes'"),
])
def test_a_bad_config_value_is_one_line_and_changes_nothing(ip, root, settings, caplog, line, message):
    before = settings.checkpointer.options
    result = ip.run_cell(f"%config CkptMagics.{line}", store_history=False)
    assert result.error_in_exec is None  # %config reports it as one logged line, never a traceback
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
    assert settings.checkpointer.options == before
    name = line.split(" ")[0]
    assert getattr(settings, name) == settings.trait_defaults(name)


def test_reload_after_a_refused_config_value_names_it_and_loads(ip, root, settings, capsys):
    ip.run_cell("%config CkptMagics.lock_timeout = 'soon'", store_history=False)  # refused, yet kept by IPython
    ip.run_cell("%config CkptMagics.progress_min_mb = 3", store_history=False)
    run(ip, "%reload_ext torchckpt")
    err = capsys.readouterr().err
    assert "torchckpt: ignoring the setting CkptMagics.lock_timeout: The 'lock_timeout' trait" in err
    magics = ip.magics_manager.registry["CkptMagics"]
    assert magics.lock_timeout == 60.0 and magics.progress_min_mb == 3  # the good setting stays
    magics.progress_min_mb = 256.0
    ip.config.CkptMagics.pop("progress_min_mb", None)
