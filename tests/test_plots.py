"""``%ckpt plot`` and ``%ckpt diff --plot``: the data in the results, the picture on demand, the
errors in one line, and matplotlib imported only when a chart is drawn."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from _shell import ckpt_root, ip, run, usage_error  # noqa: F401 - ip is a fixture

from torchckpt.notebook import Checkpointer
from torchckpt.plots import DiffPlot, MetricNotFoundError, MetricPlot


def _branches(root) -> Checkpointer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ns = {"model": model, "opt": opt}
    ck = Checkpointer(root)
    ck.save("base", ns, step=10, metrics={"loss": 1.0, "acc": 0.5, "opt": "sgd"})
    for lr, name in ((0.01, "slow"), (0.5, "fast")):
        ck.load("base", ns)
        opt.param_groups[0]["lr"] = lr
        for step in (20, 30):
            model(torch.randn(5, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            ck.save(f"{name}-{step}", ns, step=step, metrics={"loss": lr + 1.0 / step})
    ck.save("nostep", ns, metrics={"loss": 0.0})  # no step: not on the chart
    return ck


def test_metric_plot_has_one_line_per_branch(tmp_path):
    with _branches(tmp_path) as ck:
        plot = ck.plot(["loss"])
        assert isinstance(plot, MetricPlot) and plot.metrics == ["loss"]
        data = plot.data("loss")
        assert set(data) == {"slow-30", "fast-30"}
        assert data["slow-30"] == [(10, 1.0), (20, 0.01 + 1 / 20), (30, 0.01 + 1 / 30)]
        assert [p.tag for p in plot.series["loss"]["fast-30"]] == ["base", "fast-20", "fast-30"]
        assert ck.plot().metrics == ["acc", "loss"]  # every numeric metric; text ones left out
        assert "fast-30" in plot.to_text() and "2 branches" in repr(plot)
        png = plot._repr_png_()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and plot._repr_html_() is None
        fig = plot.figure()
        lines = fig.axes[0].get_lines()
        assert sorted(line.get_label() for line in lines) == ["fast-30", "slow-30"]
        texts = {t.get_text() for t in fig.axes[0].texts}
        assert {"base", "slow-20", "fast-30"} <= texts


def test_metric_errors_name_the_metrics_there_are(tmp_path):
    with _branches(tmp_path) as ck:
        with pytest.raises(MetricNotFoundError, match=r"no checkpoint .* numeric metric 'los'; did you mean 'loss'"):
            ck.plot(["los"])
        with pytest.raises(MetricNotFoundError, match="plot one of: acc, loss"):
            ck.plot(["opt"])  # text, not a number
    with Checkpointer(tmp_path / "empty") as ck, pytest.raises(MetricNotFoundError, match="no checkpoint"):
        ck.plot()


def test_diff_plot_keeps_the_relative_change_per_parameter_in_module_order(tmp_path):
    with _branches(tmp_path) as ck:
        plot = ck.diff_plot("base", "fast-30")
        assert isinstance(plot, DiffPlot)
        assert list(plot.relative) == ["model/0.weight", "model/0.bias", "model/2.weight", "model/2.bias"]
        a = ck.store.load("base", "objects/model.pt")
        b = ck.store.load("fast-30", "objects/model.pt")
        for key, value in plot.relative.items():
            name = key.split("/", 1)[1]
            expect = float((b[name].double() - a[name].double()).norm() / a[name].double().norm())
            assert math.isclose(value, expect, rel_tol=1e-9), key
        assert plot.diff.changed_tensors and plot.moved
        assert ck.diff_plot("base", "base").moved == {}
        fig = plot.figure()
        assert len(fig.axes[0].patches) == 4
        assert plot._repr_png_()[:4] == b"\x89PNG"


def test_relative_change_of_a_zero_tensor_is_inf(tmp_path):
    with Checkpointer(tmp_path) as ck:
        m = torch.nn.Linear(2, 2)
        torch.nn.init.zeros_(m.bias)
        ck.save("a", {"m": m})
        with torch.no_grad():
            m.bias.fill_(1.0)
        ck.save("b", {"m": m})
        rel = ck.diff_plot("a", "b").relative
    assert rel["m/weight"] == 0.0 and rel["m/bias"] == math.inf


# -- through IPython --------------------------------------------------------------------------------
def test_magics_plot_and_diff_plot(ip, tmp_path):
    _branches(tmp_path / "ckpts").close()
    with ckpt_root(ip, tmp_path / "ckpts"):  # the shell is shared with other test files
        plot = run(ip, "r = %ckpt plot loss\nr")
        assert isinstance(plot, MetricPlot) and set(plot.data("loss")) == {"slow-30", "fast-30"}
        assert run(ip, "%ckpt plot").metrics == ["acc", "loss"]
        d = run(ip, "%ckpt diff base slow-30 --plot")
        assert isinstance(d, DiffPlot) and d.diff.b == "slow-30" and len(d.relative) == 4
        msg = usage_error(ip, "%ckpt plot nosuchmetric")
        assert "nosuchmetric" in msg and "plot one of: acc, loss" in msg and "\n" not in msg
        assert "no checkpoint 'nosuch'" in usage_error(ip, "%ckpt diff base nosuch --plot")


def test_load_ext_imports_neither_torch_nor_matplotlib():
    code = ("import sys\nfrom IPython.core.interactiveshell import InteractiveShell\n"
            "ip = InteractiveShell.instance()\nip.run_line_magic('load_ext', 'torchckpt')\n"
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ,
                         timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_a_missing_matplotlib_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    with _branches(tmp_path) as ck:
        plot = ck.plot(["loss"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    from torchckpt.errors import MissingExtraError

    with pytest.raises(MissingExtraError, match=r"pip install 'torchckpt\[lab\]'"):
        plot.figure()
    assert plot.data("loss")  # the numbers need no matplotlib
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else object())
    assert plot._repr_png_() is None  # shown as text, never a formatter traceback
    assert "the chart needs matplotlib" in plot.to_text()
