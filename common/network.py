"""Loopback ports for the processes a job starts on this machine."""

from __future__ import annotations

import contextlib
import socket

# Where `flwr run` takes the ports of the local SuperLink it starts (its fixed defaults else).
LOCAL_SUPERLINK_PORTS = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports nobody listens on right now.

    Every probe stays bound until all are chosen: released one at a time, the kernel may hand
    the same port out again, and a SuperLink given one port for two of its APIs fails to start.
    """
    with contextlib.ExitStack() as stack:
        probes = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    return free_ports(1)[0]
