"""The fault harness's process side: a Windflow stack whose processes a chaos run breaks.

Lifecycle::

    cluster = Cluster(state_dir, ClusterConfig(workers=2, worker_env={...}))
    await cluster.start()          # etcd + nats -> router + session -> workers -> gateway
    cluster.signal("worker-1", signal.SIGSTOP)
    await cluster.restart("nats")  # same port, same store
    await cluster.aclose()         # everything stopped (a stopped process is continued first)

Unlike ``windflow.infra.Stack`` nothing restarts on its own: a fault decides when a process
comes back (``restart``), as a supervisor would, a moment later. etcd and NATS keep their
data across a restart. Each worker may get its own environment (``worker_env``: injected
client faults, ``windflow.common.faults``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from windflow.infra import ChildSpec, EtcdServer, ManagedProcess, NatsServer, free_ports
from windflow.infra.ports import LOOPBACK, address

logger = logging.getLogger(__name__)

DRAIN_DEADLINE_S = 10.0
"""A SIGTERMed worker's drain by live migration (``--drain-deadline-s``): under the
injector's wait for its exit."""

SERVE: tuple[str, ...] = (sys.executable, "-m", "windflow", "serve")
INJECTED_MARK = "fault injected at"
"""What ``windflow.common.faults`` logs for every error it injects."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    workers: int = 2
    worker_args: tuple[str, ...] = ()
    """Extra flags of every worker."""
    worker_env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment of every worker (e.g. ``WINDFLOW_FAULTS``)."""
    ready_timeout_s: float = 90.0
    stop_timeout_s: float = 5.0
    """SIGTERM to SIGKILL when the cluster stops; a SIGTERM fault waits longer (a drain)."""


class Cluster:
    """etcd, NATS, router, session service, workers and gateway, each a ``ManagedProcess``."""

    def __init__(self, state_dir: Path, config: ClusterConfig) -> None:
        self.config = config
        self.state_dir = state_dir
        self.log_dir = state_dir / "logs"
        self.etcd = EtcdServer(state_dir)
        self.nats = NatsServer(state_dir)
        router, session, gateway = free_ports(3)
        self.addresses = {
            "router": address(LOOPBACK, router),
            "session": address(LOOPBACK, session),
            "gateway": address(LOOPBACK, gateway),
        }
        self.workers: list[str] = []
        self.procs: dict[str, ManagedProcess] = {}
        self._closed = False
        for _ in range(config.workers):
            self._new_worker_name()

    @property
    def gateway(self) -> str:
        return self.addresses["gateway"]

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd.endpoint

    @property
    def nats_url(self) -> str:
        return self.nats.url

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start every process, stage by stage; on failure everything is stopped."""
        try:
            await asyncio.gather(self._launch("etcd"), self._launch("nats"))
            await asyncio.gather(self._launch("router"), self._launch("session"))
            await asyncio.gather(*(self._launch(w) for w in self.workers))
            await self._launch("gateway")
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop every process, the gateway first and etcd last. Idempotent."""
        self._closed = True
        for proc in self.procs.values():  # a SIGSTOPped process ignores SIGTERM
            if proc.running and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGCONT)
        order = ["gateway", *self.workers, "session", "router", "nats", "etcd"]
        for name in order:
            if name in self.procs:
                await self.procs[name].stop(self.config.stop_timeout_s)

    async def __aenter__(self) -> Cluster:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- faults ------------------------------------------------------------------------

    def pid(self, name: str) -> int:
        proc = self.procs[name]
        if proc.pid is None:
            raise RuntimeError(f"{name} has not been started")
        return proc.pid

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.running

    def signal(self, name: str, sig: signal.Signals) -> None:
        """Send ``sig`` to the process itself (not its group: a worker's model host is left
        to notice, as after a real crash)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid(name), sig)

    async def wait_exit(self, name: str, timeout_s: float) -> bool:
        """Wait until ``name`` exits; False if it is still running after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.procs[name].wait()
        except TimeoutError:
            return False
        return True

    async def restart(self, name: str) -> None:
        """Start ``name`` again (stopping what is left of it first) and wait until it is
        ready; same ports, same data."""
        proc = self.procs.get(name)
        if proc is not None:
            await proc.stop(self.config.stop_timeout_s)
        if self._closed:
            return
        await self._launch(name)

    async def add_worker(self) -> str:
        """Start one more worker; returns its name once it serves."""
        name = self._new_worker_name()
        await self._launch(name)
        return name

    def injected(self) -> int:
        """Client errors the workers' fault rules injected so far (from their logs)."""
        count = 0
        for worker in self.workers:
            path = self.log_dir / f"{worker}.log"
            with contextlib.suppress(OSError):
                count += path.read_text(errors="replace").count(INJECTED_MARK)
        return count

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(line[:300] for line in tail))
        return "\n".join(parts)

    # -- internals ---------------------------------------------------------------------

    def _new_worker_name(self) -> str:
        name = f"worker-{len(self.workers) + 1}"
        self.workers.append(name)
        taken = {int(a.rsplit(":", 1)[1]) for a in self.addresses.values()}
        self.addresses[name] = address(LOOPBACK, free_ports(1, besides=taken)[0])
        return name

    async def _launch(self, name: str) -> None:
        proc = ManagedProcess(self._spec(name), self.log_dir / f"{name}.log")
        self.procs[name] = proc
        proc.start()
        try:
            await proc.wait_ready()
        except BaseException:
            await proc.stop(self.config.stop_timeout_s)
            raise
        logger.debug("%s ready (pid %s)", name, proc.pid)

    def _spec(self, name: str) -> ChildSpec:
        if name == "etcd":
            return self.etcd.child_spec
        if name == "nats":
            return self.nats.child_spec
        common = (
            "--listen", self.addresses[name],
            "--etcd", self.etcd.endpoint,
            "--nats", self.nats.url,
        )  # fmt: skip
        env: Mapping[str, str] | None = None
        if name in self.workers:
            argv = (
                *SERVE,
                "worker",
                *common,
                "--worker-id",
                name,
                "--router",
                self.addresses["router"],
                "--drain-deadline-s",
                str(DRAIN_DEADLINE_S),
                *self.config.worker_args,
            )
            env = dict(self.config.worker_env) or None
        elif name == "gateway":
            upstreams = ("--router", self.addresses["router"])
            argv = (
                *SERVE,
                name,
                *common,
                *upstreams,
                "--session-service",
                self.addresses["session"],
                # the harness checks state under faults; access is tested on its own
                "--insecure",
            )
        elif name == "session":
            argv = (*SERVE, name, *common, "--router", self.addresses["router"])
        else:
            argv = (*SERVE, name, *common)
        return ChildSpec(
            name=name,
            argv=argv,
            env=env,
            health_address=self.addresses[name],
            ready_timeout_s=self.config.ready_timeout_s,
            stop_timeout_s=self.config.stop_timeout_s,
        )
