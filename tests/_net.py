"""Loopback ports for the tests' torch.distributed rendezvous (each suite has its own range)."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable


def _bindable(port: int) -> bool:
    """Whether ``port`` is free the way torch.distributed's TCPStore needs it: its server listens on
    every address (IPv6 and IPv4), so a port free on 127.0.0.1 alone may still be taken. The probe
    only binds (never listens or connects), and is released at once."""
    probes = [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET, ("", port))]
    if socket.has_ipv6:
        probes.append((socket.AF_INET6, ("::", port)))
    for family, address in probes:
        try:
            with socket.socket(family) as s:
                s.bind(address)
        except OSError as e:
            if family == socket.AF_INET6 and e.errno == 97:  # EAFNOSUPPORT: no IPv6 here
                continue
            return False
    return True


def free_port(ports: Iterable[int]) -> int:
    """A port of ``ports`` that is free now, tried in random order (so that two test runs on one
    machine rarely race for the same port)."""
    ports = list(ports)
    for port in random.sample(ports, len(ports)):
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {ports[0]}-{ports[-1]} on 127.0.0.1")
