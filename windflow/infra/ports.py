"""Free TCP ports on a local interface.

The kernel picks each port (bind to port 0); the sockets of one call stay bound until all
its ports are picked, so one call never returns the same port twice. Another process can
still take a port between this call and the server's own bind: callers that start a server
treat a bind failure as a start failure.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Collection

LOOPBACK = "127.0.0.1"


def free_ports(count: int, host: str = LOOPBACK, besides: Collection[int] = ()) -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago, none of
    ``besides`` (ports handed out before, to servers not bound yet: gRPC binds with
    SO_REUSEPORT, so two servers given one port would share it, each answering some of
    its calls)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
            if port not in besides:  # (a refused one stays bound: not picked again here)
                ports.append(port)
        return ports


def free_port(host: str = LOOPBACK) -> int:
    """Return one TCP port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def address(host: str, port: int) -> str:
    """``host:port`` (IPv6 hosts in brackets), the form gRPC targets and our CLIs take."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
