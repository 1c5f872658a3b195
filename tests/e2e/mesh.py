"""A Windflow mesh for end-to-end tests: real etcd, NATS and every service as a process.

Unlike ``windflow up`` (which restarts a dead child), nothing here restarts: tests kill
processes on purpose and watch the mesh react.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from windflow.infra import (
    ChildSpec,
    EtcdServer,
    ManagedProcess,
    NatsServer,
    Stack,
    StackConfig,
    child_pids,
    free_ports,
)

SERVE = (sys.executable, "-m", "windflow", "serve")

MESHES: list[Mesh | StackLogs] = []
"""Every mesh started in this test session: a failing test's report gets the logs' tails
of those alive during it (tests/e2e/conftest.py), so a flake in CI leaves its evidence in
the CI output."""


def log_tails(log_dir: Path, lines: int = 30, width: int = 300) -> str:
    """The last ``lines`` lines of every service's log in ``log_dir``, each cut to
    ``width`` characters; Windflow's own services first, etcd and NATS last (a CI report
    may keep only the start of a long failure)."""
    parts = []
    paths = sorted(log_dir.glob("*.log"), key=lambda p: (p.stem in ("etcd", "nats"), p.stem))
    for path in paths:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {path.name}\n" + "\n".join(line[:width] for line in tail))
    return "\n".join(parts)


class StackLogs:
    """The logs of a ``windflow.infra.Stack`` (the supervised stack of ``windflow up``) in
    ``MESHES``, for the failure reports as a ``Mesh``'s: ``closed()`` when it stops."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.closed_at: float | None = None
        MESHES.append(self)

    def closed(self) -> None:
        self.closed_at = time.time()

    def log_tails(self, lines: int = 30, width: int = 300) -> str:
        return log_tails(self.log_dir, lines, width)


@contextlib.asynccontextmanager
async def logged_stack(state_dir: Path, **config: Any) -> AsyncIterator[Stack]:
    """A ``windflow up`` stack (``StackConfig(state_dir, **config)``) whose logs a failing
    test's report shows."""
    logs = StackLogs(state_dir / "logs")
    try:
        async with Stack(StackConfig(state_dir=state_dir, **config)) as running:
            yield running
    finally:
        logs.closed()


class Mesh:
    """Lifecycle: ``Mesh(dir, ...)`` -> ``await start()`` -> use -> ``await aclose()``,
    or ``async with Mesh(dir, ...) as mesh:`` (closed even when starting fails)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        workers: int = 2,
        worker_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        regions: dict[str, str] | None = None,
        routers: int = 1,
        router_args: tuple[str, ...] = (),
        session_args: tuple[str, ...] = (),
        gateway_args: tuple[str, ...] = (),
        secure: bool = False,
    ) -> None:
        """``regions``: worker name -> its ``--region`` (others: the default);
        ``router_args``, ``session_args``, ``gateway_args``: appended to the command line
        of every router replica, the session service and the gateway; ``secure``: the
        gateway authenticates (else ``--insecure``: these tests are about state, and
        tests/e2e/test_access.py about access)."""
        self.state_dir = state_dir
        self._regions = regions or {}
        self.log_dir = state_dir / "logs"
        self.etcd = EtcdServer(state_dir)
        self.nats = NatsServer(state_dir)
        self._used_ports: set[int] = set()
        """Every port handed out: none twice (gRPC binds with SO_REUSEPORT, so two
        services given one port would share it, each answering some calls)."""
        self.routers = ["router", *(f"router-{i}" for i in range(2, routers + 1))]
        """Router replicas' names (they elect a leader; the others forward to it)."""
        self.addresses = {
            name: f"127.0.0.1:{self._port()}"
            for name in (
                *self.routers,
                "session",
                "gateway",
                *(f"worker-{i + 1}" for i in range(workers)),
            )
        }
        self.metrics: dict[str, str] = {}
        """Where each service serves ``GET /metrics``, by name (a port picked at its launch)."""
        self._worker_args = worker_args
        self._router_args = router_args
        self._session_args = session_args
        self._gateway_args = (*(() if secure else ("--insecure",)), *gateway_args)
        self._env = env
        self.procs: dict[str, ManagedProcess] = {}
        self.closed_at: float | None = None
        """``time.time()`` when it was closed (None while it runs)."""

    @property
    def router(self) -> str:
        """Every router replica, comma-separated (as the other services dial them)."""
        return ",".join(self.addresses[name] for name in self.routers)

    @property
    def gateway(self) -> str:
        return self.addresses["gateway"]

    def _spec(self, name: str) -> ChildSpec:
        if name not in self.metrics:
            self.metrics[name] = f"127.0.0.1:{self._port()}"
        common = (
            "--listen",
            self.addresses[name],
            "--etcd",
            self.etcd.endpoint,
            "--nats",
            self.nats.url,
            "--metrics-listen",
            self.metrics[name],
        )
        if name.startswith("worker-"):
            region = ("--region", self._regions[name]) if name in self._regions else ()
            argv = (
                *SERVE,
                "worker",
                *common,
                "--worker-id",
                name,
                "--router",
                self.router,
                *region,
                *self._worker_args,
            )
        elif name == "gateway":
            argv = (
                *SERVE,
                "gateway",
                *common,
                "--router",
                self.router,
                "--session-service",
                self.addresses["session"],
                *self._gateway_args,
            )
        elif name == "session":
            argv = (*SERVE, name, *common, "--router", self.router, *self._session_args)
        else:  # a router replica
            argv = (
                *SERVE,
                "router",
                *common,
                "--election-ttl",
                "2",
                "--election-heartbeat",
                "0.5",
                *self._router_args,
            )
        return ChildSpec(
            name=name,
            argv=argv,
            env=self._env,
            health_address=self.addresses[name],
            ready_timeout_s=90.0,
            stop_timeout_s=5.0,
        )

    def _launch(self, name: str) -> ManagedProcess:
        proc = ManagedProcess(self._spec(name), self.log_dir / f"{name}.log")
        self.procs[name] = proc
        proc.start()
        return proc

    async def start_service(self, name: str) -> ManagedProcess:
        proc = self._launch(name)
        await proc.wait_ready()
        return proc

    def add_worker(self) -> ManagedProcess:
        """Start one more worker (``worker-N``, the next free number); returns it at once,
        before it is ready: ``await proc.wait_ready()`` to wait for it."""
        name = f"worker-{sum(n.startswith('worker-') for n in self.addresses) + 1}"
        self.addresses[name] = f"127.0.0.1:{self._port()}"
        return self._launch(name)

    def _port(self) -> int:
        """A free port not handed out before by this mesh."""
        while True:  # (besides: the kernel's; the check: a stand-in's in unit tests)
            (port,) = free_ports(1, besides=self._used_ports)
            if port not in self._used_ports:
                self._used_ports.add(port)
                return port

    async def __aenter__(self) -> Mesh:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        MESHES.append(self)
        await asyncio.gather(self.etcd.start(), self.nats.start())
        names = [n for n in self.addresses if n.startswith("worker-")]
        await asyncio.gather(*(self.start_service(n) for n in (*self.routers, "session", *names)))
        await self.start_service("gateway")

    def kill(self, name: str) -> int:
        """SIGKILL a service; returns its pid."""
        pid = self.procs[name].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        return pid

    def terminate(self, name: str) -> int:
        """SIGTERM a service (a graceful stop, as an orchestrator's); returns its pid."""
        pid = self.procs[name].pid
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        return pid

    def kill_model_host(self, worker: str) -> int:
        """SIGKILL the model host process under a worker; returns its pid."""
        parent = self.procs[worker].pid
        assert parent is not None
        for pid in child_pids(parent):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"services.worker.model_host" in cmdline:
                os.kill(pid, signal.SIGKILL)
                return pid
        raise AssertionError(f"{worker} (pid {parent}) has no model host")

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def log_tails(self, lines: int = 30, width: int = 300) -> str:
        """``log_tails`` of this mesh's logs."""
        return log_tails(self.log_dir, lines, width)

    async def aclose(self) -> None:
        self.closed_at = time.time()
        for proc in reversed(list(self.procs.values())):
            await proc.stop()
        await self.nats.aclose()
        await self.etcd.aclose()
