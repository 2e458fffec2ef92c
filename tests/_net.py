"""Loopback ports for the tests' torch.distributed rendezvous (each suite has its own range)."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable


def free_port(ports: Iterable[int]) -> int:
    """A port of ``ports`` that can be bound on 127.0.0.1 now, tried in random order (so that two
    test runs on one machine rarely race for the same port)."""
    ports = list(ports)
    for port in random.sample(ports, len(ports)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports[0]}-{ports[-1]} on 127.0.0.1")
