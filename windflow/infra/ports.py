"""Free TCP ports on a local interface.

The kernel picks each port (bind to port 0); the sockets of one call stay bound until all
its ports are picked, so one call never returns the same port twice. Another process can
still take a port between this call and the server's own bind: callers that start a server
treat a bind failure as a start failure.
"""

from __future__ import annotations

import contextlib
import socket

LOOPBACK = "127.0.0.1"


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port(host: str = LOOPBACK) -> int:
    """Return one TCP port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def address(host: str, port: int) -> str:
    """``host:port`` (IPv6 hosts in brackets), the form gRPC targets and our CLIs take."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
