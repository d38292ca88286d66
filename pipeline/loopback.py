"""Ports on 127.0.0.1 for the servers meshline starts on one machine: the local Ray
cluster's dashboard and the JAX coordinator of training hosts on CPU."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_port() -> int:
    """A port on ``HOST`` that nothing listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]
