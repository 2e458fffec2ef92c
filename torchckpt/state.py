"""Live objects and their saved state: what can be checkpointed, capture, check, restore, RNG.

A notebook holds objects of a handful of kinds. Each kind says how its state is captured
(``state_dict()``, the tensor itself, the value) and how it is put back. Restoring is two
phases so that it is all-or-nothing: :func:`plan_restore` checks every object against its saved
state (missing/unexpected keys, shapes, dtypes, kinds) and raises :class:`RestoreError` listing
every problem before anything changes; :meth:`RestorePlan.apply` then changes the live objects.
"""

from __future__ import annotations

import contextlib
import copy
import keyword
import logging
import pickle
import random
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch

from . import _inplace
from .errors import InvalidArgumentError, NotCheckpointableError, RestoreError
from .options import AUTO_MAX_BYTES

logger = logging.getLogger(__name__)

#: Kinds of checkpointable objects, in the order they are restored (see :meth:`RestorePlan.apply`).
KINDS = ("stateful", "scheduler", "grad_scaler", "deepspeed", "optimizer", "module", "generator",
         "tensor", "ndarray", "value")
#: Kinds whose saved state is loaded into the live object (which must exist).
IN_PLACE_KINDS = frozenset({"module", "optimizer", "scheduler", "grad_scaler", "stateful", "deepspeed"})

#: Names IPython (and common notebook set-ups) put in the namespace; never auto-saved.
_SKIP_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython", "open"})
#: Auto-discovery ignores plain containers larger than this (a loaded data set is not state).
MAX_AUTO_VALUE_ITEMS = 10_000
#: Auto-discovery leaves out tensors, arrays and values holding more bytes than this (a data set
#: loaded into memory is not training state); naming an object saves it whatever its size.
#: Modules, optimizers and other objects with a state_dict() are always included.
MAX_AUTO_BYTES = AUTO_MAX_BYTES  # CheckpointOptions.auto_max_bytes' default
#: Variables that hold the training step, looked up (in order) by :func:`infer_step`.
STEP_NAMES = ("global_step", "step")

_NORMALISE_PREFIXES = ("module.", "_orig_mod.")


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: modules, optimizers, schedulers,
    ``GradScaler``, and your own classes."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


# -- kinds ---------------------------------------------------------------------------------------
def is_deepspeed_engine(obj: Any) -> bool:
    """A DeepSpeed engine, recognised without importing deepspeed."""
    return (
        not isinstance(obj, type)
        and type(obj).__module__.startswith("deepspeed")
        and callable(getattr(obj, "save_checkpoint", None))
        and callable(getattr(obj, "load_checkpoint", None))
        and hasattr(obj, "checkpoint_engine")
    )


def _is_plain(value: Any, budget: list[int], depth: int = 0) -> bool:
    budget[0] -= 1
    if budget[0] < 0 or depth > 100:
        return False
    # Exact types: a subclass (numpy.float64, an IntEnum) would pickle a global safe loading refuses.
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return True
    if type(value) in (list, tuple, set, frozenset):
        return all(_is_plain(v, budget, depth + 1) for v in value)
    if type(value) is dict:
        return all(isinstance(k, (str, int)) and _is_plain(v, budget, depth + 1) for k, v in value.items())
    return False


def _describe(value: Any) -> str:
    """A few words for what a value is: ``a function``, ``an open file``, ``a threading.Lock``."""
    import io

    if isinstance(value, types.LambdaType) and value.__name__ == "<lambda>":
        return "a lambda"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return "a function"
    if isinstance(value, io.IOBase):
        return "an open file"
    if isinstance(value, types.ModuleType):
        return "a module"
    if isinstance(value, type):
        return "a class"
    if isinstance(value, types.GeneratorType):
        return "a generator"
    if isinstance(value, torch.Tensor):
        return "a tensor (a value may hold tensors only as variables of their own)"
    return f"a {type_name(value)}"


def first_unsaveable(value: Any, path: str, *, depth: int = 0) -> tuple[str, str] | None:
    """The first entry of a plain container that torchckpt cannot save, as ``(path, what)``:
    ``("cfg['act']", "a lambda")``; None when ``value`` is no container or every entry can be saved."""
    if depth > 100:
        return path, "nested more than 100 levels deep"
    if type(value) is dict:
        items = [(f"{path}[{k!r}]", k, v) for k, v in value.items()]
    elif type(value) in (list, tuple):
        items = [(f"{path}[{i}]", 0, v) for i, v in enumerate(value)]
    elif type(value) in (set, frozenset):
        items = [(f"an element of {path}", 0, v) for v in value]
    else:
        return None
    for sub, key, v in items:
        if not isinstance(key, (str, int)):
            return sub, f"a key of type {type(key).__name__} (keys must be str or int)"
        if not _is_plain(v, [1 << 62]):
            return first_unsaveable(v, sub, depth=depth + 1) or (sub, _describe(v))
    return None


def nbytes(obj: Any) -> int:
    """Bytes of data a tensor, array or plain container holds (tensor/array data only)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if type(obj) is dict:
        return sum(nbytes(v) for v in obj.values())
    if type(obj) in (list, tuple):
        return sum(nbytes(v) for v in obj)
    return 0


def kind_of(obj: Any, *, max_items: int | None = None) -> str | None:
    """The kind of a checkpointable object (one of :data:`KINDS`), or None.

    Args:
        obj: any object.
        max_items: plain lists/dicts with more elements than this are not checkpointable
            (None: no limit).
    """
    if isinstance(obj, (type, types.ModuleType)) or callable(obj) and not isinstance(obj, (torch.nn.Module, Stateful)):
        return None
    if is_deepspeed_engine(obj):
        return "deepspeed"
    if isinstance(obj, torch.nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return "scheduler"
    if isinstance(obj, torch.amp.GradScaler):
        return "grad_scaler"
    if isinstance(obj, torch.Generator):
        return "generator"
    if isinstance(obj, torch.Tensor):
        return "tensor"
    if isinstance(obj, np.ndarray):
        return "ndarray" if obj.dtype.kind in "biufc" and obj.dtype.byteorder in "=|<" else None
    if isinstance(obj, Stateful):
        return "stateful"
    budget = [max_items + 1 if max_items is not None else 1 << 62]
    if _is_plain(obj, budget):
        return "value"
    return None


def checkpointable(namespace: Mapping[str, Any], *, max_bytes: int | None = MAX_AUTO_BYTES) -> dict[str, Any]:
    """Every object in ``namespace`` that a save with no names would include, by name
    (see :func:`discover`, which also says what was left out and why)."""
    return discover(namespace, max_bytes=max_bytes)[0]


def discover(
    namespace: Mapping[str, Any], *, max_bytes: int | None = MAX_AUTO_BYTES
) -> tuple[dict[str, Any], dict[str, str]]:
    """What a save with no names includes, and what it leaves out with the reason.

    Returns ``(objects, skipped)``: name -> object, and name -> why it was left out
    (``"cfg['act'] is a lambda"``, ``"a tensor of 10.0 GiB, over the 512 MiB limit..."``).

    Left out without a word (they are code or IPython's, not state): names starting with
    ``_``, IPython's own names, modules, functions and classes, a second name for an object
    already found, and the parts of a DeepSpeed engine (the engine saves them itself).
    Left out with a reason: plain containers holding something torchckpt cannot save or more
    than :data:`MAX_AUTO_VALUE_ITEMS` items, tensors and arrays above ``max_bytes`` (a data set
    is not training state; name it to save it anyway), and every other object torchckpt cannot
    save (open files, locks, data loaders...).
    """
    found: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    seen: set[int] = set()
    for name, obj in namespace.items():
        if name.startswith("_") or name in _SKIP_NAMES or not name.isidentifier() or id(obj) in seen:
            continue
        if isinstance(obj, (type, types.ModuleType)) or (
                callable(obj) and not isinstance(obj, (torch.nn.Module, Stateful))):
            continue
        try:
            kind = kind_of(obj, max_items=MAX_AUTO_VALUE_ITEMS)
        except Exception as e:  # noqa: BLE001 - an object whose attribute lookup fails is not state
            skipped[name] = f"{_describe(obj)} whose attributes cannot be read ({type(e).__name__})"
            continue
        if kind is None:
            skipped[name] = _why_not(name, obj)
            continue
        size = nbytes(obj) if kind in ("tensor", "ndarray") else 0
        if max_bytes is not None and size > max_bytes:
            from .results import size as human

            skipped[name] = (f"a {kind} of {human(size)}, over the {human(max_bytes)} limit of saves without "
                             "names (a data set?); name it to save it")
            continue
        seen.add(id(obj))
        found[name] = obj
    owned: set[int] = set()
    for obj in found.values():
        if is_deepspeed_engine(obj):
            for part in ("module", "optimizer", "basic_optimizer", "lr_scheduler", "client_model"):
                inner = getattr(obj, part, None)
                if inner is not None:
                    owned.add(id(inner))
                    owned.add(id(getattr(inner, "optimizer", None)))
    return {name: obj for name, obj in found.items() if id(obj) not in owned}, skipped


def _why_not(name: str, obj: Any) -> str:
    """Why ``obj`` cannot be saved, naming the entry of a container that stops it."""
    if type(obj) in (list, tuple, set, frozenset, dict):
        if len(obj) > MAX_AUTO_VALUE_ITEMS:
            return f"a {type(obj).__name__} of more than {MAX_AUTO_VALUE_ITEMS} items (a data set?); name it to save it"
        bad = first_unsaveable(obj, name)
        if bad is not None:
            return f"{bad[0]} is {bad[1]}"
    if isinstance(obj, np.ndarray):
        return f"an array of dtype {obj.dtype} (only numeric arrays in native byte order are saved)"
    return f"{_describe(obj)}, which torchckpt cannot save"


def require_kind(name: str, obj: Any) -> str:
    """The kind of ``obj``; raises :class:`NotCheckpointableError` naming ``name`` and the fix."""
    kind = kind_of(obj)
    if kind is None:
        bad = first_unsaveable(obj, name)
        if bad is not None:
            raise NotCheckpointableError(
                f"{name!r} is a {type_name(obj)}, which torchckpt cannot save: {bad[0]} is {bad[1]}; "
                "a plain value holds only numbers, strings, bytes, None and lists, tuples, sets and dicts of them"
            )
        raise NotCheckpointableError(
            f"{name!r} is {_describe(obj)}, which torchckpt cannot save: "
            "give it state_dict() and load_state_dict() methods (the Stateful protocol), "
            "or save the tensors or plain values it holds"
        )
    return kind


def infer_step(namespace: Mapping[str, Any]) -> int | None:
    """The training step: an int variable named in :data:`STEP_NAMES`, or a DeepSpeed engine's."""
    for name in STEP_NAMES:
        value = namespace.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    for obj in namespace.values():
        if is_deepspeed_engine(obj) and isinstance(getattr(obj, "global_steps", None), int):
            return obj.global_steps
    return None


def type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# -- capture -------------------------------------------------------------------------------------
def capture(obj: Any, kind: str) -> Any:
    """The state of ``obj`` to save (references to live tensors; the writer copies or writes them)."""
    if kind in ("module", "optimizer", "scheduler", "grad_scaler", "stateful"):
        return obj.state_dict()
    if kind == "tensor":
        return obj.detach()
    if kind == "generator":
        return obj.get_state()
    if kind == "ndarray":
        return torch.from_numpy(np.ascontiguousarray(obj))
    if kind == "value":
        return obj
    raise InvalidArgumentError(f"kind {kind!r} is not captured by value (deepspeed engines save themselves)")


class _StructurePickler(pickle.Pickler):
    """Pickles a state's structure only: tensors and storages stand in as persistent ids."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)):
            return id(obj)
        return None


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def check_picklable(name: str, payload: Any, obj: Any) -> None:
    """Raise :class:`NotCheckpointableError` if ``payload`` cannot be pickled (a lambda, a lock...).

    Cheap (tensor data is skipped), so a save can refuse before anything on disk changes.
    """
    try:
        _StructurePickler(_Discard(), protocol=2).dump(payload)
    except Exception as e:  # pickling reports failures as many types
        raise NotCheckpointableError(
            f"could not save {name!r} ({type_name(obj)}): {type(e).__name__}: {e}; its state must hold only "
            "tensors, plain Python values and containers of them"
        ) from e


def payload_bytes(obj: Any) -> int:
    """Bytes of tensor data in a (nested) state; plain values count as nothing."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


# -- RNG -----------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Python ``random``, NumPy's global generator, torch's CPU generator and every CUDA device's.

    CUDA states are captured when CUDA is initialised in this process (capturing them
    otherwise would create a context on every GPU); a process that never touched CUDA has
    consumed no CUDA randomness.
    """
    version, internal, gauss = random.getstate()
    # legacy=True gives the tuple for the global (MT19937) generator; numpy's stub also allows a dict
    _, key, pos, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def check_rng(state: Any) -> list[str]:
    """Problems that would stop :func:`restore_rng` (empty when it can run)."""
    try:
        py, npy = state["python"], state["numpy"]
        ok = (isinstance(state["torch"], torch.Tensor) and isinstance(py["state"], torch.Tensor)
              and isinstance(npy["key"], torch.Tensor) and npy["key"].numel() == 624)
    except (KeyError, TypeError):
        ok = False
    return [] if ok else ["the saved RNG state is malformed"]


def restore_rng(state: Mapping[str, Any]) -> list[str]:
    """Put every generator back; returns notes (e.g. CUDA states that had no device here)."""
    notes = []
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["key"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            for i, s in enumerate(cuda[:n]):
                torch.cuda.set_rng_state(s.cpu(), i)
            if len(cuda) > n:
                notes.append(f"the checkpoint has CUDA RNG states for {len(cuda)} devices; restored the first {n}")
        else:
            notes.append("the checkpoint's CUDA RNG states were not restored: CUDA is not available here")
    return notes


# -- key normalisation ---------------------------------------------------------------------------
def normalise_key(key: str) -> str:
    """A state-dict key without wrapper prefixes: leading ``module.`` (DDP, DeepSpeed) and any
    ``_orig_mod.`` (``torch.compile``), so ``module._orig_mod.fc.weight`` becomes ``fc.weight``."""
    while key.startswith(_NORMALISE_PREFIXES):
        key = key.split(".", 1)[1]
    return key.replace("._orig_mod.", ".")


def _remap_keys(saved: Mapping[str, Any], live_keys: Iterable[str]) -> dict[str, Any] | None:
    """``saved`` with its keys renamed to the live module's when they differ only by wrapper prefixes."""
    live_by_norm = {normalise_key(k): k for k in live_keys}
    remapped = {}
    for key, value in saved.items():
        target = live_by_norm.get(normalise_key(key))
        if target is None or target in remapped:
            return None
        remapped[target] = value
    return remapped


# -- restore -------------------------------------------------------------------------------------
@dataclass
class RestoreStep:
    """One object to restore: where it goes and how."""

    name: str
    kind: str
    saved: Any
    live: Any = None
    action: str = "restore"  # "restore" (in place), "assign" (bind the name), "into" (a new name)
    target: str | None = None  # the namespace name that receives the object
    strict: bool = True

    @property
    def order(self) -> int:
        return KINDS.index(self.kind) if self.kind in KINDS else len(KINDS)


@contextlib.contextmanager
def _one_intraop_thread():
    """Restore with one intra-op thread. torch splits every CPU ``copy_`` of 32 KiB or more over
    its intra-op threads; copying from a memory-mapped file is bound by page faults and memory,
    not by cores, and on a busy machine the hand-offs dominate: restoring a 75 MB model in place
    took 0.4-1.0 s with 2 threads and 0.11 s with one (benchmarks/bench_checkpoint.py, notebook)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


@dataclass
class RestorePlan:
    """Checked restore steps; :meth:`apply` changes the live objects."""

    steps: list[RestoreStep]
    namespace: MutableMapping[str, Any]
    rng: Any = None
    warnings: list[str] = field(default_factory=list)
    #: Called for DeepSpeed engines: ``load_engine(step)`` (the engine loads its own files).
    load_engine: Callable[[RestoreStep], None] | None = None
    #: The bulk copy of the modules' and optimizers' tensors, paired when planned (None: they
    #: load as torch loads them); made in :meth:`apply`, after every step that can be rolled back.
    copies: _inplace.InPlaceCopy | None = None

    def apply(self) -> list[str]:
        """Restore every object; returns notes. On an unexpected failure the objects restored
        so far that can be rolled back (everything but modules, optimizers and DeepSpeed
        engines, which the checks made safe) are put back, and the error is raised."""
        notes: list[str] = []
        undo: list[Callable[[], None]] = []
        threads = torch.get_num_threads()
        copied = False
        try:
            with _one_intraop_thread():
                for step in sorted(self.steps, key=lambda s: s.order):
                    if step.kind in ("optimizer", "module") and not copied:
                        self._copy_in_place(threads)  # after every step that can still be rolled back
                        copied = True
                    undo_step = self._apply_one(step)
                    if undo_step is not None:
                        undo.append(undo_step)
            if self.rng is not None:
                notes += restore_rng(self.rng)
        except Exception:
            for fn in reversed(undo):
                try:
                    fn()
                except Exception:  # the original error is the one to report
                    logger.exception("rolling back a failed restore")
            raise
        return notes

    def _copy_in_place(self, threads: int) -> None:
        """Copy the loaded tensors of the modules and optimizers restored in place into the live
        tensors they restore, all at once (``_inplace``); their steps then load that state."""
        if self.copies is None or not self.copies.pairs:
            return
        _inplace.copy_pairs(self.copies.pairs, threads)
        for s in self.steps:
            if s.action == "restore" and id(s.live) in self.copies.states:
                s.saved = self.copies.states[id(s.live)]

    def _apply_one(self, step: RestoreStep) -> Callable[[], None] | None:
        ns, name = self.namespace, step.target or step.name
        if step.action == "into":
            if step.kind == "module" and step.live is not None:
                new = copy.deepcopy(step.live)
                # assign: the copy takes the loaded tensors themselves, so it lives where
                # map_location put them (a CPU copy of a GPU model), without a second copy.
                new.load_state_dict(step.saved, strict=step.strict, assign=True)
            else:
                new = _materialise(step.kind, step.saved, None)
            had, old = name in ns, ns.get(name)
            ns[name] = new
            return lambda: ns.__setitem__(name, old) if had else ns.pop(name, None)
        if step.action == "assign":
            had, old = name in ns, ns.get(name)
            ns[name] = _materialise(step.kind, step.saved, step.live)
            return lambda: ns.__setitem__(name, old) if had else ns.pop(name, None)
        live, saved = step.live, step.saved
        if step.kind == "deepspeed":
            assert self.load_engine is not None, "a plan with a DeepSpeed engine needs load_engine"
            self.load_engine(step)
            return None
        if step.kind == "module":
            live.load_state_dict(saved, strict=step.strict)
            return None
        if step.kind == "optimizer":
            live.load_state_dict(saved)
            return None
        if step.kind in ("scheduler", "grad_scaler", "stateful"):
            backup = copy.deepcopy(live.state_dict())
            live.load_state_dict(saved)
            return lambda: live.load_state_dict(backup)
        if step.kind == "tensor":
            backup = live.detach().clone()
            with torch.no_grad():
                live.copy_(saved)
            return lambda: _copy_back(live, backup)
        if step.kind == "ndarray":
            backup = live.copy()
            np.copyto(live, saved.numpy())
            return lambda: np.copyto(live, backup)
        if step.kind == "generator":
            backup = live.get_state()
            live.set_state(saved)
            return lambda: live.set_state(backup)
        raise RestoreError(f"cannot restore kind {step.kind!r} in place")


def _copy_back(live: torch.Tensor, backup: torch.Tensor) -> None:
    with torch.no_grad():
        live.copy_(backup)


def _materialise(kind: str, saved: Any, live: Any) -> Any:
    """The object a name is bound to when it is (re)assigned rather than restored in place."""
    if kind == "ndarray":
        return saved.numpy().copy()
    if kind == "tensor" and isinstance(live, torch.nn.Parameter):
        return torch.nn.Parameter(saved, requires_grad=live.requires_grad)
    if kind == "generator":
        gen = torch.Generator()
        gen.set_state(saved)
        return gen
    return saved


def plan_restore(
    entries: Mapping[str, tuple[str, Any]],
    namespace: MutableMapping[str, Any],
    *,
    strict: bool = True,
    into: str | None = None,
    rng: Any = None,
) -> RestorePlan:
    """Check saved state against the live objects; return a plan, or raise listing every problem.

    Args:
        entries: name -> (kind, saved state) for each object to restore (DeepSpeed engines:
            saved state None; the engine checks its own files).
        namespace: where the live objects are (and where new names are bound).
        strict: missing/unexpected keys and dtype changes are errors (else warnings; shapes
            must always match, as ``load_state_dict`` requires).
        into: bind the single entry to this new name instead of restoring it in place.
        rng: a saved RNG state to restore last, or None.

    Raises:
        RestoreError: every problem found, by object; nothing has been changed.
    """
    problems: list[str] = []
    notes: list[str] = []
    steps = []
    if into is not None:
        if len(entries) != 1:
            raise RestoreError(f"into= takes exactly one object, got {len(entries)}: {', '.join(entries)}")
        if not into.isidentifier() or keyword.iskeyword(into) or into in ("True", "False", "None"):
            raise RestoreError(f"into={into!r} is not a name a variable can have; choose another, e.g. "
                               f"into='{next(iter(entries))}_saved'")
    for name, (kind, saved) in entries.items():
        live: Any = namespace.get(name)
        step = RestoreStep(name, kind, saved, live, strict=strict)
        if into is not None:
            step.action, step.target = "into", into
            if kind == "module" and live is not None and kind_of(live) == "module":
                problems += _check_module(name, live, step, strict, notes)
            elif kind in IN_PLACE_KINDS and kind not in ("module",):
                step.live = None  # the saved state dict itself
            elif kind == "deepspeed":
                problems.append(f"{name}: a DeepSpeed engine cannot be loaded into a new variable")
            steps.append(step)
            continue
        if kind in IN_PLACE_KINDS:
            if name not in namespace:
                problems.append(
                    f"{name}: no live object named {name!r} to restore into; create it first "
                    f"(run the cell that builds it), or load it with into='new_name'"
                )
                continue
            live_kind = kind_of(live)
            if live_kind != kind and not (kind == "stateful" and isinstance(live, Stateful)):
                problems.append(f"{name}: saved as a {kind}, but {name!r} is now a {type_name(live)}")
                continue
            if kind == "module":
                problems += _check_module(name, live, step, strict, notes)
            elif kind == "optimizer":
                problems += _check_optimizer(name, live, saved)
            elif kind in ("scheduler", "grad_scaler", "stateful"):
                problems += _check_keys(name, live, saved, strict, notes)
        else:
            live_kind = kind_of(live) if name in namespace else None
            if name in namespace and live_kind != kind and not _replaceable(live, live_kind):
                problems.append(
                    f"{name}: saved as {_KIND_WORDS.get(kind, kind)}, but {name!r} is now {_describe(live)}, "
                    f"which loading would replace; load it with into='{name}_saved', or rebind {name} first"
                )
                continue
            if live_kind == kind and kind == "tensor":
                mismatch = _tensor_mismatch(live, saved)
                if mismatch and strict:
                    problems.append(f"{name}: {mismatch}; load with strict=False to replace the tensor")
                elif mismatch:
                    notes.append(f"{name}: {mismatch}; replaced the tensor")
                    step.action = "assign"
            elif live_kind == kind and kind == "ndarray":
                if live.shape != tuple(saved.shape) or live.dtype != saved.numpy().dtype or not live.flags.writeable:
                    step.action = "assign"
            elif live_kind == kind and kind == "generator":
                if live.get_state().shape != saved.shape:
                    step.action = "assign"
            else:
                step.action = "assign"
        steps.append(step)
    if rng is not None:
        problems += check_rng(rng)
    if problems:
        raise RestoreError("nothing was restored: " + "; ".join(problems))
    copies = _inplace.prepare([(s.kind, s.live, s.saved) for s in steps if s.action == "restore"])
    return RestorePlan(steps, namespace, rng=rng, warnings=notes, copies=copies)


_KIND_WORDS = {"value": "a plain value", "tensor": "a tensor", "ndarray": "a NumPy array",
               "generator": "a torch.Generator"}


def _replaceable(live: Any, live_kind: str | None) -> bool:
    """A live object a saved one may take the place of: a plain value (of any type), or None."""
    return live_kind == "value" or type(live) in (dict, list, tuple, set, frozenset)


def _tensor_mismatch(live: torch.Tensor, saved: torch.Tensor) -> str | None:
    if not isinstance(saved, torch.Tensor):
        return f"saved value is a {type(saved).__name__}, not a tensor"
    if live.shape != saved.shape:
        return f"shape {tuple(saved.shape)} saved, {tuple(live.shape)} live"
    if live.dtype != saved.dtype:
        return f"dtype {saved.dtype} saved, {live.dtype} live"
    return None


def _check_module(name: str, live: torch.nn.Module, step: RestoreStep, strict: bool, notes: list[str]) -> list[str]:
    saved = step.saved
    if not isinstance(saved, Mapping):
        return [f"{name}: the saved state is a {type(saved).__name__}, not a state_dict"]
    live_sd = live.state_dict(keep_vars=True)
    if set(saved) != set(live_sd):
        remapped = _remap_keys(saved, live_sd)
        if remapped is not None and set(remapped) == set(live_sd):
            notes.append(f"{name}: keys renamed to match the live module (module./_orig_mod. prefixes)")
            saved = step.saved = remapped
    problems, soft = [], []
    missing = [k for k in live_sd if k not in saved]
    unexpected = [k for k in saved if k not in live_sd]
    if missing:
        soft.append(f"missing keys {_few(missing)}")
    if unexpected:
        soft.append(f"unexpected keys {_few(unexpected)}")
    for key, value in saved.items():
        target = live_sd.get(key)
        if not isinstance(value, torch.Tensor) or not isinstance(target, torch.Tensor):
            continue
        if value.shape != target.shape:
            problems.append(f"{name}.{key}: shape {tuple(value.shape)} saved, {tuple(target.shape)} live")
        elif value.dtype != target.dtype:
            soft.append(f"{key}: dtype {value.dtype} saved, {target.dtype} live")
    if strict and soft:
        problems += [f"{name}: {s}" for s in soft]
        problems[-1] += " (load with strict=False to skip missing/unexpected keys and cast dtypes)"
    else:
        notes += [f"{name}: {s}" for s in soft]
    return problems


def _check_optimizer(name: str, live: torch.optim.Optimizer, saved: Any) -> list[str]:
    if not isinstance(saved, Mapping) or "param_groups" not in saved or "state" not in saved:
        return [f"{name}: the saved state is not an optimizer state_dict"]
    groups, live_groups = saved["param_groups"], live.param_groups
    if len(groups) != len(live_groups):
        return [f"{name}: {len(groups)} parameter groups saved, {len(live_groups)} live"]
    problems = []
    params: dict[Any, torch.Tensor] = {}
    for i, (g, lg) in enumerate(zip(groups, live_groups, strict=False)):
        if len(g["params"]) != len(lg["params"]):
            problems.append(f"{name}: group {i} has {len(g['params'])} parameters saved, {len(lg['params'])} live")
            continue
        params.update(zip(g["params"], lg["params"], strict=False))
    shaped = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
              "sum", "ax", "prev", "exp_inf", "grad_avg")
    for pid, pstate in saved["state"].items():
        param = params.get(pid)
        if param is None or not isinstance(pstate, Mapping):
            continue
        live_state = live.state.get(param, {})
        for key, value in pstate.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            ref = live_state.get(key)
            want = ref.shape if isinstance(ref, torch.Tensor) else (param.shape if key in shaped else None)
            if want is not None and value.shape != want:
                problems.append(f"{name}: state {key!r} of parameter {pid} has shape {tuple(value.shape)}, "
                                f"the live parameter needs {tuple(want)}")
    return problems


def _check_keys(name: str, live: Any, saved: Any, strict: bool, notes: list[str]) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"{name}: the saved state is a {type(saved).__name__}, not a state_dict"]
    try:
        current = live.state_dict()
    except Exception as e:  # noqa: BLE001 - a user object's state_dict may fail; report which
        return [f"{name}: state_dict() of the live object failed: {e!r}"]
    if not isinstance(current, Mapping) or set(current) == set(saved):
        return []
    missing = sorted(set(current) - set(saved), key=str)
    unexpected = sorted(set(saved) - set(current), key=str)
    what = ", ".join(cast("Iterable[str]", filter(None, [missing and f"missing keys {_few(missing)}",
                                                         unexpected and f"unexpected keys {_few(unexpected)}"])))
    if strict:
        return [f"{name}: {what} (load with strict=False to load it anyway)"]
    notes.append(f"{name}: {what}")
    return []


def _few(keys: list, n: int = 4) -> str:
    shown = ", ".join(map(str, keys[:n]))
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


def warn_notes(notes: Iterable[str]) -> None:
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
