"""The fast weights-only load against torch's own, on a corpus of benign and hostile pickles.

For every file: whatever ``torch.load(weights_only=True)`` refuses, the fast path
(``torchckpt._safe_unpickle``) refuses too (it declines, and ``serialization.load`` then gives
torch's answer); whatever the fast path loads, it loads to what torch loads. Benign states must
take the fast path (or this test would pass by declining everything).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import random
import struct
import warnings
from pathlib import Path

import pytest
import torch

from torchckpt import _safe_unpickle, serialization
from torchckpt.errors import UnsafeCheckpointError

# -- a small pickle assembler (protocol 2, what torch.save writes) -----------------------------


def glob(dotted: str) -> bytes:
    module, _, name = dotted.rpartition(".")
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def num(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = pickle.encode_long(value)
    return b"\x8a" + bytes([len(data)]) + data


def tup(*parts: bytes) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def storage(key: str = "0", numel: int = 4, kind: str = "torch.FloatStorage", location: str = "cpu") -> bytes:
    return tup(text("storage"), glob(kind), text(key), text(location), num(numel)) + b"Q"


EMPTY_HOOKS = glob("collections.OrderedDict") + b")R"


def tensor(
    *,
    store: bytes | None = None,
    offset: int = 0,
    size: tuple[int, ...] = (4,),
    stride: tuple[int, ...] = (1,),
    hooks: bytes = EMPTY_HOOKS,
    extra: bytes = b"",
    func: str = "torch._utils._rebuild_tensor_v2",
) -> bytes:
    args = tup(
        storage() if store is None else store,
        num(offset),
        tup(*map(num, size)),
        tup(*map(num, stride)),
        b"\x89",
        hooks,
        extra,
    )
    return glob(func) + args + b"R"


def pkl(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def write_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", data_pkl, len(data_pkl))
    writer.write_record("byteorder", b"little", 6)
    for key, data in ({"0": FLOATS} if records is None else records).items():
        writer.write_record(f"data/{key}", data, len(data))
    writer.write_end_of_file()
    return path


# -- the corpus ---------------------------------------------------------------------------------
def benign_states() -> dict[str, object]:
    torch.manual_seed(0)
    base = torch.arange(24, dtype=torch.float32)
    od = collections.OrderedDict(w=torch.randn(3, 2), b=torch.zeros(2))
    od._metadata = {"": {"version": 1}}
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    cyclic: list = [1, torch.ones(2)]
    cyclic.append(cyclic)
    shared = torch.randn(5)
    states: dict[str, object] = {
        "every dtype": {
            str(dtype): (torch.arange(6) % 2).to(dtype)
            for dtype in (
                torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
                torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
                torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64,
            )
        },
        "views of one storage": {"base": base, "view": base[3:9].view(2, 3), "t": base.view(4, 6).t(), "step": base[::5]},
        "the same tensor twice": {"a": shared, "b": shared, "list": [shared, shared]},
        "zero-size and scalar": {"empty": torch.empty(0, 3), "scalar": torch.tensor(2.5), "none": torch.empty(0)},
        "parameter": {"p": torch.nn.Parameter(torch.randn(2, 2)), "frozen": torch.nn.Parameter(torch.ones(1), False)},
        "state_dict with _metadata": od,
        "model + AdamW": {"model": model.state_dict(), "optimizer": opt.state_dict()},
        "python values": {
            "int": 3, "big": 2**100, "neg": -(2**70), "float": 1.5, "nan": math.nan, "str": "héllo", "bytes": b"\x00\xff", "none": None, "bools": [True, False], "tuple": (1, (2, 3)), "set": {1, 2}, "complex": 1 + 2j,
            "nested": {"a": [{"b": ()}]}, "bytearray": bytearray(b"ab"),
        },
        "torch values": {"size": torch.Size([2, 3]), "device": torch.device("cpu"), "dtype": torch.float16},
        "counter": collections.Counter(a=2, b=1),
        "cyclic list": cyclic,
        "top-level tensor": torch.randn(3, 3),
    }
    return states


def hostile_pickles(marker: Path) -> dict[str, bytes]:
    system = glob("os.system") + tup(text(f"touch {marker}")) + b"R"
    hooks_with_entry = EMPTY_HOOKS + b"(" + num(1) + glob("collections.OrderedDict") + b")R" + b"u"
    t = tensor()
    return {
        # globals outside the allowlist
        "os.system": pkl(system),
        "eval in a dict": pkl(b"}(" + text("x") + glob("builtins.eval") + tup(text("1")) + b"R" + b"u"),
        "getattr": pkl(glob("builtins.getattr") + tup(glob("torch.Tensor"), text("__setstate__")) + b"R"),
        "non-allowlisted torch function": pkl(glob("torch.load") + tup(text("x")) + b"R"),
        "_rebuild_tensor (v1)": pkl(glob("torch._utils._rebuild_tensor") + tup(storage(), num(0), tup(num(4)), tup(num(1))) + b"R"),
        # REDUCE on allowed callables with crafted arguments
        "backward hooks": pkl(tensor(hooks=hooks_with_entry)),
        "hooks not an OrderedDict": pkl(tensor(hooks=b"}")),
        "metadata": pkl(tensor(extra=b"}(" + text("conj") + b"\x88u")),
        "storage offset past the end": pkl(tensor(offset=3)),
        "negative offset": pkl(tensor(offset=-1)),
        "size past the end": pkl(tensor(size=(5,))),
        "huge size": pkl(tensor(size=(2**31 - 1, 2**31 - 1))),
        "huge stride": pkl(tensor(size=(2,), stride=(2**31 - 1,))),
        "negative stride": pkl(tensor(size=(2,), stride=(-1,))),
        "size of strings": pkl(tensor(size=())[:-1].replace(b"))", b"(" + text("a") + b"t)") + b"R"),
        "huge numel": pkl(tensor(store=storage(numel=2**40))),
        "numel past its record": pkl(tensor(store=storage(numel=5), size=(5,))),
        "missing record": pkl(tensor(store=storage(key="7"))),
        "record outside data/": pkl(tensor(store=storage(key="../data.pkl"))),
        "unknown storage type": pkl(tensor(store=storage(kind="torch.Tensor"))),
        "storage on a missing device": pkl(tensor(store=storage(location="cuda:0"))),
        "OrderedDict of a tensor": pkl(glob("collections.OrderedDict") + tup(t) + b"R"),
        "Size of a tensor": pkl(glob("torch.Size") + tup(t) + b"R"),
        "REDUCE with a list": pkl(glob("torch.Size") + b"]R"),
        "REDUCE on a tensor": pkl(t + b")R"),
        "REDUCE on a dtype": pkl(glob("torch.float32") + b")R"),
        # NEWOBJ, BUILD, SETSTATE
        "NEWOBJ Tensor": pkl(glob("torch.Tensor") + b")\x81"),
        "BUILD on a tensor (set_)": pkl(t + tup(storage(), num(0), tup(num(2)), tup(num(1))) + b"b"),
        "BUILD on a tensor (hooks)": pkl(t + tup(b"\x89", b"N", hooks_with_entry) + b"b"),
        "BUILD on a dict": pkl(b"}}b"),
        "BUILD None on an int": pkl(num(1) + b"Nb"),
        "BUILD on a global (class attribute)": pkl(glob("collections.OrderedDict") + tup(b"N", b"}(" + text("x") + num(1) + b"u") + b"b"),
        "BUILD on a function": pkl(glob("torch._utils._rebuild_tensor_v2") + b"}(" + text("x") + num(1) + b"ub"),
        "BUILD OrderedDict with a tuple": pkl(EMPTY_HOOKS + tup(b"}", b"}") + b"b"),
        "BUILD OrderedDict with a list": pkl(EMPTY_HOOKS + b"]b"),
        # SETITEM / APPEND on the wrong targets
        "SETITEM on a tensor": pkl(t + num(0) + num(7) + b"s"),
        "SETITEMS on a tensor": pkl(t + b"(" + num(0) + num(7) + b"u"),
        "SETITEM on a list": pkl(b"]" + num(0) + num(7) + b"s"),
        "SETITEMS odd": pkl(b"}(" + num(0) + b"u"),
        "SETITEM on a storage": pkl(storage() + num(0) + num(7) + b"s"),
        "APPEND to a dict": pkl(b"}" + num(1) + b"a"),
        "APPEND to a bytearray": pkl(glob("builtins.bytearray") + b")R" + num(1) + b"a"),
        "APPENDS to a set": pkl(glob("builtins.set") + b")R(" + num(1) + b"e"),
        # persistent ids
        "BINPERSID of an int": pkl(num(0) + b"Q"),
        "BINPERSID of a list": pkl(b"]Q"),
        "persistent id not a storage": pkl(tup(text("module"), glob("torch.FloatStorage"), text("0"), text("cpu"), num(4)) + b"Q"),
        "persistent id too short": pkl(tup(text("storage"), glob("torch.FloatStorage")) + b"Q"),
        "persistent id bytes tag": pkl(tup(b"U\x07storage", glob("torch.FloatStorage"), text("0"), text("cpu"), num(4)) + b"Q"),
        # memo and stack tricks
        "BINGET undefined": pkl(b"h\x05"),
        "memo slot reused for a tensor": pkl(b"]q\x01" + t + b"r\x01\x00\x00\x00" + b"0" + b"h\x01" + num(1) + b"a"),
        "memo index 2**32-1 (a 64 GiB memo array in C)": pkl(num(1) + b"r\xff\xff\xff\xff"),
        "below the MARK": pkl(num(1) + b"(\x85t"),
        "TUPLE2 on one item": pkl(num(1) + b"(" + num(2) + b"\x86t"),
        "recursive tuple via list": pkl(b"]q\x00h\x00\x85a"),
        "STOP on an empty stack": b"\x80\x02.",
        "STOP inside a MARK": pkl(b"(" + num(1)),
        # opcodes torch's unpickler does not implement
        "protocol 4 FRAME": b"\x80\x04\x95" + struct.pack("<Q", 7) + num(1) + b"." + b"..",
        "STACK_GLOBAL": pkl(text("os") + text("system") + b"\x93" + tup(text("true")) + b"R"),
        "INST": pkl(b"(" + text(f"touch {marker}") + b"ios\nsystem\n"),
        "OBJ": pkl(b"(" + glob("os.system") + text(f"touch {marker}") + b"o"),
        "NEWOBJ_EX": pkl(glob("collections.OrderedDict") + b")}\x92"),
        "EXT1": pkl(b"\x82\x01"),
        "PERSID (text)": pkl(b"P0\n"),
        "BINBYTES": pkl(b"B" + struct.pack("<I", 2) + b"ab"),
        "DUP": pkl(b"]2" + num(1) + b"a"),
        "POP": pkl(num(1) + num(2) + b"0"),
        "ADDITEMS": pkl(b"\x8f(" + num(1) + b"\x90"),
        "MEMOIZE": pkl(b"]\x94"),
        "INT text": pkl(b"I1\n"),
        # truncated
        "truncated string": pkl(text("abc"))[:-3],
        "truncated int": b"\x80\x02J\x01",
        "truncated before STOP": pkl(t)[:-1],
    }


def _load_both(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = ("ok", torch.load(path, weights_only=True, mmap=True, map_location="cpu"))
        except Exception as e:  # noqa: BLE001 - any refusal counts
            expected = ("refused", e)
        try:
            got = ("ok", _safe_unpickle.load(path, "cpu"))
        except _safe_unpickle.Decline as e:
            got = ("declined", e)
        except _safe_unpickle.Refused as e:
            got = ("refused", e)
    return expected, got


def same(a, b, seen=None) -> None:
    """Deep equality that also compares types, tensor layout, sharing and cycles."""
    seen = {} if seen is None else seen
    if id(a) in seen:
        assert seen[id(a)] is b, "sharing differs"
        return
    seen[id(a)] = b
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset(), a.requires_grad, a.device) == (
            b.dtype, b.shape, b.stride(), b.storage_offset(), b.requires_grad, b.device
        )
        assert bytes(a.detach().contiguous().untyped_storage()) == bytes(b.detach().contiguous().untyped_storage())
        assert a._backward_hooks == b._backward_hooks
        return
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k], seen)
        assert getattr(a, "__dict__", {}) == getattr(b, "__dict__", {})
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=False):
            same(x, y, seen)
        return
    if isinstance(a, torch.storage.TypedStorage):
        assert (a.dtype, a.device, bytes(a.untyped())) == (b.dtype, b.device, bytes(b.untyped()))
        return
    if isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
        return
    assert a == b


def _check(path: Path, marker: Path | None = None) -> str:
    expected, got = _load_both(path)
    if marker is not None:
        assert not marker.exists(), "a hostile pickle ran code"
    if expected[0] == "refused" or got[0] == "refused":
        assert got[0] != "ok", f"torch refuses ({expected[1]!r}) but the fast path loaded it"
        with pytest.raises(Exception):  # noqa: B017 - a refusal, whatever its type
            serialization.load(path, map_location="cpu")
    elif got[0] == "ok":
        same(expected[1], got[1])
    if expected[0] == "ok" and got[0] != "refused":
        same(expected[1], serialization.load(path, map_location="cpu"))
    return got[0]


@pytest.mark.parametrize("name", list(benign_states()))
def test_benign_state_takes_the_fast_path_and_loads_what_torch_loads(tmp_path, name):
    path = tmp_path / "state.pt"
    with open(path, "wb") as f:
        serialization.save(benign_states()[name], f)
    assert _check(path) == "ok"


@pytest.mark.parametrize("name", list(hostile_pickles(Path("x"))))
def test_hostile_pickle_is_refused_at_least_where_torch_refuses(tmp_path, name):
    marker = tmp_path / "PWNED"
    path = write_zip(tmp_path / "hostile.pt", hostile_pickles(marker)[name])
    _check(path, marker)


@pytest.mark.parametrize("name", ["backward hooks", "huge numel", "numel past its record"])
def test_what_torch_save_never_writes_is_refused_though_torch_loads_it(tmp_path, name):
    path = write_zip(tmp_path / "crafted.pt", hostile_pickles(tmp_path / "m")[name])
    torch.load(path, weights_only=True, mmap=True)  # torch's weights-only unpickler accepts it
    with pytest.raises(UnsafeCheckpointError, match="torch.save never writes"):
        serialization.load(path)


def test_truncated_and_mutated_pickles(tmp_path):
    """Every prefix of a real state's pickle, and random byte flips in it: the differential holds."""
    state = benign_states()
    buf = io.BytesIO()
    serialization.save({"model": state["model + AdamW"], "values": state["python values"]}, buf)
    reader = torch._C.PyTorchFileReader(io.BytesIO(buf.getvalue()))
    data = reader.get_record("data.pkl")
    records = {name[5:]: reader.get_record(name) for name in reader.get_all_records() if name.startswith("data/")}
    rng = random.Random(15)
    cases = [data[:cut] for cut in sorted(rng.sample(range(len(data)), 60))]
    for _ in range(120):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(2, len(data))] = rng.randrange(256)
        cases.append(bytes(mutated))
    outcomes = collections.Counter()
    for n, case in enumerate(cases):
        outcomes[_check(write_zip(tmp_path / f"m{n}.pt", case, records))] += 1
    assert outcomes["declined"] > 0


def test_deepspeed_style_and_legacy_files_still_load_through_the_safe_path(tmp_path):
    import argparse

    state = {"w": torch.ones(2), "args": argparse.Namespace(lr=0.1), "od": collections.OrderedDict(a=1)}
    path = tmp_path / "ds.pt"
    torch.save(state, path)
    with pytest.raises(_safe_unpickle.Decline):
        _safe_unpickle.load(path, None)
    loaded = serialization.load(path)
    assert loaded["args"].lr == 0.1 and torch.equal(loaded["w"], torch.ones(2))
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(serialization.load(legacy)["w"], torch.ones(2))
    with pytest.raises(UnsafeCheckpointError):
        serialization.load(write_zip(tmp_path / "evil.pt", pkl(glob("os.system") + tup(text("true")) + b"R")))
