"""``EtcdServer``: a single-member etcd on free loopback ports, for the embedded stack
and the tests.

Lifecycle::

    server = EtcdServer(state_dir)   # picks ports; nothing runs yet
    await server.start()             # runs etcd, returns once /health says true
    server.endpoint                  # "127.0.0.1:PORT" for etcd3aio
    await server.aclose()            # SIGTERM, then SIGKILL; idempotent

``server.child_spec`` is the same program as a ``ChildSpec``, for a ``Supervisor`` (the
Stack supervises etcd like any other child; a restart reuses the data dir and ports).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from windflow.infra.binaries import find_binary
from windflow.infra.ports import LOOPBACK, address, free_ports
from windflow.infra.procs import ChildSpec, RestartPolicy
from windflow.infra.server import ServerProcess

# A single member has no peer to lose its leadership to, so short raft timings only
# shorten the first election (start to ready drops from ~1 s to ~0.1 s).
_HEARTBEAT_MS = 10
_ELECTION_MS = 100
_HEALTH_REQUEST = "GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
_DEFAULT_RESTART = RestartPolicy()


class EtcdHealthProbe:
    """Ready when etcd's HTTP ``/health`` on the client port reports ``"health":"true"``.

    etcd answers true only once it has a leader and can serve a quorum read.
    """

    def __init__(self, host: str, port: int, *, timeout_s: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s

    async def __call__(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(_HEALTH_REQUEST.format(host=self.host).encode())
                    await writer.drain()
                    body = await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False
        return b'"health":"true"' in body


class EtcdServer(ServerProcess):
    """A single-member etcd whose data lives in ``<state_dir>/<name>``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        name: str = "etcd",
        host: str = LOOPBACK,
        client_port: int | None = None,
        peer_port: int | None = None,
        restart: RestartPolicy = _DEFAULT_RESTART,
        ready_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(state_dir, name, restart, ready_timeout_s)
        self.host = host
        picked = iter(free_ports(2, host))
        self.client_port = client_port or next(picked)
        self.peer_port = peer_port or next(picked)
        self.data_dir = state_dir / name

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client API (what etcd3aio and ``--etcd`` take)."""
        return address(self.host, self.client_port)

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{address(self.host, self.peer_port)}"

    @property
    def child_spec(self) -> ChildSpec:
        argv = (
            find_binary("etcd"),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(_HEARTBEAT_MS),
            "--election-timeout", str(_ELECTION_MS),
            "--log-level", "warn",
        )  # fmt: skip
        return ChildSpec(
            name=self.name,
            argv=argv,
            ready_probe=EtcdHealthProbe(self.host, self.client_port),
            restart=self._restart,
            ready_timeout_s=self._ready_timeout_s,
        )
