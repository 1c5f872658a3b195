"""The embedded Windflow stack behind ``windflow up``: etcd, NATS and every service.

Lifecycle::

    async with Stack(StackConfig(state_dir=...)) as stack:   # start() ... aclose()
        print(stack.gateway_addresses)   # gateway_address: the first of them
        await stack.wait()    # returns after aclose(); raises StackFailed on failure

Start order (each stage ready before the next starts; children of one stage start
concurrently): etcd + nats -> router + session -> workers -> gateways. The gateways come
last so that "ready" means the whole mesh serves, and they are the first to stop, so
clients are cut off before the workers they stream from. Gateways hold no session state
(a stream is proxied to the worker holding its session), so any number of them serve the
same sessions: children ``gateway`` (the first, on ``gateway_port``), ``gateway-2`` ...
Each service is started as ``<service_command> <kind> --listen ... --etcd ... --nats ...
--metrics-listen ...`` (by default ``python -m windflow serve``) and counts as ready when
its gRPC health says SERVING. Every service serves Prometheus metrics on a loopback port of
its own (``metrics_addresses``); ``start`` writes every address to
``<state dir>/services.json``.

Supervision is the ``Supervisor``'s: a dead child is reported and restarted on the same
ports (etcd and NATS keep their data dirs), within ``StackConfig.restart``; past that
budget the whole stack stops and ``wait()`` raises ``StackFailed``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from windflow.access.dev import dev_token
from windflow.infra.errors import StackFailed
from windflow.infra.etcd import EtcdServer
from windflow.infra.health import HttpHealthProbe
from windflow.infra.nats import NatsServer
from windflow.infra.ports import LOOPBACK, address, free_ports
from windflow.infra.procs import ChildSpec, RestartPolicy
from windflow.infra.supervisor import Supervisor

logger = logging.getLogger(__name__)

DEFAULT_SERVICE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "windflow", "serve")


@dataclass(frozen=True)
class StackConfig:
    """What ``Stack`` runs and where."""

    state_dir: Path
    """Root of everything the stack writes: ``logs/<child>.log``, ``etcd/``, ``nats/``."""
    workers: int = 2
    """How many worker processes (ids ``worker-1`` .. ``worker-N``)."""
    routers: int = 1
    """How many router replicas (``router``, ``router-2`` ...): they elect a leader through
    etcd and the others forward to it; every other service is given all of them."""
    gateways: int = 1
    """How many gateway processes (children ``gateway``, ``gateway-2`` .. ``gateway-N``),
    each on its own port: a client that knows several resumes its streams through another
    while one restarts (the SDK does: ``Client([...])``)."""
    host: str = LOOPBACK
    """Interface the gateways listen on. etcd, NATS and the inner services stay on loopback."""
    gateway_port: int | None = None
    """The first gateway's port; None picks a free one. The others always get free ones."""
    region: str | None = None
    """Passed as ``--region`` to the router and the workers when set."""
    worker_regions: Mapping[str, str] = field(default_factory=dict)
    """A worker's own region, by name (``worker-3``: ``eu-west``), over ``region``: a
    multi-region mesh on one machine (``windflow up --regions``)."""
    service_command: tuple[str, ...] = DEFAULT_SERVICE_COMMAND
    """Command prefix that runs one service; the service kind and its flags follow."""
    worker_args: tuple[str, ...] = ()
    """Extra flags for every worker (e.g. ``("--models", "windflow-world")``)."""
    session_args: tuple[str, ...] = ()
    """Extra flags for the session service (e.g. its reclaiming limits)."""
    gateway_args: tuple[str, ...] = ()
    """Extra flags for every gateway (e.g. its tenant quotas)."""
    bridge: bool = True
    """Run the browser bridge (``bridge``, HTTP and WebSocket on ``bridge_url``)."""
    insecure: bool = False
    """Gateways without authentication (``--insecure``); else the stack makes a
    development key and token (``token``, ``<state dir>/token``)."""
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    """Restart budget and backoff of every child (etcd and NATS included)."""
    ready_timeout_s: float = 120.0
    """How long one service may take from start to SERVING (workers import torch)."""
    stop_timeout_s: float = 10.0
    """How long one child gets between SIGTERM and SIGKILL."""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.routers < 1:
            raise ValueError(f"routers must be >= 1, got {self.routers}")
        if self.gateways < 1:
            raise ValueError(f"gateways must be >= 1, got {self.gateways}")
        if not self.service_command:
            raise ValueError("service_command must not be empty")


class Stack:
    """etcd, NATS, router, session, N workers and the gateways, supervised as one unit."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.log_dir = config.state_dir / "logs"
        self.etcd = EtcdServer(config.state_dir, restart=config.restart)
        self.nats = NatsServer(config.state_dir, restart=config.restart)
        session_port, bridge_port, *ports = free_ports(2 + config.routers + config.workers)
        router_ports, worker_ports = ports[: config.routers], ports[config.routers :]
        self.router_names = [_replica("router", i) for i in range(1, config.routers + 1)]
        gateway_ports = free_ports(  # distinct ones
            config.gateways, config.host, besides={session_port, bridge_port, *ports}
        )
        if config.gateway_port:
            others = [port for port in gateway_ports if port != config.gateway_port]
            gateway_ports = [config.gateway_port, *others][: config.gateways]
        self.gateway_names = [gateway_name(i) for i in range(1, config.gateways + 1)]
        """Child names of the gateways, in order (``gateway``, ``gateway-2`` ...)."""
        self.addresses: dict[str, str] = {
            **{
                name: address(LOOPBACK, port)
                for name, port in zip(self.router_names, router_ports, strict=True)
            },
            "session": address(LOOPBACK, session_port),
            **({"bridge": address(config.host, bridge_port)} if config.bridge else {}),
            **{
                f"worker-{i}": address(LOOPBACK, port)
                for i, port in enumerate(worker_ports, start=1)
            },
            **{
                name: address(config.host, port)
                for name, port in zip(self.gateway_names, gateway_ports, strict=True)
            },
        }
        """Listen address of each service, by child name."""
        taken = {session_port, bridge_port, *ports, *gateway_ports}
        self.metrics_addresses: dict[str, str] = {
            name: address(LOOPBACK, port)
            for name, port in zip(
                self.addresses, free_ports(len(self.addresses), besides=taken), strict=True
            )
        }
        """Where each service serves ``GET /metrics`` (Prometheus), by child name (always
        on loopback)."""
        self.supervisor = Supervisor(self._stages(), self.log_dir, name="windflow stack")
        self.token = ""
        """The development tenant's session token, once started (empty: ``insecure``)."""

    @property
    def gateway_address(self) -> str:
        """``host:port`` of the public API (the first gateway's)."""
        return self.addresses["gateway"]

    @property
    def bridge_url(self) -> str | None:
        """Where a person plays in a browser (None: no bridge)."""
        where = self.addresses.get("bridge")
        return None if where is None else f"http://{where}/"

    @property
    def gateway_addresses(self) -> list[str]:
        """``host:port`` of every gateway, the first one first."""
        return [self.addresses[name] for name in self.gateway_names]

    @property
    def router_addresses(self) -> str:
        """Every router replica, comma-separated (what the other services dial)."""
        return ",".join(self.addresses[name] for name in self.router_names)

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd.endpoint

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def failure(self) -> StackFailed | None:
        return self.supervisor.failure

    async def start(self) -> None:
        """Start everything; return once the gateways serve. Raises ``StackFailed``."""
        config = self.config
        logger.info(
            "starting windflow stack: %d worker(s), %d gateway(s), state in %s",
            config.workers,
            config.gateways,
            config.state_dir,
        )
        await self.supervisor.start()
        if not config.insecure:
            self.token = await dev_token(self.etcd.endpoint, config.state_dir)
        (config.state_dir / "services.json").write_text(json.dumps(self.describe(), indent=2))

    def describe(self) -> dict[str, object]:
        """Every address of the stack (what ``<state dir>/services.json`` holds): etcd,
        NATS, and each service's gRPC (or HTTP) listen address and metrics endpoint."""
        return {
            "etcd": self.etcd_endpoint,
            "nats": self.nats_url,
            "services": {
                name: {"listen": listen, "metrics": self.metrics_addresses[name]}
                for name, listen in self.addresses.items()
            },
        }

    async def wait(self) -> None:
        """Wait until the stack has stopped; raise ``StackFailed`` if it failed."""
        await self.supervisor.wait()

    async def aclose(self) -> None:
        """Stop every process in reverse start order. Idempotent."""
        await self.supervisor.aclose()

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- child specs -------------------------------------------------------------------

    def _stages(self) -> list[list[ChildSpec]]:
        workers = [self._worker_spec(i) for i in range(1, self.config.workers + 1)]
        router, session = self.router_addresses, self.addresses["session"]
        upstreams = ("--router", router, "--session-service", session)
        return [
            [self.etcd.child_spec, self.nats.child_spec],
            [
                *(
                    self._service_spec("router", self._region_args(), name=name)
                    for name in self.router_names
                ),
                self._service_spec("session", ("--router", router, *self.config.session_args)),
            ],
            *([workers] if workers else []),
            [
                self._service_spec("gateway", (*upstreams, *self._gateway_args()), name=name)
                for name in self.gateway_names
            ],
            *([[self._bridge_spec()]] if self.config.bridge else []),
        ]

    def _bridge_spec(self) -> ChildSpec:
        gateways = ",".join(self.gateway_addresses).replace("0.0.0.0:", f"{LOOPBACK}:")
        spec = self._service_spec("bridge", ("--gateway", gateways))
        listen = self.addresses["bridge"].replace("0.0.0.0:", f"{LOOPBACK}:", 1)
        return dataclasses.replace(spec, ready_probe=HttpHealthProbe(listen))

    def _gateway_args(self) -> tuple[str, ...]:
        return (*(("--insecure",) if self.config.insecure else ()), *self.config.gateway_args)

    def _region_args(self) -> tuple[str, ...]:
        return () if self.config.region is None else ("--region", self.config.region)

    def _worker_spec(self, index: int) -> ChildSpec:
        name = f"worker-{index}"
        args = (
            "--worker-id",
            name,
            "--router",
            self.router_addresses,
            *(
                ("--region", self.config.worker_regions[name])
                if name in self.config.worker_regions
                else self._region_args()
            ),
            *self.config.worker_args,
        )
        return self._service_spec("worker", args, name=name)

    def _service_spec(
        self, kind: str, extra: tuple[str, ...] = (), *, name: str | None = None
    ) -> ChildSpec:
        child = name or kind
        listen = self.addresses[child]
        argv = (
            *self.config.service_command,
            kind,
            "--listen", listen,
            "--etcd", self.etcd.endpoint,
            "--nats", self.nats.url,
            "--metrics-listen", self.metrics_addresses[child],
            *extra,
        )  # fmt: skip
        # A gateway bound to all interfaces is still health-checked over loopback.
        health = listen.replace("0.0.0.0:", f"{LOOPBACK}:", 1)
        return ChildSpec(
            name=child,
            argv=argv,
            health_address=health,
            restart=self.config.restart,
            ready_timeout_s=self.config.ready_timeout_s,
            stop_timeout_s=self.config.stop_timeout_s,
        )


def gateway_name(index: int) -> str:
    """Child name of gateway ``index`` (1-based): the first is plain ``gateway``, as when
    there is only one (its log, ``logs/gateway.log``, and its address keep their names)."""
    return _replica("gateway", index)


def _replica(kind: str, index: int) -> str:
    """Child name of replica ``index`` (1-based) of ``kind``: the first is plain ``kind``."""
    return kind if index == 1 else f"{kind}-{index}"
