"""torchckpt.interop: adopting DeepSpeed's own checkpoints, safetensors export and import."""

from __future__ import annotations

import shutil

import pytest
import torch
from _ds_roots import OWN_TAGS, make_engine, write_root
from safetensors import safe_open
from safetensors.torch import load_file

import torchckpt
from torchckpt import CheckpointStore
from torchckpt.deepspeed.adopt import AdoptError, adopt, adoptable
from torchckpt.errors import (
    CheckpointInUseError,
    IncompleteCheckpointError,
    TagNotFoundError,
)
from torchckpt.interop import ExportError, export_safetensors, import_safetensors
from torchckpt.layout import MANIFEST_NAME
from torchckpt.manifest import read_manifest

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def ds(ds_dist, tmp_path_factory):
    """One DeepSpeed engine (ZeRO-3) and the root it wrote, shared by the module (read-only).

    ZeRO-3 here, ZeRO-1 in test_cli: between them both of DeepSpeed's file layouts."""
    engine = make_engine(stage=3)
    root = write_root(engine, tmp_path_factory.mktemp("ds") / "ckpts")
    return engine, root


@pytest.fixture
def ds_root(ds, tmp_path):
    """A private copy of the DeepSpeed root, for tests that change it."""
    return shutil.copytree(ds[1], tmp_path / "ckpts")


def gathered(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: p.detach().clone() for k, p in params.items()}


def test_adopt_deepspeed_own_checkpoints(ds, ds_root):
    import deepspeed

    engine, _ = ds
    store = CheckpointStore(ds_root)
    assert sorted(adoptable(store)) == sorted(OWN_TAGS)
    for tag in OWN_TAGS:
        with pytest.raises(IncompleteCheckpointError, match="adopt it with `torchckpt adopt`"):
            store.load(tag, "zero_pp_rank_0_mp_rank_00_model_states.pt")
        manifest = adopt(store, tag)
        assert sorted(manifest.files) == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        assert manifest.metadata["step"] == 1 and manifest.metadata["adopted"]["origin"] == "deepspeed"
        assert manifest.metadata["note"].startswith("adopted: written by DeepSpeed")
        assert read_manifest(ds_root / tag) == manifest and store.verify(tag).ok
    assert adoptable(store) == []
    # Adopted checkpoints load through torchckpt's engine: verified, weights-only.
    before = gathered(engine)
    original = engine.checkpoint_engine
    try:
        torchckpt.install(engine)
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
            for p in params:
                p.zero_()
        assert not any(v.any() for v in gathered(engine).values())
        engine.load_checkpoint(str(ds_root), tag="ds-legacy")
    finally:
        engine.checkpoint_engine = original
    after = gathered(engine)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_adopt_refuses_what_it_cannot_check(ds_root):
    store = CheckpointStore(ds_root)
    with pytest.raises(AdoptError, match="'ours' is committed already"):
        adopt(store, "ours")
    with pytest.raises(TagNotFoundError, match="no checkpoint 'nope'"):
        adopt(store, "nope")
    optim = ds_root / "ds-zip" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:-300])  # torn by a crash of DeepSpeed's own engine
    with pytest.raises(AdoptError, match=r"ds-zip/zero_pp_rank_0_mp_rank_00_optim_states.pt is torn: .*restore it from a copy"):
        adopt(store, "ds-zip")
    assert not (ds_root / "ds-zip" / MANIFEST_NAME).exists()
    # A file needing a class safe loading does not allow: named, with the way forward.
    odd = ds_root / "odd"
    odd.mkdir()
    torch.save({"w": torch.ones(1), "c": torch.nn.Identity()}, odd / "mp_rank_00_model_states.pt")
    with pytest.raises(AdoptError, match=r"needs globals .*torch.nn.modules.linear.Identity.*allow=\["):
        adopt(store, "odd")
    manifest = adopt(store, "odd", allow=["torch.nn.modules.linear.Identity"], note="mine")
    assert manifest.metadata["note"] == "mine" and store.verify("odd").ok
    with store.transaction("busy") as tx:
        tx.write("a.pt", torch.ones(1))
        with pytest.raises(CheckpointInUseError, match="being written"):
            adopt(store, "busy")


def test_gc_keeps_deepspeed_checkpoints_until_adopted(ds_root):
    store = CheckpointStore(ds_root)
    with store.transaction("crashed") as tx:  # torchckpt's own leftover: removed by gc
        tx.write("a.pt", torch.ones(1))
    plan = store.gc(keep_last=1)
    assert plan.incomplete == ["crashed"] and sorted(OWN_TAGS) == sorted(t for t in plan.kept if t in OWN_TAGS)
    assert sorted(store.tags()) == sorted([*OWN_TAGS, "ours"])
    adopt(store, "ds-zip")
    plan = store.gc(keep_last=1)
    assert "ds-zip" in plan.committed or "ours" in plan.committed


def notebook_tag(store: CheckpointStore, tag: str, model: torch.nn.Module, step: int) -> None:
    """A tag laid out as the notebook saves one (objects/<name>.pt, objects in the metadata)."""
    with store.transaction(tag) as tx:
        tx.write("objects/model.pt", model.state_dict())
        tx.write("objects/opt.pt", {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]})
        tx.commit(metadata={"step": step, "objects": {
            "model": {"kind": "module", "file": "objects/model.pt"}, "opt": {"kind": "optimizer", "file": "objects/opt.pt"},
        }})  # fmt: skip


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight


def test_export_import_round_trip(root, tmp_path):
    from torchckpt.notebook import Checkpointer

    store = CheckpointStore(root)
    model = Tied()
    notebook_tag(store, "t1", model, step=12)
    result = export_safetensors(store, "latest", tmp_path / "m.safetensors")
    assert (result.source, result.tensors, result.skipped) == ("objects/model.pt", 2, [])
    loaded = load_file(tmp_path / "m.safetensors")
    assert torch.equal(loaded["emb.weight"], model.emb.weight) and torch.equal(loaded["head.weight"], model.head.weight)
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "torchckpt.tag": "t1", "torchckpt.source": "objects/model.pt", "torchckpt.step": "12"}
    assert not list(tmp_path.glob(".*tmp-*")), "written atomically: no temporary left"

    manifest = import_safetensors(store, tmp_path / "m.safetensors", "imported")
    assert manifest.metadata["step"] == 12 and manifest.metadata["objects"]["model"]["file"] == "objects/model.pt"
    fresh = Tied()
    ns = {"model": fresh}
    Checkpointer(root).load("imported", ns, names=["model"])
    assert torch.equal(fresh.emb.weight, model.emb.weight) and store.latest() == "imported"
    everything = Checkpointer(root).load("imported", {"model": Tied()})  # no names: no RNG states to restore
    assert everything.names == ["model"] and not everything.rng
    with pytest.raises(ExportError, match="'imported' exists already"):
        import_safetensors(store, tmp_path / "m.safetensors", "imported")
    with pytest.raises(ExportError, match="is not a safetensors file"):
        import_safetensors(store, root / "t1" / "objects" / "model.pt", "other")


def test_export_picks_the_weights(ds_root, tmp_path):
    store = CheckpointStore(ds_root)
    with pytest.raises(IncompleteCheckpointError, match="adopt it with `torchckpt adopt`"):
        export_safetensors(store, "ds-zip", tmp_path / "a.safetensors")
    # ZeRO-3 partitions the weights over the optimizer files: refused, with the way forward.
    with pytest.raises(ExportError, match=r"ZeRO stage 3.*zero_to_fp32.py .*--safe_serialization"):
        export_safetensors(store, "ours", tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    # A top-level entry of a file, with non-tensor entries left out and named.
    with store.transaction("plain") as tx:
        tx.write("state.pt", {"ema": {"w": torch.ones(2), "decay": 0.99}, "step": 3})
        tx.commit()
    result = export_safetensors(store, "plain", tmp_path / "b.safetensors", key="ema")
    assert (result.source, result.tensors, result.skipped) == ("state.pt:ema", 1, ["decay"])
    assert torch.equal(load_file(tmp_path / "b.safetensors")["w"], torch.ones(2))
    with pytest.raises(ExportError, match=r"has no 'model' weights; --key can be one of: ema, state"):
        export_safetensors(store, "plain", tmp_path / "c.safetensors")
    # The same check on a file's own metadata, for DeepSpeed layouts without the ZeRO-3 names.
    with store.transaction("z3") as tx:
        tx.write("mp_rank_00_model_states.pt", {"module": {"w": torch.empty(0)}, "ds_config": {"zero_optimization": {"stage": 3}}})
        tx.commit()
    with pytest.raises(ExportError, match="ZeRO stage 3"):
        export_safetensors(store, "z3", tmp_path / "d.safetensors")
