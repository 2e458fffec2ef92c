"""Kinds, discovery, capture, the all-or-nothing restore plan, and RNG state."""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch

from torchckpt.errors import NotCheckpointableError, RestoreError
from torchckpt.state import (
    Stateful,
    capture,
    capture_rng,
    checkpointable,
    infer_step,
    kind_of,
    normalise_key,
    plan_restore,
    require_kind,
    restore_rng,
)


class Counter:
    """A user class following the Stateful protocol."""

    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


class FakeDeepSpeedEngine(torch.nn.Module):
    def __init__(self, module, optimizer):
        super().__init__()
        self.module, self.optimizer, self.checkpoint_engine = module, optimizer, None
        self.lr_scheduler = None
        self.global_steps = 42

    def save_checkpoint(self, *a, **k): ...

    def load_checkpoint(self, *a, **k): ...


FakeDeepSpeedEngine.__module__ = "deepspeed.runtime.engine"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_kind_of_every_supported_kind():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = {
        "module": model,
        "optimizer": opt,
        "scheduler": torch.optim.lr_scheduler.StepLR(opt, 2),
        "grad_scaler": torch.amp.GradScaler("cpu"),
        "generator": torch.Generator(),
        "tensor": torch.ones(2),
        "ndarray": np.zeros(3, dtype=np.float32),
        "stateful": Counter(),
        "value": {"a": [1, 2.5, "x", None, (True,)]},
        "deepspeed": FakeDeepSpeedEngine(model, opt),
    }
    for kind, obj in cases.items():
        assert kind_of(obj) == kind, kind
    assert isinstance(Counter(), Stateful)
    assert kind_of(_nested(50)) == "value"


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "obj",
    [len, lambda: 1, torch.nn.Linear, types, torch.ops, object(), np.array(["a"], dtype=object), np.float64(1.0),
     {1.5: "float key"}, [object()], Counter, _nested(200)],
)
def test_kind_of_refuses_what_cannot_be_saved_safely(obj):
    assert kind_of(obj) is None


def test_require_kind_names_the_object_and_the_fix():
    with pytest.raises(NotCheckpointableError, match=r"'blob' is a builtins.object.*state_dict\(\) and load_state_dict\(\)"):
        require_kind("blob", object())


class Broken:
    def __getattr__(self, name):
        raise RuntimeError("lookups fail")


def test_checkpointable_skips_private_ipython_functions_aliases_large_values_and_engine_parts():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = FakeDeepSpeedEngine(model, opt)
    ns = {
        "model": model, "alias": model, "_hidden": torch.ones(1), "In": [""], "Out": {}, "get_ipython": print,
        "fn": lambda: 1, "np": np, "big": list(range(20_000)), "lr": 0.1, "name": "run1",
        "counter": Counter(), "engine": engine, "opt": opt, "broken": Broken(),
    }
    found = checkpointable(ns)
    assert list(found) == ["lr", "name", "counter", "engine"]


def test_infer_step_prefers_global_step_then_step_then_a_deepspeed_engine():
    assert infer_step({"global_step": 3, "step": 5}) == 3
    assert infer_step({"step": 5}) == 5
    assert infer_step({"step": True}) is None
    assert infer_step({"e": FakeDeepSpeedEngine(_model(), None)}) == 42
    assert infer_step({}) is None


def test_normalise_key_drops_wrapper_prefixes():
    assert normalise_key("module.fc.weight") == "fc.weight"
    assert normalise_key("_orig_mod.fc.weight") == "fc.weight"
    assert normalise_key("module._orig_mod.fc.weight") == "fc.weight"
    assert normalise_key("enc._orig_mod.fc.weight") == "enc.fc.weight"
    assert normalise_key("encoder.module.fc") == "encoder.module.fc"  # only a leading module.


def test_capture_of_each_kind():
    model = _model()
    assert capture(model, "module").keys() == model.state_dict().keys()
    assert capture(np.arange(3), "ndarray").tolist() == [0, 1, 2]
    t = torch.ones(2, requires_grad=True)
    assert not capture(t, "tensor").requires_grad
    with pytest.raises(ValueError, match="deepspeed engines save themselves"):
        capture(object(), "deepspeed")


def test_rng_round_trip_restores_python_numpy_and_torch():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.standard_normal()  # leaves a cached gaussian in the legacy state
    saved = capture_rng()
    first = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert restore_rng(saved) == []
    again = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])


def test_rng_restore_notes_cuda_states_it_cannot_restore(monkeypatch):
    saved = capture_rng()
    saved["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert restore_rng(saved) == ["the checkpoint's CUDA RNG states were not restored: CUDA is not available here"]


# -- plan and apply -----------------------------------------------------------------------------
def test_restore_in_place_keeps_object_identity():
    model, t, arr, gen, counter = _model(), torch.zeros(3, requires_grad=True), np.zeros(2), torch.Generator(), Counter()
    p0 = model[0].weight
    gen.manual_seed(7)
    g_state = gen.get_state()
    gen.manual_seed(8)
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1)
    ns = {"model": model, "t": t, "arr": arr, "gen": gen, "counter": counter, "v": 1}
    entries = {
        "model": ("module", other.state_dict()), "t": ("tensor", torch.ones(3)),
        "arr": ("ndarray", torch.tensor([1.0, 2.0], dtype=torch.float64)), "gen": ("generator", g_state),
        "counter": ("stateful", {"n": 5}), "v": ("value", [1, 2]),
    }
    plan = plan_restore(entries, ns)
    assert plan.apply() == []
    assert ns["model"] is model and model[0].weight is p0 and torch.equal(p0, other[0].weight)
    assert ns["t"] is t and t.requires_grad and torch.equal(t.detach(), torch.ones(3))
    assert ns["arr"] is arr and arr.tolist() == [1.0, 2.0]
    assert ns["gen"] is gen and torch.equal(gen.get_state(), g_state)
    assert counter.n == 5 and ns["v"] == [1, 2]


def test_missing_live_object_for_an_in_place_kind_is_refused():
    with pytest.raises(RestoreError, match=r"model: no live object named 'model'.*into="):
        plan_restore({"model": ("module", {})}, {})


def test_a_new_name_for_values_and_tensors_is_bound():
    ns = {}
    plan_restore({"t": ("tensor", torch.ones(1)), "v": ("value", 3), "g": ("generator", torch.Generator().get_state())},
                 ns).apply()
    assert torch.equal(ns["t"], torch.ones(1)) and ns["v"] == 3 and isinstance(ns["g"], torch.Generator)


def test_module_mismatches_strict_and_not():
    model = _model()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved["extra"] = torch.zeros(1)
    del saved["1.bias"]
    saved["0.bias"] = saved["0.bias"].double()
    with pytest.raises(RestoreError) as e:
        plan_restore({"model": ("module", saved)}, {"model": model})
    text = str(e.value)
    assert "missing keys 1.bias" in text and "unexpected keys extra" in text
    assert "0.bias: dtype torch.float64 saved, torch.float32 live" in text and "strict=False" in text
    del saved["extra"]
    plan = plan_restore({"model": ("module", saved)}, {"model": model}, strict=False)
    assert any("missing keys 1.bias" in n for n in plan.warnings)
    plan.apply()
    assert model[0].bias.dtype == torch.float32


def test_shape_mismatch_is_an_error_even_when_not_strict():
    model = _model()
    saved = dict(model.state_dict())
    saved["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(RestoreError, match=r"model.0.weight: shape \(5, 3\) saved, \(4, 3\) live"):
        plan_restore({"model": ("module", saved)}, {"model": model}, strict=False)


def test_compiled_and_wrapped_keys_are_matched_to_the_live_module():
    model = _model()
    saved = {f"_orig_mod.{k}": v + 1 for k, v in model.state_dict().items()}
    plan = plan_restore({"model": ("module", saved)}, {"model": model})
    plan.apply()
    assert "prefixes" in plan.warnings[0]
    assert torch.equal(model[0].weight, saved["_orig_mod.0.weight"])


def test_optimizer_checks_groups_and_state_shapes():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    small = torch.optim.Adam(list(model.parameters())[:2])
    with pytest.raises(RestoreError, match="group 0 has 4 parameters saved, 2 live"):
        plan_restore({"opt": ("optimizer", saved)}, {"opt": small})
    bad = {"state": {0: {"exp_avg": torch.zeros(9), "step": torch.tensor(1.0)}}, "param_groups": saved["param_groups"]}
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(RestoreError, match=r"state 'exp_avg' of parameter 0 has shape \(9,\), the live parameter needs \(4, 3\)"):
        plan_restore({"opt": ("optimizer", bad)}, {"opt": fresh})
    plan_restore({"opt": ("optimizer", saved)}, {"opt": fresh}).apply()
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])


def test_kind_change_and_stateful_key_mismatch():
    with pytest.raises(RestoreError, match=r"saved as a module, but 'm' is now a builtins.int"):
        plan_restore({"m": ("module", {})}, {"m": 3})
    with pytest.raises(RestoreError, match=r"c: missing keys n, unexpected keys k"):
        plan_restore({"c": ("stateful", {"k": 1})}, {"c": Counter()})


def test_one_bad_object_means_nothing_changes():
    model, counter = _model(), Counter(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {k: v + 1 for k, v in before.items()}
    with pytest.raises(RestoreError, match="nothing was restored: t: shape"):
        plan_restore({"model": ("module", good), "counter": ("stateful", {"n": 9}), "t": ("tensor", torch.ones(2))},
                     {"model": model, "counter": counter, "t": torch.ones(3)})
    assert counter.n == 1 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unexpected_failure_while_applying_rolls_back_what_it_can():
    class Fussy(Counter):
        def load_state_dict(self, sd):
            raise RuntimeError("refused")

    a, t = Counter(1), torch.zeros(2)
    ns = {"a": a, "b": Fussy(2), "t": t, "v": "old"}
    plan = plan_restore({"a": ("stateful", {"n": 7}), "b": ("stateful", {"n": 8}), "t": ("tensor", torch.ones(2)),
                         "v": ("value", "new")}, ns)
    with pytest.raises(RuntimeError, match="refused"):
        plan.apply()
    assert a.n == 1 and torch.equal(t, torch.zeros(2)) and ns["v"] == "old"


def test_into_binds_a_copy_and_leaves_the_live_object_alone():
    model = _model()
    saved = {k: v + 1 for k, v in model.state_dict().items()}
    ns = {"model": model}
    plan_restore({"model": ("module", saved)}, ns, into="old").apply()
    assert ns["old"] is not model and torch.equal(ns["old"][0].weight, saved["0.weight"])
    assert not torch.equal(model[0].weight, saved["0.weight"])
    plan_restore({"opt": ("optimizer", {"state": {}})}, ns, into="opt_sd").apply()
    assert ns["opt_sd"] == {"state": {}}
    with pytest.raises(RestoreError, match="not a name a variable can have"):
        plan_restore({"model": ("module", saved)}, ns, into="1x")


def test_non_strict_tensor_shape_change_replaces_the_tensor():
    ns = {"t": torch.zeros(3)}
    with pytest.raises(RestoreError, match=r"t: shape \(2,\) saved, \(3,\) live; load with strict=False"):
        plan_restore({"t": ("tensor", torch.ones(2))}, ns)
    plan = plan_restore({"t": ("tensor", torch.ones(2))}, ns, strict=False)
    plan.apply()
    assert ns["t"].shape == (2,) and "replaced the tensor" in plan.warnings[0]


def test_malformed_rng_state_is_refused_before_anything_changes():
    counter = Counter(1)
    with pytest.raises(RestoreError, match="the saved RNG state is malformed"):
        plan_restore({"c": ("stateful", {"n": 2})}, {"c": counter}, rng={"python": 1})
    assert counter.n == 1


@pytest.mark.gpu
def test_rng_capture_includes_every_cuda_device_and_restores_it():
    torch.cuda.init()
    torch.cuda.manual_seed_all(3)
    saved = capture_rng()
    assert len(saved["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(4)
    restore_rng(saved)
    assert torch.equal(first, torch.rand(4, device="cuda"))


@pytest.mark.gpu
def test_cuda_module_is_restored_in_place_from_cpu_state():
    model = _model().cuda()
    saved = {k: (v + 1).cpu() for k, v in model.state_dict().items()}
    plan_restore({"model": ("module", saved)}, {"model": model}).apply()
    assert model[0].weight.device.type == "cuda" and torch.equal(model[0].weight.cpu(), saved["0.weight"])


def test_discover_names_what_it_leaves_out_and_the_entry_that_stops_a_container():
    import io

    from torchckpt.state import discover, first_unsaveable

    ns = {
        "model": torch.nn.Linear(2, 2),
        "cfg": {"lr": 0.1, "layers": [1, 2, {"act": lambda x: x}]},
        "fh": io.BytesIO(),
        "big": torch.zeros(1024),
        "small": torch.zeros(2),
        "many": list(range(20_000)),
        "fn": lambda: 1,
        "torch": torch,
    }
    found, skipped = discover(ns, max_bytes=1024)
    assert list(found) == ["model", "small"]
    assert skipped["cfg"] == "cfg['layers'][2]['act'] is a lambda"
    assert skipped["fh"] == "an open file, which torchckpt cannot save"
    assert skipped["big"].startswith("a tensor of 4.0 KiB, over the 1.0 KiB limit")
    assert skipped["many"].startswith("a list of more than 10000 items")
    assert "fn" not in skipped and "torch" not in skipped  # code, not state: left out without a word
    assert first_unsaveable({1.5: 1}, "d") == ("d[1.5]", "a key of type float (keys must be str or int)")
    assert first_unsaveable({"ok": [1, "a"]}, "d") is None
    assert discover({"big": torch.zeros(1024)}, max_bytes=None)[0].keys() == {"big"}


@pytest.mark.parametrize(("saved_kind", "saved", "live"), [
    ("value", 42, torch.nn.Linear(2, 2)),
    ("value", 42, torch.zeros(2)),
    ("tensor", torch.zeros(2), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)),
    ("ndarray", torch.zeros(2), torch.zeros(2)),
    ("value", 1, lambda: 1),
])
def test_a_saved_value_never_replaces_a_live_object_of_another_kind(saved_kind, saved, live):
    ns = {"x": live}
    with pytest.raises(RestoreError, match=r"x: saved as .*, but 'x' is now .*into='x_saved'"):
        plan_restore({"x": (saved_kind, saved)}, ns)
    assert ns["x"] is live
    plan_restore({"x": (saved_kind, saved)}, ns, into="x_saved").apply()
    assert ns["x"] is live and "x_saved" in ns


def test_a_saved_value_may_replace_a_plain_value_or_none():
    ns = {"a": 1, "b": None, "c": [1, 2], "d": "text"}
    plan_restore({"a": ("tensor", torch.ones(1)), "b": ("value", 2), "c": ("value", 3), "d": ("value", 4)}, ns).apply()
    assert torch.equal(ns["a"], torch.ones(1)) and ns["b"] == 2 and ns["c"] == 3 and ns["d"] == 4
