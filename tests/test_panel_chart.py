"""The panel's chart: a metric against step, one line per lineage branch, drawn only when shown
and redrawn as tags arrive (headless, through the widgets)."""

from __future__ import annotations

import pytest
import torch

from torchckpt.notebook import Checkpointer
from torchckpt.panel import CheckpointPanel


@pytest.fixture
def ns():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.1), "step": 10}


@pytest.fixture
def panel(tmp_path, ns):
    ck = Checkpointer(tmp_path / "ckpts")
    p = CheckpointPanel(checkpointer=ck, namespace=ns, executor="inline", poll_interval=None)
    yield p
    p.close()
    ck.close()


def save(p, tag, metrics):
    p.tag_input.value = tag
    p.metrics_input.value = metrics
    p.save_button.click()
    p.wait()
    assert p.last_error is None, p.status.value


def test_chart_is_drawn_only_when_shown_and_follows_new_tags(panel, ns):
    save(panel, "base", "loss=1.0 acc=0.2")
    assert panel.chart_plot is None and panel.chart_box.layout.display == "none"
    panel.chart_toggle.value = True
    assert panel.chart_box.layout.display == "flex"
    assert list(panel.chart_metric.options) == ["acc", "loss"] and panel.chart_metric.value == "acc"
    panel.chart_metric.value = "loss"
    assert panel.chart_plot.data("loss") == {"base": [(10, 1.0)]}
    first = panel.chart_image.value
    assert first[:4] == b"\x89PNG"
    ns["step"] = 20
    save(panel, "a", "loss=0.5")  # branches from base (the panel's last save)
    panel.checkpointer.load("base", ns)
    ns["step"] = 20
    panel.checkpointer.save("b", ns, metrics={"loss": 0.8}, step=20)
    panel.refresh()
    assert panel.chart_plot.data("loss") == {"a": [(10, 1.0), (20, 0.5)], "b": [(10, 1.0), (20, 0.8)]}
    assert panel.chart_image.value != first and "2 branches" in panel.chart_note.value
    panel.chart_toggle.value = False
    assert panel.chart_box.layout.display == "none"


def test_chart_without_metrics_says_how_to_get_some(panel):
    save(panel, "plain", "")
    panel.chart_toggle.value = True
    assert "no checkpoint has a numeric metric" in panel.chart_note.value and panel.chart_image.value == b""
    assert panel.last_error is None
