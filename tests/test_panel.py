"""The checkpoint panel without a front end: driven through its widgets, checked on the store
and on the live objects. The browser test (test_panel_browser.py) covers the real JupyterLab."""

from __future__ import annotations

import html
import re
import threading
import time
from concurrent.futures import Executor, Future

import pytest
import torch
from IPython.core.events import EventManager, available_events

import torchckpt
from torchckpt import panel as panel_module
from torchckpt.errors import InvalidTagError, RestoreError
from torchckpt.notebook import Checkpointer
from torchckpt.panel import CheckpointPanel


class HeldExecutor(Executor):
    """Queues jobs until the test runs them: the state 'while the background work runs'."""

    def __init__(self):
        self.jobs: list[tuple[Future, callable]] = []

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        self.jobs.append((future, lambda: fn(*args, **kwargs)))
        return future

    def run_all(self):
        while self.jobs:
            future, job = self.jobs.pop(0)
            future.set_result(job())

    def cancel_all(self):
        """Drop the jobs a failed test left queued, so that closing its panel does not wait for them."""
        while self.jobs:
            self.jobs.pop(0)[0].cancel()


class FakeShell:
    """What the panel uses of IPython: the user namespace and the event hooks."""

    def __init__(self, ns):
        self.user_ns = ns
        self.events = EventManager(self, available_events)


@pytest.fixture
def ns():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return {"model": model, "opt": opt, "step": 7, "tempfile": object()}


@pytest.fixture
def make_panel(root, ns):
    panels = []

    def make(**kwargs):
        kwargs.setdefault("executor", "inline")
        kwargs.setdefault("poll_interval", None)
        if "checkpointer" not in kwargs:
            kwargs.setdefault("root", root)
        p = CheckpointPanel(namespace=kwargs.pop("namespace", ns), **kwargs)
        panels.append(p)
        return p

    yield make
    for p in panels:
        if isinstance(p._executor, HeldExecutor):
            p._executor.cancel_all()
        p.close()


def save(p, tag, *, note="", metrics=""):
    p.tag_input.value = tag
    p.note_input.value = note
    p.metrics_input.value = metrics
    p.save_button.click()
    p.wait()
    assert p.last_error is None, p.status.value


def text(widget):
    """What an HTML widget shows, as plain text."""
    return html.unescape(re.sub(r"<[^>]+>", "", widget.value))


def enabled(p):
    buttons = {"save": p.save_button, "load": p.load_button, "commit": p.commit_button, "verify": p.verify_button,
               "diff": p.diff_button, "delete": p.delete_button}
    return {name for name, b in buttons.items() if not b.disabled}


def log_text(p):
    return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in p.log.outputs)


def test_save_then_load_restores_a_changed_model(make_panel, ns, root):
    p = make_panel()
    model, opt = ns["model"], ns["opt"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = opt.state_dict()["state"][0]["exp_avg"].clone()
    assert p.tag_input.value == "step-7"  # the suggested tag follows the notebook's step
    assert dict(p.objects_select.options) == {"model (module)": "model", "opt (optimizer)": "opt", "step (value)": "step"}
    assert p.objects_select.value == ("model", "opt", "step")

    save(p, "warmup", note="after one step", metrics="loss=0.25, acc=0.5")

    info = p.checkpointer.store.info("warmup")
    assert info.committed and info.is_latest
    assert info.metadata["note"] == "after one step"
    assert info.metadata["metrics"] == {"loss": 0.25, "acc": 0.5}
    assert info.metadata["step"] == 7
    assert sorted(info.metadata["objects"]) == ["model", "opt", "step"]
    assert list(p.rows) == ["warmup"] and p.selected == ["warmup"]
    cells = {k: c.value for k, c in p.rows["warmup"].cells.items()}
    assert "torchckpt-latest" in cells["tag"] and "committed" in cells["status"]
    assert "loss=0.25" in cells["metrics"] and "acc=0.5" in cells["metrics"] and "after one step" in cells["note"]
    assert p.progress.value == p.progress.max and p.progress.bar_style == "success"
    assert "saved 'warmup': committed model, opt, step" in text(p.status)
    assert p.tag_input.value != "warmup" and p.note_input.value == ""

    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    ns["step"] = 99
    assert not torch.equal(model[0].weight, before["0.weight"])

    p.map_location.value = "cpu"
    p.load_button.click()
    p.wait()
    assert p.last_error is None, p.status.value
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt_before)
    assert ns["step"] == 7
    assert "loaded 'warmup' onto cpu: model, opt, step + RNG" in text(p.status)
    assert "loaded 'warmup'" in log_text(p)


def test_buttons_follow_the_selection_and_the_tag(make_panel):
    p = make_panel()
    assert enabled(p) == {"save"}
    save(p, "a")
    save(p, "b")
    p.select()
    assert enabled(p) == {"save"}
    p.select("a")
    assert enabled(p) == {"save", "load", "verify", "delete"}
    p.select("a", "b")
    assert enabled(p) == {"save", "verify", "diff", "delete"}
    p.tag_input.value = "bad/tag"
    assert "save" not in enabled(p)
    p.tag_input.value = "good"
    p.objects_select.value = ()
    assert "save" not in enabled(p)


def test_background_work_disables_buttons_and_does_not_block(make_panel, ns, held_writes):
    held = HeldExecutor()
    p = make_panel(executor=held)
    p.tag_input.value = "bg"
    p.save_button.click()  # returns after the snapshot; the writes and the commit are queued
    assert p.busy == "save"
    assert enabled(p) == set() and p.refresh_button.disabled
    assert "bg" in p.checkpointer.pending()
    assert "pending" in p.rows["bg"].cells["status"].value
    p.verify_button.click()  # a click that gets past `disabled` is refused, not queued
    assert "verify: busy with save; wait for it to finish" in text(p.status) and len(held.jobs) == 1
    # The snapshot is taken at the click: changing the model now does not change the checkpoint.
    saved_weight = ns["model"][0].weight.detach().clone()
    with torch.no_grad():
        ns["model"][0].weight.zero_()
    held_writes()
    held.run_all()
    assert p.busy is None and "committed" in p.rows["bg"].cells["status"].value
    assert enabled(p) >= {"save", "load"}
    p.load_button.click()
    held.run_all()
    assert torch.equal(ns["model"][0].weight, saved_weight)


def test_save_reports_progress(make_panel):
    p = make_panel()
    seen = []
    p.progress.observe(lambda change: seen.append(change["new"]), names="value")
    save(p, "progress")
    assert any(0 < v < p.progress.max for v in seen), seen
    assert seen[-1] == p.progress.max


def test_save_progress_follows_the_bytes_the_writer_reports(make_panel, held_writes):
    held_jobs = HeldExecutor()
    p = make_panel(executor=held_jobs)
    seen = []
    p.progress.observe(lambda change: seen.append(change["new"]), names="value")
    p.tag_input.value = "fed"
    p.save_button.click()  # the snapshot: the first fifth of the bar
    snapshot_end = int(p.progress.max * panel_module._SNAPSHOT_SHARE)
    assert p.progress.value == snapshot_end
    job = threading.Thread(target=held_jobs.run_all)  # the panel's job: waits on the save's handle
    job.start()
    try:
        deadline = time.monotonic() + 30
        while not any(t.name.startswith("torchckpt-writer") for t in threading.enumerate()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert p.progress.value == snapshot_end  # nothing written yet: the bar waits for bytes
        assert not [t.name for t in threading.enumerate() if "panel-commit" in t.name]  # no thread of its own
    finally:
        held_writes()
        job.join(60)
    assert p.last_error is None, p.status.value
    written = [v for v in seen if v > snapshot_end]
    assert any(v < 0.99 * p.progress.max for v in written), seen  # fed while the files were being written
    assert written == sorted(written) and seen[-1] == p.progress.max
    assert "saved 'fed': committed" in text(p.status) and not hasattr(panel_module, "_bytes_under")


def test_default_thread_executor_runs_save_and_load(root, ns):
    p = CheckpointPanel(root=root, namespace=ns, poll_interval=None)
    try:
        save(p, "threaded")
        with torch.no_grad():
            ns["model"][0].bias.fill_(3.0)
        p.load_button.click()
        p.wait(timeout=30)
        assert p.last_error is None, p.status.value
        assert not torch.all(ns["model"][0].bias == 3.0)
    finally:
        p.close()


def test_unticked_objects_are_not_saved_nor_loaded(make_panel, ns):
    p = make_panel()
    p.objects_select.value = ("model", "step")
    save(p, "partial")
    assert sorted(p.checkpointer.store.info("partial").metadata["objects"]) == ["model", "step"]
    save(p, "full-after-tick")  # the choice sticks across saves and refreshes
    assert sorted(p.checkpointer.store.info("full-after-tick").metadata["objects"]) == ["model", "step"]

    p.objects_select.value = ("model", "opt", "step")
    save(p, "all")
    p.objects_select.value = ("model", "opt")
    ns["step"] = 123
    p.select("all")
    p.load_button.click()
    p.wait()
    assert ns["step"] == 123  # unticked: not restored
    assert "loaded 'all'" in text(p.status) and "step" not in text(p.status).split(":", 1)[1]


def test_commit_button_commits_a_save_made_without_commit(make_panel):
    p = make_panel()
    p.commit_toggle.value = False
    save(p, "later")
    assert "later" in p.checkpointer.pending()
    assert not p.checkpointer.store.info("later").committed
    assert "pending" in p.rows["later"].cells["status"].value
    assert "not committed" in text(p.status)
    assert "commit" in enabled(p) and "delete" not in enabled(p)
    p.commit_button.click()
    p.wait()
    assert p.checkpointer.store.info("later").committed
    assert "committed 'later'" in text(p.status)
    assert "commit" not in enabled(p)


def test_diff_of_two_ticked_tags_is_logged(make_panel, ns):
    p = make_panel()
    save(p, "one")
    with torch.no_grad():
        ns["model"][2].bias.add_(0.5)
    save(p, "two")
    p.select("two", "one")
    p.diff_button.click()
    p.wait()
    assert p.last_error is None, p.status.value
    assert "one → two" in text(p.status)  # older first, whatever the ticking order
    html_out = [o for o in p.log.outputs if o["output_type"] == "display_data"]
    assert len(html_out) == 1 and "model/2.bias" in html_out[0]["data"]["text/html"]


def test_verify_reports_a_corrupt_file_as_an_error(make_panel, root):
    p = make_panel()
    save(p, "good")
    save(p, "bad")
    victim = root / "bad" / "objects" / "model.pt"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.unlink()  # "good" shares this file (a hard link: the model did not change); damage "bad"'s only
    victim.write_bytes(bytes(data))
    p.select("good", "bad")
    p.verify_button.click()
    p.wait()
    assert "verify: 'bad' FAILED" in text(p.status) and "color:#c62828" in p.status.value
    assert p.progress.bar_style == "danger"
    errors = [o["text"] for o in p.log.outputs if o.get("name") == "stderr"]
    assert any("objects/model.pt: checksum mismatch" in e for e in errors)
    assert "good: OK" in log_text(p)


def test_delete_asks_and_latest_needs_a_second_confirmation(make_panel):
    p = make_panel()
    save(p, "old")
    save(p, "new")  # latest
    store = p.checkpointer.store

    p.select("old")
    p.delete_button.click()
    assert p.confirm_box.layout.display == "flex" and "Delete 'old'?" in text(p.confirm_text)
    assert enabled(p) == set()  # nothing else while a question is open
    p.cancel_button.click()
    assert store.tags() == ["old", "new"] and p.confirm_box.layout.display == "none"

    p.delete_button.click()
    p.confirm_button.click()
    p.wait()
    assert store.tags() == ["new"] and list(p.rows) == ["new"]

    p.select("new")
    p.delete_button.click()
    p.confirm_button.click()
    assert store.tags() == ["new"]  # one confirmation is not enough for `latest`
    assert "is latest" in text(p.confirm_text) and p.confirm_button.description == "Delete latest too"
    p.confirm_button.click()
    p.wait()
    assert store.tags() == [] and "deleted 'new'" in text(p.status)


def test_ticking_another_row_cancels_an_open_question(make_panel):
    p = make_panel()
    save(p, "x")
    save(p, "y")
    p.select("x")
    p.delete_button.click()
    p.rows["y"].checkbox.value = True
    assert p.confirm_box.layout.display == "none"
    p.confirm_button.click()  # a stale click: nothing to confirm, nothing deleted
    assert p.checkpointer.store.tags() == ["x", "y"]


def test_saving_over_an_existing_tag_asks_first(make_panel, ns):
    p = make_panel()
    save(p, "dup")
    first = p.checkpointer.store.info("dup").created
    p.tag_input.value = "dup"
    p.save_button.click()
    assert "'dup' exists (committed): replace it?" in text(p.confirm_text)
    assert p.checkpointer.store.info("dup").created == first
    p.confirm_button.click()
    p.wait()
    assert p.checkpointer.store.info("dup").created > first
    assert "saved 'dup'" in text(p.status)


def test_errors_in_callbacks_are_shown_not_lost(make_panel, ns, monkeypatch):
    p = make_panel()
    p.tag_input.value = "a/b"
    p.save_button.click()  # .click() runs the handler even while the button is disabled
    assert isinstance(p.last_error, InvalidTagError)
    assert "save failed: tag 'a/b' contains a path separator" in text(p.status)

    save(p, "small")
    ns["model"] = torch.nn.Linear(3, 3)  # a different architecture under the same name
    p.load_button.click()
    p.wait()
    assert isinstance(p.last_error, RestoreError)
    assert "load failed: nothing was restored" in text(p.status)
    assert p.busy is None and "load" in enabled(p)
    assert p.progress.bar_style == "danger"

    def broken(tag):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(p.checkpointer, "verify", broken)
    p.verify_button.click()
    p.wait()
    assert "verify failed: boom" in text(p.status)
    assert "Traceback" in log_text(p) and "ZeroDivisionError" in log_text(p)  # not ours: traceback kept


def test_load_needs_exactly_one_tick(make_panel):
    p = make_panel()
    save(p, "p")
    save(p, "q")
    p.select("p", "q")
    p.load_button.click()
    assert "load: tick exactly one checkpoint to load (2 ticked)" in text(p.status)


def test_sort_orders_the_table(make_panel):
    p = make_panel()
    save(p, "z-first")
    time.sleep(0.01)
    save(p, "a-second")
    assert list(p.rows) == ["a-second", "z-first"]
    p.sort.value = "oldest first"
    assert list(p.rows) == ["z-first", "a-second"]
    assert [r.box for r in p.rows.values()] == list(p.table.children[1:])
    p.sort.value = "tag"
    assert list(p.rows) == ["a-second", "z-first"]


def test_refreshes_after_each_cell_and_picks_up_saves_made_in_code(root, ns, monkeypatch):
    shell = FakeShell(ns)
    monkeypatch.setattr(panel_module, "_ipython", lambda: shell)
    ckpt = Checkpointer(root)
    p = CheckpointPanel(checkpointer=ckpt, executor="inline", poll_interval=None)  # namespace: the shell's
    assert p.namespace is ns
    ckpt.save("from-code", {"model": ns["model"]})
    ns["extra"] = torch.zeros(3)
    assert "from-code" not in p.rows
    shell.events.trigger("post_run_cell", None)
    assert "from-code" in p.rows
    assert "extra" in p.objects_select.value  # new variables are ticked by default
    p.close()
    assert shell.events.callbacks["post_run_cell"] == []
    assert not ckpt._closed  # not the panel's to close
    ckpt.close()


def test_polls_while_a_save_made_elsewhere_is_pending(make_panel, root, ns):
    ckpt = Checkpointer(root)
    p = make_panel(checkpointer=ckpt, poll_interval=0.05)
    ckpt.save("elsewhere", {"model": ns["model"]}, async_save=True, commit=False)
    p.refresh()
    assert "pending" in p.rows["elsewhere"].cells["status"].value
    threading.Thread(target=ckpt.commit, args=("elsewhere",)).start()
    deadline = time.monotonic() + 10
    while "committed" not in p.rows["elsewhere"].cells["status"].value:
        assert time.monotonic() < deadline, "the panel did not pick up the commit"
        time.sleep(0.02)


def test_poll_interval_follows_the_checkpointers_options(root, ns):
    from dataclasses import replace

    from torchckpt.options import CheckpointOptions

    ckpt = Checkpointer(root, options=CheckpointOptions(poll_interval=0.05))
    p = CheckpointPanel(checkpointer=ckpt, namespace=ns, executor="inline")  # no poll_interval of its own
    try:
        assert p.poll_interval == 0.05
        ckpt.save("elsewhere", {"model": ns["model"]}, async_save=True, commit=False)
        p.refresh()
        threading.Thread(target=ckpt.commit, args=("elsewhere",)).start()
        deadline = time.monotonic() + 10
        while "committed" not in p.rows["elsewhere"].cells["status"].value:
            assert time.monotonic() < deadline, "the panel did not poll at the options' interval"
            time.sleep(0.02)
        ckpt.options = replace(ckpt.options, poll_interval=None)  # %config CkptMagics.poll_interval = None
        assert p.poll_interval is None
        p.poll_interval = 3  # its own, from now on
        ckpt.options = replace(ckpt.options, poll_interval=1.0)
        assert p.poll_interval == 3
    finally:
        p.close()
        ckpt.close()
    with pytest.raises(ValueError, match=r"^poll_interval must be a number of seconds > 0, or None \(never\), got -1$"):
        CheckpointPanel(root=root, namespace=ns, executor="inline", poll_interval=-1)


def test_constructor_arguments(root, ns, monkeypatch):
    with pytest.raises(TypeError, match="takes a checkpointer or a root"):
        CheckpointPanel(namespace=ns)
    with pytest.raises(TypeError, match="takes a checkpointer or a root"):
        CheckpointPanel(Checkpointer(root), ns, root=root)
    monkeypatch.setattr(panel_module, "_ipython", lambda: None)
    with pytest.raises(TypeError, match="needs namespace= outside IPython"):
        CheckpointPanel(root=root)
    with pytest.raises(ValueError, match="executor must be an Executor or 'inline'"):
        CheckpointPanel(root=root, namespace=ns, executor="threads")
    assert torchckpt.CheckpointPanel is CheckpointPanel


def test_map_location_choices_and_display(make_panel):
    p = make_panel()
    labels = [label for label, _ in p.map_location.options]
    assert labels[:3] == ["as saved", "cpu", "auto"]
    assert labels[3:] == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    bundle = p._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == p.widget.model_id
    assert "torchckpt-panel" in p.widget._dom_classes


def test_close_closes_widgets_and_its_own_checkpointer(root, ns):
    p = CheckpointPanel(root=root, namespace=ns, executor="inline", poll_interval=None)
    save(p, "c")
    row = p.rows["c"]
    p.close()
    assert p.widget.comm is None and p.save_button.comm is None and row.checkbox.comm is None
    assert p.checkpointer._closed
    p.close()  # twice is fine


@pytest.mark.gpu
def test_load_onto_cpu_restores_a_cuda_model_in_place(make_panel, ns):
    model = ns["model"].cuda()
    ns["opt"] = torch.optim.Adam(model.parameters())
    p = make_panel()
    assert "cuda:0" in [label for label, _ in p.map_location.options]
    save(p, "gpu")
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.zero_()
    p.map_location.value = "cpu"
    p.load_button.click()
    p.wait()
    assert p.last_error is None, p.status.value
    assert model[0].weight.device.type == "cuda" and torch.equal(model[0].weight, before)


def test_load_restores_on_the_kernel_thread_even_with_a_background_executor(make_panel, ns):
    """A restore must not run beside the next cell: Load never goes to the background executor."""
    held = HeldExecutor()
    p = make_panel(executor=held)
    p.tag_input.value = "base"
    p.save_button.click()
    held.run_all()
    p.wait()
    assert p.checkpointer.store.info("base").committed
    model = ns["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    p.select("base")
    p.load_button.click()
    assert not held.jobs, "the load must not wait for the background executor"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "loaded 'base'" in text(p.status)


def test_status_and_note_cells_carry_their_own_titles(make_panel):
    """The status cell's tooltip is the status's meaning, the note cell's the whole note (one
    vocabulary: torchckpt.results)."""
    from torchckpt import results

    p = make_panel()
    save(p, "titled", note="a long note that the table cuts " * 3)
    status_cell = p.rows["titled"].cells["status"].value
    note_cell = p.rows["titled"].cells["note"].value
    assert html.escape(results.STATUS_MEANINGS["committed"], quote=True) in status_cell
    assert "a long note that the table cuts a long note" in note_cell
    assert results.STATUS_COLOURS["committed"] in status_cell
