"""Restoring in place copies the loaded tensors into the live ones (``torchckpt/_inplace.py``):
the same result as ``load_state_dict`` of the loaded state, with the live tensors kept."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from torchckpt import Checkpointer
from torchckpt._inplace import CHUNK, copy_pairs, module_state, optimizer_state, prepare


class Tied(torch.nn.Module):
    """A language model's shape in miniature: the output layer shares the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.norm(self.emb(x)))


class Averaging(torch.nn.Linear):
    """Its own loader reads the live weight: it loads the mean of the saved and the live one."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict[prefix + "weight"] = (state_dict[prefix + "weight"] + self.weight.detach()) / 2
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _train(model, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 11, (8,), generator=g) if isinstance(model, Tied) else torch.randn(8, 4, generator=g)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _square():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), Averaging(4, 4))


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "adamw-groups": lambda p: torch.optim.AdamW([{"params": list(p)[:1], "lr": 1e-3}, {"params": list(p)[1:]}]),
}


@pytest.mark.parametrize("make_model", [Tied, _square], ids=["tied", "custom-loader"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_restore_in_place_equals_load_state_dict_of_the_file_and_keeps_the_live_tensors(
        tmp_path, make_model, opt_name):
    torch.manual_seed(0)
    model = make_model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    _train(model, opt)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save("t", {"model": model, "opt": opt})
        saved_model = torch.load(tmp_path / "ck/t/objects/model.pt")
        saved_opt = torch.load(tmp_path / "ck/t/objects/opt.pt")
        _train(model, opt, seed=1)  # move away from the checkpoint
        # the reference: plain load_state_dict of the files, on a copy
        ref_model = copy.deepcopy(model)
        ref_opt = OPTIMIZERS[opt_name](ref_model.parameters())
        ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        ref_model.load_state_dict(saved_model)
        ref_opt.load_state_dict(saved_opt)
        params = [p for p in model.parameters()]
        ptrs = [p.data_ptr() for p in params]
        states = {id(t): t.data_ptr() for s in opt.state.values() for t in s.values()}
        ns = {"model": model, "opt": opt}
        ck.load("t", ns, rng=False)
    assert ns["model"] is model and ns["opt"] is opt
    assert [p.data_ptr() for p in model.parameters()] == ptrs and list(model.parameters()) == params
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    after = {id(t): t.data_ptr() for s in opt.state.values() for t in s.values()}
    assert after == states  # the optimizer keeps its own tensors
    _train(model, opt, seed=3)
    _train(ref_model, ref_opt, seed=3)
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_which_objects_qualify_for_the_bulk_copy():
    model, custom = Tied(), _square()
    opt = torch.optim.AdamW(model.parameters())
    _train(model, opt)
    pairs: list = []
    state = module_state(model, model.state_dict(), pairs)
    assert state is not None and len(pairs) == len(model.state_dict())  # head.weight is emb.weight: prepare dedupes
    assert module_state(custom, custom.state_dict(), []) is None  # its own _load_from_state_dict
    hooked = torch.nn.Linear(2, 2)
    hooked.register_load_state_dict_pre_hook(lambda *a, **k: None)
    assert module_state(hooked, hooked.state_dict(), []) is None
    fresh = torch.optim.AdamW(model.parameters())
    pairs = []
    state = optimizer_state(fresh, opt.state_dict(), pairs)
    assert state is not None and len(pairs) == 3 * 3  # no live state yet: new tensors of its own
    assert not any(dst is src or dst.data_ptr() == src.data_ptr() for dst, src in pairs)
    pairs = []
    optimizer_state(opt, copy.deepcopy(opt.state_dict()), pairs)
    assert len(pairs) == 3 * 3  # step, exp_avg, exp_avg_sq of the 3 distinct parameters


def test_tied_weights_are_copied_once_and_different_values_for_one_tensor_fall_back():
    model = Tied()
    sd = copy.deepcopy(model.state_dict())
    plan = prepare([("module", model, sd)])
    assert plan is not None
    assert len([d for d, _ in plan.pairs if d is model.emb.weight]) == 1
    sd2 = copy.deepcopy(sd)
    sd2["head.weight"] = sd2["head.weight"].clone()  # saved untied, live tied: load_state_dict decides
    assert prepare([("module", model, sd2)]) is None


def test_overlapping_destinations_fall_back(tmp_path):
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([lin.weight, lin.bias], lr=0.1, momentum=0.9)
    buf = torch.zeros(10)
    opt.state[lin.weight]["momentum_buffer"] = buf[:6].view(2, 3)
    opt.state[lin.bias]["momentum_buffer"] = buf[6:8]
    assert prepare([("optimizer", opt, copy.deepcopy(opt.state_dict()))]) is not None
    opt.state[lin.bias]["momentum_buffer"] = buf[5:7]  # shares a float with the weight's buffer
    assert prepare([("optimizer", opt, copy.deepcopy(opt.state_dict()))]) is None
    buf.copy_(torch.arange(10.0))
    with Checkpointer(tmp_path / "ck") as ck:  # end to end: the plan falls back, torch loads as it always did
        ck.save("t", {"lin": lin, "opt": opt})
        saved = copy.deepcopy(opt.state_dict())
        buf.zero_()
        ck.load("t", {"lin": lin, "opt": opt}, rng=False)
    for pid, state in opt.state_dict()["state"].items():
        assert torch.equal(state["momentum_buffer"], saved["state"][pid]["momentum_buffer"])


def test_dtype_casts_and_non_contiguous_tensors_are_left_to_load_state_dict(tmp_path):
    model = torch.nn.Linear(5, 3)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save("t", {"model": model})
        saved = torch.load(tmp_path / "ck/t/objects/model.pt")
        model.to(torch.float64)
        model.weight = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64).t())  # non-contiguous
        assert module_state(model, saved, pairs := []) is not None and pairs == []
        ck.load("t", {"model": model}, strict=False, rng=False)
    assert model.weight.dtype == torch.float64 and torch.equal(model.weight, saved["weight"].double())


def test_the_copy_bumps_the_autograd_version_like_copy_():
    live = torch.nn.Parameter(torch.zeros(4))
    out = (live * live).sum()  # saves `live` for backward
    version = live._version
    copy_pairs([(live, torch.ones(4))])
    assert live._version == version + 1 and torch.equal(live.detach(), torch.ones(4))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_tensors_are_split_across_threads_exactly(threads):
    n = (2 * CHUNK + 12) // 4 + 5
    srcs = [torch.randn(n), torch.arange(7, dtype=torch.int16), torch.randn(3 * CHUNK // 8, dtype=torch.float64)]
    dsts = [torch.zeros_like(s) for s in srcs]
    copy_pairs(list(zip(dsts, srcs, strict=True)), threads=threads)
    for d, s in zip(dsts, srcs, strict=True):
        assert torch.equal(d, s)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("fresh", [False, True], ids=["trained-optimizer", "fresh-optimizer"])
def test_after_an_in_place_load_no_mapping_of_the_checkpoint_remains(tmp_path, fresh):
    """The optimizer's state is its own memory, also for an optimizer with no state yet: removing
    the checkpoint frees its disk space, and the next step() takes no copy-on-write faults."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    opt = torch.optim.AdamW(model.parameters())
    _train_linear(model, opt)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save("t", {"model": model, "opt": opt})
        reference = copy.deepcopy(opt.state_dict())
        if fresh:
            opt = torch.optim.AdamW(model.parameters())
        else:
            _train_linear(model, opt)
        ck.load("t", {"model": model, "opt": opt}, rng=False)
        with open("/proc/self/maps") as f:
            maps = f.read()
        assert str(tmp_path / "ck") not in maps
    for pid, state in reference["state"].items():
        for key, value in state.items():
            assert torch.equal(opt.state_dict()["state"][pid][key], value), (pid, key)


def _train_linear(model, opt, width=256):
    loss = model(torch.randn(4, width)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_a_damaged_large_file_changes_nothing(tmp_path):
    """The files are hashed while they load; a mismatch is found before anything is copied."""
    from torchckpt.errors import CorruptCheckpointError

    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))  # > OVERLAP_BYTES
    opt = torch.optim.AdamW(model.parameters())
    _train_linear(model, opt, width=512)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save("t", {"model": model, "opt": opt})
        _train_linear(model, opt, width=512)
        before = copy.deepcopy((model.state_dict(), opt.state_dict()))
        path = tmp_path / "ck/t/objects/opt.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match="opt.pt: checksum mismatch"):
            ck.load("t", {"model": model, "opt": opt})
    after = (model.state_dict(), opt.state_dict())
    for key, value in before[0].items():
        assert torch.equal(after[0][key], value)
    for pid, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(after[1]["state"][pid][key], value)
