"""``NatsServer``: a nats-server with JetStream on a free loopback port, for the embedded
stack and the tests.

Lifecycle::

    server = NatsServer(state_dir)   # picks a port; nothing runs yet
    await server.start()             # runs nats-server -js, returns once a client can
                                     # connect and JetStream answers
    server.url                       # "nats://127.0.0.1:PORT"
    await server.aclose()            # SIGTERM, then SIGKILL; idempotent

``server.child_spec`` is the same program as a ``ChildSpec`` for a ``Supervisor``; a
restart reuses the JetStream store dir and the port.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import nats
from nats.errors import Error as NatsError

from windflow.infra.binaries import find_binary
from windflow.infra.ports import LOOPBACK, address, free_port
from windflow.infra.procs import ChildSpec, RestartPolicy
from windflow.infra.server import ServerProcess

logger = logging.getLogger(__name__)

_DEFAULT_RESTART = RestartPolicy()


class NatsJetStreamProbe:
    """Ready when a client connects and JetStream answers an account-info request."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.url = f"nats://{address(host, port)}"
        self.timeout_s = timeout_s

    async def __call__(self) -> bool:
        async def quiet(_exc: Exception) -> None:
            return None  # "not yet" is the expected answer while the server starts

        try:
            async with asyncio.timeout(self.timeout_s):
                # nats-py spends ~1 s on a refused connection; a bare TCP connect does not.
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                client = await nats.connect(
                    self.url,
                    connect_timeout=self.timeout_s,
                    allow_reconnect=False,
                    max_reconnect_attempts=0,
                    error_cb=quiet,
                )
                try:
                    await client.jetstream().account_info()
                finally:
                    await client.close()
        except (OSError, TimeoutError, NatsError):
            return False
        return True


class NatsServer(ServerProcess):
    """A nats-server with JetStream whose store lives in ``<state_dir>/<name>``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        name: str = "nats",
        host: str = LOOPBACK,
        port: int | None = None,
        restart: RestartPolicy = _DEFAULT_RESTART,
        ready_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(state_dir, name, restart, ready_timeout_s)
        self.host = host
        self.port = port or free_port(host)
        self.store_dir = state_dir / name

    @property
    def url(self) -> str:
        """``nats://host:port``, what nats-py and ``--nats`` take."""
        return f"nats://{address(self.host, self.port)}"

    @property
    def child_spec(self) -> ChildSpec:
        argv = (
            find_binary("nats-server"),
            "--addr", self.host,
            "--port", str(self.port),
            "--jetstream",
            "--store_dir", str(self.store_dir),
            "--server_name", self.name,
        )  # fmt: skip
        return ChildSpec(
            name=self.name,
            argv=argv,
            ready_probe=NatsJetStreamProbe(self.host, self.port),
            restart=self._restart,
            ready_timeout_s=self._ready_timeout_s,
        )
