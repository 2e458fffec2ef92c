"""diff of two tags: objects, keys, shapes, dtypes, max |Δ|, values, metadata; rendering."""

from __future__ import annotations

import math

import pytest
import torch

import torchckpt.diff as diff_module
from torchckpt.diff import diff_tags, flatten, max_abs_diff
from torchckpt.errors import IncompleteCheckpointError, TagNotFoundError
from torchckpt.notebook import Checkpointer


@pytest.fixture
def ckpt(root):
    c = Checkpointer(root)
    yield c
    c.close()


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_identical_tags(ckpt):
    m = model()
    ckpt.save("a", {"model": m, "lr": 0.1}, metrics={"loss": 1.0})
    ckpt.save("b", {"model": m, "lr": 0.1}, metrics={"loss": 1.0})
    d = ckpt.diff("a", "b")
    assert d.identical and d.max_delta == 0.0 and set(d.deltas) == {"model/0.weight", "model/0.bias",
                                                                    "model/1.weight", "model/1.bias"}
    assert d.metadata_changes == [] and d.value_changes == []
    assert d.summary() == "a → b: 0 of 4 tensors changed"


def test_every_kind_of_change(ckpt):
    m = model()
    ckpt.save("a", {"model": m, "lr": 0.1, "gone": 1, "t": torch.zeros(2)}, metrics={"loss": 1.0}, note="x", step=1)
    with torch.no_grad():
        m[0].weight[1, 2] += 0.25
    sd = dict(m.state_dict())
    sd["new"] = torch.ones(1)
    del sd["1.bias"]
    sd["0.bias"] = sd["0.bias"].double()
    sd["1.weight"] = torch.zeros(2, 5)

    class Holder:
        def state_dict(self):
            return sd

        def load_state_dict(self, s): ...

    ckpt.save("b", {"model": Holder(), "lr": 0.2, "added": 2, "t": torch.zeros(2)}, metrics={"loss": 0.5}, step=2)
    d = ckpt.diff("a", "b")
    assert d.objects_added == ["added"] and d.objects_removed == ["gone"]
    assert d.keys_added == ["model/new"] and d.keys_removed == ["model/1.bias"]
    assert d.shape_changes == [("model/1.weight", (2, 4), (2, 5))]
    assert d.dtype_changes == [("model/0.bias", "torch.float32", "torch.float64")]
    assert d.changed_tensors == {"model/0.weight": pytest.approx(0.25)}
    assert d.deltas["model/0.bias"] == 0.0 and d.deltas["t"] == 0.0
    assert d.value_changes == [("lr", "0.1", "0.2")]
    assert ("metrics.loss", 1.0, 0.5) in d.metadata_changes and ("step", 1, 2) in d.metadata_changes
    assert ("note", "x", None) in d.metadata_changes
    assert not d.identical
    text = d.to_text()
    for part in ("tensors changed", "model/0.weight", "0.25", "keys", "shapes and dtypes", "(2, 5)",
                 "values", "metadata", "metrics.loss"):
        assert part in text, part
    html = d._repr_html_()
    assert "<table" in html and "max |Δ|" in html
    assert repr(d).startswith("<CheckpointDiff a → b: objects +1/-1, 1 of 3 tensors changed (max |Δ| 0.25)")


def test_wrapper_prefixes_are_normalised(ckpt):
    m = model()
    ckpt.save("plain", {"model": m})

    class Compiled:  # what torch.compile's and DDP's state_dicts look like
        def state_dict(self):
            return {f"module._orig_mod.{k}": v for k, v in m.state_dict().items()}

        def load_state_dict(self, s): ...

    ckpt.save("wrapped", {"model": Compiled()})
    d = ckpt.diff("plain", "wrapped")
    assert d.keys_added == [] and d.keys_removed == [] and d.identical


def test_optimizer_state_is_compared_by_flattened_keys(ckpt):
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    ckpt.save("a", {"opt": opt})
    opt.step()
    opt.param_groups[0]["lr"] = 0.05
    ckpt.save("b", {"opt": opt})
    d = ckpt.diff("a", "b")
    assert "opt/state.0.exp_avg" in d.changed_tensors
    assert ("opt/param_groups.0.lr", "0.1", "0.05") in d.value_changes


def test_tags_written_without_the_notebook_api_compare_file_by_file(ckpt):
    for tag, value in (("a", 1.0), ("b", 3.0)):
        with ckpt.store.transaction(tag) as tx:
            tx.write("mp_rank_00_model_states.pt", {"module": {"module.w": torch.full((2,), value)}, "iter": 1})
            tx.commit()
    d = diff_tags(ckpt.store, "a", "latest")
    assert d.b == "b" and d.changed_tensors == {"mp_rank_00_model_states.pt/w": 2.0}


def test_unknown_or_incomplete_tags(ckpt, root):
    ckpt.save("a", {"x": 1})
    with pytest.raises(TagNotFoundError, match="did you mean 'a'"):
        ckpt.diff("a", "aa")
    (root / "half").mkdir()
    with pytest.raises(IncompleteCheckpointError):
        ckpt.diff("a", "half")


def test_long_lists_are_cut_in_the_rendering_but_kept_in_the_result(ckpt):
    ckpt.save("a", {f"v{i}": i for i in range(30)})
    ckpt.save("b", {f"v{i}": i + 1 for i in range(30)})
    d = ckpt.diff("a", "b")
    assert len(d.value_changes) == 30
    assert "… 10 more" in d.to_text()


def test_max_abs_diff():
    assert max_abs_diff(torch.tensor([1, 5]), torch.tensor([4, 5])) == 3.0
    assert max_abs_diff(torch.tensor([True, False]), torch.tensor([True, True])) == 1.0
    assert max_abs_diff(torch.empty(0), torch.empty(0)) == 0.0
    assert max_abs_diff(torch.tensor([1 + 1j]), torch.tensor([1 + 4j])) == 3.0
    nan = float("nan")
    assert max_abs_diff(torch.tensor([nan, 1.0]), torch.tensor([nan, 1.5])) == 0.5
    assert math.isnan(max_abs_diff(torch.tensor([nan]), torch.tensor([1.0])))
    assert max_abs_diff(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.5], dtype=torch.float16)) == 0.5


def test_max_abs_diff_in_slices(monkeypatch):
    monkeypatch.setattr(diff_module, "_CHUNK", 7)
    a = torch.zeros(50)
    b = torch.zeros(50)
    b[43] = -2.5
    assert max_abs_diff(a.reshape(5, 10), b.reshape(5, 10)) == 2.5


def test_flatten():
    assert list(flatten({"a": [1, {"b": 2}], "c": (3,)})) == [("a.0", 1), ("a.1.b", 2), ("c.0", 3)]
    assert list(flatten(5)) == [("", 5)]
