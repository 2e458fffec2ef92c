"""Round-trip properties (hypothesis): whatever state a user saves, loading gives it back —
values bit for bit, dtypes, shapes, strides, containers, and storage sharing between views —
through a synchronous and an asynchronous save, with the tensors changed right after the save
call (an async save must hold the values of the moment it was called).

``max_examples`` is modest by default; TORCHCKPT_FULL=1 runs many more.
"""

from __future__ import annotations

import atexit
import collections
import copy
import io
import math
import shutil
import tempfile

import pytest
import torch
from _reliability import FULL, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from torchckpt import AsyncWriter, CheckpointStore

# Hypothesis keeps caches under .hypothesis/ in the working directory; tests never write there.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="torchckpt-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)

DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
    torch.complex64, torch.complex128,
]  # fmt: skip
DTYPES += [getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)]
DTYPES += [
    getattr(torch, name)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name)
]
EXAMPLES = 2000 if FULL else 100
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not FULL,  # CI runs the same examples every time; the full run explores
    database=None,  # no .hypothesis/ in the working directory
)


@st.composite
def base_tensors(draw) -> torch.Tensor:
    """A contiguous tensor of any supported dtype and any bit pattern (NaNs, infinities...)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    numel = math.prod(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = bytearray(draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize)))
    if dtype == torch.bool:
        raw = bytearray(b % 2 for b in raw)
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).clone().view(dtype).reshape(shape)


@st.composite
def views(draw, base: torch.Tensor) -> torch.Tensor:
    """A view of ``base``: itself, a slice with a step, a transpose, an expand, a reshape."""
    kind = draw(st.sampled_from(["same", "slice", "transpose", "expand", "flat", "narrow"]))
    if kind == "slice" and base.dim() >= 1 and base.shape[0] > 0:
        start = draw(st.integers(0, base.shape[0] - 1))
        return base[start :: draw(st.integers(1, 3))]
    if kind == "transpose" and base.dim() >= 2:
        return base.transpose(0, base.dim() - 1)
    if kind == "expand" and base.dim() >= 1 and base.shape[-1] == 1:
        return base.expand(*base.shape[:-1], 3)
    if kind == "flat" and base.is_contiguous():
        return base.view(-1)
    if kind == "narrow" and base.dim() >= 1 and base.shape[-1] >= 2:
        return base.narrow(-1, 1, base.shape[-1] - 1)
    return base[...]


@st.composite
def tensor_groups(draw) -> list[torch.Tensor]:
    """A base tensor and a few views sharing its storage (possibly a Parameter, possibly 0-d)."""
    base = draw(base_tensors())
    if draw(st.booleans()) and base.dtype.is_floating_point and base.numel() > 0:
        base = torch.nn.Parameter(base, requires_grad=draw(st.booleans()))
    out = [base]
    for _ in range(draw(st.integers(0, 3))):
        out.append(draw(views(base.detach() if isinstance(base, torch.nn.Parameter) else base)))
    if draw(st.booleans()):
        out.append(torch.tensor(draw(st.floats(allow_nan=True)), dtype=torch.float64))  # a 0-d tensor
    return out


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # arbitrarily large
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
    st.lists(st.integers(0, 9), max_size=4).map(torch.Size),
)


@st.composite
def states(draw):
    """A nested state dict whose leaves are scalars and tensors, some of them sharing storage."""
    leaves: list = [t for _ in range(draw(st.integers(0, 3))) for t in draw(tensor_groups())]
    leaves += draw(st.lists(scalars, max_size=5))
    leaves = draw(st.permutations(leaves))

    def build(items: list, depth: int):
        if depth >= 3 or len(items) <= 1 and draw(st.booleans()):
            return items[0] if items else draw(st.sampled_from([{}, [], ()]))
        kind = draw(st.sampled_from(["dict", "list", "tuple", "ordered", "intdict"]))
        cut = draw(st.integers(0, len(items)))
        parts = [build(items[:cut], depth + 1), build(items[cut:], depth + 1)] if items else []
        if kind == "list":
            return parts
        if kind == "tuple":
            return tuple(parts)
        keys = draw(st.lists(st.text(min_size=1, max_size=8), min_size=len(parts), max_size=len(parts), unique=True))
        if kind == "intdict":
            return {i * 7: p for i, p in enumerate(parts)}
        return (collections.OrderedDict if kind == "ordered" else dict)(zip(keys, parts, strict=False))

    return {"state": build(list(leaves), 0), "step": draw(st.integers(0, 10**6))}


def _tensors(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


def _layout(t: torch.Tensor) -> tuple:
    """Strides where they mean something (torch ignores a size-1 dimension's stride)."""
    return tuple(st if size > 1 else None for size, st in zip(t.shape, t.stride(), strict=False)), t.is_contiguous()


def _bytes(t: torch.Tensor) -> list[int]:
    """The tensor's elements as raw bytes (NaN payloads and float8 bit patterns included)."""
    dense = torch.empty(t.shape, dtype=t.dtype)
    dense.copy_(t.detach())
    return dense.view(-1).view(torch.uint8).tolist()


def _assert_same(got, want, path="state") -> None:
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{path}: {got.dtype}{tuple(got.shape)}"
        assert got.device.type == want.device.type, f"{path}: loaded on {got.device}, saved from {want.device}"
        assert _layout(got) == _layout(want), f"{path}: stride {got.stride()} != {want.stride()}"
        assert got.requires_grad == want.requires_grad, path
        assert _bytes(got) == _bytes(want), f"{path}: values differ"
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            _assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            _assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), path
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def _sharing(tensors: list[torch.Tensor]) -> set[tuple[int, int, int]]:
    """Pairs (i, j) of tensors on one storage, with their byte distance in it. Tensors without
    elements are left out: nothing written through one could be seen through another."""
    out = set()
    for i, a in enumerate(tensors):
        for j, b in enumerate(tensors[:i]):
            sa, sb = a.untyped_storage(), b.untyped_storage()
            if a.numel() and b.numel() and sa.data_ptr() == sb.data_ptr():
                out.add((i, j, a.storage_offset() * a.element_size() - b.storage_offset() * b.element_size()))
    return out


def _scribble(tensors: list[torch.Tensor]) -> None:
    """Overwrite every byte of every storage the state uses, as the next training step would."""
    with torch.no_grad():
        for t in tensors:
            storage = t.untyped_storage()
            if storage.nbytes():
                torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).fill_(0x5A)


def _roundtrip(state, *, writer, mmap: bool) -> None:
    want = copy.deepcopy(state)
    want_sharing = _sharing(_tensors(state, []))  # (a deep copy of a Parameter drops sharing)
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(tmp)
        with store.transaction("t", writer=writer) as tx:
            tx.write("state.pt", state)
            tx.write("nested/copy.pt", {"again": state["state"]})
            _scribble(_tensors(state, []))  # the caller moves on right after the save call
            tx.commit()
        got = store.load("t", "state.pt", mmap=mmap)
        again = store.load("t", "nested/copy.pt", mmap=mmap)
    _assert_same(got, want)
    _assert_same(again["again"], want["state"])
    assert _sharing(_tensors(got, [])) == want_sharing, "storage sharing changed"


@pytest.mark.slow
@given(state=states(), mmap=st.booleans())
@SETTINGS
def test_sync_roundtrip(state, mmap):
    _roundtrip(state, writer=None, mmap=mmap)


_WRITER: AsyncWriter | None = None


@pytest.mark.slow
@given(state=states(), mmap=st.booleans())
@SETTINGS
def test_async_roundtrip(state, mmap):
    global _WRITER
    if _WRITER is None:
        _WRITER = AsyncWriter()  # one writer for all examples: its buffers are reused, as in training
    _roundtrip(state, writer=_WRITER, mmap=mmap)


def _to_cuda(state):
    """The state on the GPU, storage sharing kept (torch.load maps every storage once)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cuda", weights_only=False)


@pytest.mark.gpu
@given(state=states())
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_cuda_roundtrip_keeps_the_device(state):
    """CUDA tensors, sync and async (pinned snapshot buffers): loaded back on the GPU, equal."""
    global _WRITER
    if _WRITER is None:
        _WRITER = AsyncWriter()
    for writer in (None, _WRITER):
        _roundtrip(_to_cuda(state), writer=writer, mmap=False)


def test_record_counts():
    record("roundtrip", kind="hypothesis examples per mode", examples=EXAMPLES, modes="sync, async", dtypes=len(DTYPES))
    assert torch.bfloat16 in DTYPES and any("float8" in str(d) for d in DTYPES)
