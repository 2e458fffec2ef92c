"""Checking a ``map_location`` before any file is read, so a typo costs one line, not a traceback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import DeviceUnavailableError, InvalidArgumentError


def valid_locations() -> list[str]:
    """The device strings loading accepts on this machine, for messages."""
    import torch

    names = ["cpu", "auto", "meta"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names += ["cuda"] + [f"cuda:{i}" for i in range(n)]
    for kind in ("xpu", "mps"):
        module = getattr(torch, kind, None)
        if module is not None and getattr(module, "is_available", lambda: False)():
            names.append(kind)
    return names


def check_map_location(value: Any, *, name: str = "map_location") -> None:
    """Raise a one-line error unless ``value`` is something loading can use here.

    Accepted: None, ``"auto"``, a device string or :class:`torch.device` of a device this
    machine has (``"cpu"``, ``"meta"``, ``"cuda"``, ``"cuda:N"`` with N below the device
    count...), a dict mapping saved locations to such devices, or a callable (as ``torch.load``).

    Raises:
        InvalidArgumentError: not a device at all (``"nonsense"``, ``"cpu:0"``).
        DeviceUnavailableError: a device this machine does not have (``"cuda:3"``).
    """
    import torch

    if value is None or callable(value) and not isinstance(value, (str, torch.device)):
        return
    if isinstance(value, Mapping):
        for target in value.values():
            check_map_location(target, name=name)
        return
    if isinstance(value, str) and value == "auto":
        return
    shown = f"{name}={str(value)!r}"
    valid = ", ".join(repr(v) for v in valid_locations())
    if not isinstance(value, (str, torch.device)):
        raise InvalidArgumentError(f"{shown} is a {type(value).__name__}, not a device; use one of {valid}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(f"{shown} is not a device; use one of {valid}") from None
    if device.type == "cpu" and device.index not in (None, 0) or device.type == "cpu" and isinstance(value, str) \
            and ":" in value:
        raise InvalidArgumentError(f"{shown}: the CPU has no numbered devices; use 'cpu' (valid here: {valid})")
    if device.type in ("cpu", "meta"):
        return
    module = getattr(torch, device.type, None)
    available = module is not None and getattr(module, "is_available", lambda: False)()
    if not available:
        raise DeviceUnavailableError(f"{shown}: this machine has no {device.type.upper()} device; use one of {valid}")
    count = getattr(module, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise DeviceUnavailableError(
            f"{shown}: this machine has {count} {device.type.upper()} device(s), numbered from 0; use one of {valid}"
        )
