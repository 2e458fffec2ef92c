"""Loopback ports for the tests' torch.distributed rendezvous (each suite has its own range)."""

from __future__ import annotations

import socket
from collections.abc import Iterable


def free_port(ports: Iterable[int]) -> int:
    """The first port of ``ports`` that can be bound on 127.0.0.1 now."""
    ports = list(ports)
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports[0]}-{ports[-1]} on 127.0.0.1")
