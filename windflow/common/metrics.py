"""OpenTelemetry metrics: every instrument a Windflow service records, by its stable name
(declared here and only here, in ``SPECS``), the meter provider, and the Prometheus
``/metrics`` endpoint.

``await start(service, listen=..., otlp_endpoint=...)``, once per process (``windflow
serve`` does it first thing), installs a MeterProvider read

- by Prometheus: ``GET http://LISTEN/metrics`` (``--metrics-listen HOST:PORT``; off when
  empty), a small aiohttp app on the service's own event loop;
- over OTLP/gRPC, when an endpoint is configured (``--otlp-endpoint`` or
  OTEL_EXPORTER_OTLP_ENDPOINT, as for traces), every OTEL_METRIC_EXPORT_INTERVAL ms
  (the SDK's default: 60000).

With neither, and before ``start`` (unit tests, in-process servers), every instrument is a
no-op. Code records through ``get()``: ``metrics.get().admission_refusals.add(1, {...})``.
The per-frame path keeps its instruments and a pre-built attributes dict
(``attributes``) and records into them directly; figures a service counts anyway (the step
engine's drops and misses, the sessions it holds, queue lengths) cost nothing per frame:
they are read at collection time from the sources the service adds to an ``Observed``
instrument (``Observed.add``).

docs/operations.md ("Metrics") lists every metric, its labels and where it is measured;
deploy/grafana/windflow.json is the dashboard.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, UpDownCounter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from windflow.common import env

log = logging.getLogger(__name__)

LATENCY_BUCKETS_MS: tuple[float, ...] = (
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0,
    500.0, 750.0, 1000.0, 2000.0, 5000.0,
)  # fmt: skip
"""Bucket bounds (ms) of the latency histograms: fine where a frame interval is (16-50 ms
at 20-60 fps), coarse past a second."""

Attributes = Mapping[str, str]
Source = Callable[[], Iterable[tuple[float, Attributes]]]
"""What an ``Observed`` instrument reads at collection time: (value, attributes) pairs."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One instrument: its OpenTelemetry name, kind, meaning, labels and the service(s)
    that record it."""

    name: str
    kind: str
    """``counter``, ``updown`` (a gauge kept by +1/-1), ``histogram``, ``gauge``
    (observed) or ``observed_counter`` (a monotonic count read at collection time)."""
    help: str
    labels: tuple[str, ...]
    services: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    unit: str = ""

    @property
    def attribute(self) -> str:
        """Its attribute on ``Metrics`` (the name without ``windflow_``)."""
        return self.name.removeprefix("windflow_")

    @property
    def prometheus(self) -> str:
        """Its name on ``/metrics`` (counters get ``_total``)."""
        return f"{self.name}_total" if self.kind in ("counter", "observed_counter") else self.name

    @property
    def series(self) -> tuple[str, ...]:
        """Every series name it exposes on ``/metrics``."""
        if self.kind == "histogram":
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_sum", "_count"))
        return (self.prometheus,)


WORKER, GATEWAY, ROUTER, SESSION, BRIDGE = "worker", "gateway", "router", "session", "bridge"

SPECS: tuple[MetricSpec, ...] = (
    # ---- worker: sessions, frames, the runtime ----
    MetricSpec(
        "windflow_sessions_active", "gauge", "sessions this worker holds", ("model",), (WORKER,)
    ),
    MetricSpec(
        "windflow_sessions_attached",
        "gauge",
        "sessions held with a controller's stream attached (being made)",
        ("model",),
        (WORKER,),
    ),
    MetricSpec(
        "windflow_frames_delivered",
        "observed_counter",
        "frames sent to sessions' controllers (rate: delivered fps)",
        ("model",),
        (WORKER,),
    ),
    MetricSpec(
        "windflow_frame_latency_ms",
        "histogram",
        "frame latency on the worker, ms: from the frame's due time to its send",
        ("model",),
        (WORKER,),
        LATENCY_BUCKETS_MS,
    ),
    MetricSpec(
        "windflow_control_to_frame_ms",
        "histogram",
        "ms from a control's arrival at the worker to the send of the first frame it applies to",
        ("model",),
        (WORKER,),
        LATENCY_BUCKETS_MS,
    ),
    MetricSpec(
        "windflow_deadline_misses",
        "observed_counter",
        "frames finished after their deadline (their due time plus one frame interval)",
        ("model",),
        (WORKER,),
    ),
    MetricSpec(
        "windflow_quality_changes",
        "observed_counter",
        "quality rung changes of adaptive sessions (down: deadlines missed; up: slack)",
        ("direction",),
        (WORKER,),
    ),
    MetricSpec(
        "windflow_queue_depth",
        "gauge",
        "items waiting, by queue: frames_out (made, not yet sent), controls_pending (for "
        "future frames), batches_in_flight (sent to the model), usage_records (unpublished)",
        ("queue",),
        (WORKER,),
    ),
    MetricSpec(
        "windflow_frames_dropped",
        "observed_counter",
        "frames dropped by DROP_OLDEST (a client reading slower than its fps)",
        (),
        (WORKER,),
    ),
    MetricSpec(
        "windflow_input_frames_dropped",
        "observed_counter",
        "input frames (Control.frame) dropped, newest wins: a client sending frames faster "
        "than its model uses them",
        (),
        (WORKER,),
    ),
    MetricSpec(
        "windflow_admission_refusals",
        "counter",
        "OpenSession refusals: full (no slot), fps (no fps headroom), draining, stopping",
        ("reason",),
        (WORKER,),
    ),
    MetricSpec(
        "windflow_controls_refused",
        "counter",
        "controls refused in a stream, by status code (a past frame, too many pending, "
        "a spectator's)",
        ("code",),
        (WORKER,),
    ),
    MetricSpec(
        "windflow_worker_migrations",
        "counter",
        "sessions live-migrated onto (in, committed) or off (out, handed off) this worker",
        ("direction",),
        (WORKER,),
    ),
    MetricSpec(
        "windflow_usage_seconds",
        "counter",
        "streamed seconds metered by this worker (frames sent / the session's fps), "
        "before the ledger's de-duplication",
        ("model",),
        (WORKER,),
        unit="s",
    ),
    MetricSpec(
        "windflow_worker_utilization",
        "gauge",
        "predicted busy fraction of the model step at the sessions' current quality",
        (),
        (WORKER,),
    ),
    # ---- gateway ----
    MetricSpec(
        "windflow_streams_active", "updown", "client streams open on this gateway", (), (GATEWAY,)
    ),
    MetricSpec(
        "windflow_sessions_created", "counter", "sessions created (forks included)", (), (GATEWAY,)
    ),
    MetricSpec(
        "windflow_stream_recoveries",
        "counter",
        "streams that followed their session to another worker: recovered (the worker "
        "failed or left) or migrated (a live migration)",
        ("kind",),
        (GATEWAY,),
    ),
    MetricSpec(
        "windflow_quota_refusals",
        "counter",
        "calls refused RESOURCE_EXHAUSTED by a tenant quota or a token's budget: "
        "tenant_sessions, create_rate, budget",
        ("reason",),
        (GATEWAY,),
    ),
    MetricSpec(
        "windflow_auth_refusals",
        "observed_counter",
        "calls refused UNAUTHENTICATED or PERMISSION_DENIED, by reason",
        ("reason",),
        (GATEWAY,),
    ),
    # ---- router ----
    MetricSpec(
        "windflow_router_leader",
        "gauge",
        "1 while this router replica leads (places, recovers, migrates), else 0",
        (),
        (ROUTER,),
    ),
    MetricSpec(
        "windflow_placements",
        "counter",
        "new sessions placed (outcome placed) or not (failed)",
        ("outcome",),
        (ROUTER,),
    ),
    MetricSpec(
        "windflow_recoveries",
        "counter",
        "sessions re-placed: kind crash (their worker failed or dropped them) or unpark; "
        "outcome placed or failed",
        ("kind", "outcome"),
        (ROUTER,),
    ),
    MetricSpec(
        "windflow_migrations",
        "counter",
        "live migrations asked of the leader: done, aborted, or refused before starting",
        ("outcome",),
        (ROUTER,),
    ),
    MetricSpec(
        "windflow_workers",
        "gauge",
        "workers registered in etcd, as this router sees them: live, or draining",
        ("state",),
        (ROUTER,),
    ),
    # ---- session service ----
    MetricSpec(
        "windflow_sessions_parked",
        "gauge",
        "sessions parked (checkpointed, on no worker), as of the last retention round",
        (),
        (SESSION,),
    ),
    MetricSpec(
        "windflow_session_records",
        "gauge",
        "session records by state (placed, streaming, parked, closed ...), as of the last "
        "retention round",
        ("state",),
        (SESSION,),
    ),
    MetricSpec(
        "windflow_sessions_reclaimed",
        "counter",
        "sessions reclaimed: closed (never attached) or parked (no client)",
        ("action",),
        (SESSION,),
    ),
    MetricSpec(
        "windflow_usage_billed_seconds",
        "counter",
        "streamed seconds the usage ledger billed (each frame once)",
        ("model",),
        (SESSION,),
        unit="s",
    ),
    # ---- bridge ----
    MetricSpec(
        "windflow_bridge_connections",
        "gauge",
        "browser connections open: websocket streams, webrtc peers",
        ("transport",),
        (BRIDGE,),
    ),
    MetricSpec(
        "windflow_bridge_frames_dropped",
        "counter",
        "frames the bridge dropped toward a browser reading slower than the session",
        ("transport",),
        (BRIDGE,),
    ),
)


class Observed:
    """An observable instrument: its value is read at collection time from sources the
    services add (no cost when nothing collects). Not live (no provider): sources are not
    kept."""

    def __init__(self, live: bool) -> None:
        self._live = live
        self._sources: list[Source] = []

    def add(self, source: Source) -> None:
        if self._live:
            self._sources.append(source)

    def remove(self, source: Source) -> None:
        if source in self._sources:
            self._sources.remove(source)

    def read(self) -> list[tuple[float, Attributes]]:
        """Every source's observations; a source that fails is skipped (collection may run
        on the OTLP reader's thread while the loop changes what it reads)."""
        out: list[tuple[float, Attributes]] = []
        for source in list(self._sources):
            try:
                out.extend(source())
            except Exception:
                log.debug("a metrics source failed", exc_info=True)
        return out

    def _callback(self, options: CallbackOptions) -> Iterable[otel_metrics.Observation]:
        return [otel_metrics.Observation(value, dict(attrs)) for value, attrs in self.read()]


class Metrics:
    """Every instrument of ``SPECS``, by its attribute name."""

    # worker
    sessions_active: Observed
    sessions_attached: Observed
    frames_delivered: Observed
    frame_latency_ms: Histogram
    control_to_frame_ms: Histogram
    deadline_misses: Observed
    quality_changes: Observed
    queue_depth: Observed
    frames_dropped: Observed
    input_frames_dropped: Observed
    admission_refusals: Counter
    controls_refused: Counter
    worker_migrations: Counter
    usage_seconds: Counter
    worker_utilization: Observed
    # gateway
    streams_active: UpDownCounter
    sessions_created: Counter
    stream_recoveries: Counter
    quota_refusals: Counter
    auth_refusals: Observed
    # router
    router_leader: Observed
    placements: Counter
    recoveries: Counter
    migrations: Counter
    workers: Observed
    # session service
    sessions_parked: Observed
    session_records: Observed
    sessions_reclaimed: Counter
    usage_billed_seconds: Counter
    # bridge
    bridge_connections: Observed
    bridge_frames_dropped: Counter

    def __init__(self, meter: Meter | None = None) -> None:
        """``meter`` None: every instrument is a no-op."""
        self.live = meter is not None
        chosen = meter or otel_metrics.NoOpMeter("windflow")
        for spec in SPECS:
            setattr(self, spec.attribute, _instrument(chosen, spec, self.live))


def _instrument(meter: Meter, spec: MetricSpec, live: bool) -> Any:
    if spec.kind == "counter":
        return meter.create_counter(spec.name, spec.unit, spec.help)
    if spec.kind == "updown":
        return meter.create_up_down_counter(spec.name, spec.unit, spec.help)
    if spec.kind == "histogram":
        return meter.create_histogram(
            spec.name,
            spec.unit,
            spec.help,
            explicit_bucket_boundaries_advisory=list(spec.buckets),
        )
    observed = Observed(live)
    if spec.kind == "gauge":
        meter.create_observable_gauge(spec.name, [observed._callback], spec.unit, spec.help)
    elif spec.kind == "observed_counter":
        meter.create_observable_counter(spec.name, [observed._callback], spec.unit, spec.help)
    else:
        raise ValueError(f"unknown metric kind {spec.kind!r} of {spec.name}")
    return observed


_metrics = Metrics()
_provider: Any = None
_registry: CollectorRegistry | None = None


def get() -> Metrics:
    """The process's instruments (no-ops until ``start``)."""
    return _metrics


def prometheus_names() -> set[str]:
    """Every series name Windflow's own metrics expose on ``/metrics``."""
    return {name for spec in SPECS for name in spec.series}


def setup(service_name: str, *, prometheus: bool, otlp_endpoint: str | None = None) -> bool:
    """Install the meter provider (once per process): a Prometheus reader when
    ``prometheus``, an OTLP one when an endpoint is given or configured. Returns whether
    metrics are recorded (False: neither; the instruments stay no-ops)."""
    global _metrics, _provider, _registry
    if _provider is not None:
        return True
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics._internal.exemplar import AlwaysOffExemplarFilter
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource

    readers: list[MetricReader] = []
    registry = None
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry, scope_info_enabled=False))
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, fds
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    endpoint = otlp_endpoint or env.OTLP_ENDPOINT.get()
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(
            PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint, insecure=True))
        )
    if not readers:
        return False
    name = env.OTEL_SERVICE_NAME.get(service_name) or service_name
    _provider = MeterProvider(
        metric_readers=readers,
        resource=Resource.create({"service.name": name}),
        exemplar_filter=AlwaysOffExemplarFilter(),  # (exemplars cost ~1 us a measurement)
        shutdown_on_exit=False,
    )
    _registry = registry
    _metrics = Metrics(_provider.get_meter("windflow"))
    log.info(
        "recording metrics as %s%s%s",
        name,
        " for Prometheus" if prometheus else "",
        f", exporting over OTLP to {endpoint}" if endpoint else "",
    )
    return True


def scrape() -> bytes:
    """What ``GET /metrics`` answers: the Prometheus text format (empty before setup)."""
    return generate_latest(_registry) if _registry is not None else b""


async def _serve_metrics(request: web.Request) -> web.Response:
    return web.Response(body=scrape(), headers={"Content-Type": CONTENT_TYPE_LATEST})


class Exporting:
    """What ``start`` set up: the ``/metrics`` server (``address``; None: none) and the
    provider; ``aclose()`` stops both (flushing the OTLP exporter)."""

    def __init__(self, runner: web.AppRunner | None, address: str | None) -> None:
        self._runner = runner
        self.address = address

    async def aclose(self) -> None:
        global _metrics, _provider, _registry
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        provider, _provider = _provider, None
        _metrics, _registry = Metrics(), None
        if provider is not None:
            await asyncio.to_thread(provider.shutdown, timeout_millis=5000)


async def start(
    service_name: str, *, listen: str = "", otlp_endpoint: str | None = None
) -> Exporting:
    """Set metrics up for this process and serve ``/metrics`` on ``listen`` (host:port,
    port 0 picks one; empty: no endpoint) on the running loop."""
    if not setup(service_name, prometheus=bool(listen), otlp_endpoint=otlp_endpoint):
        return Exporting(None, None)
    if not listen:
        return Exporting(None, None)
    app = web.Application()
    app.router.add_get("/metrics", _serve_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    try:
        await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    address = f"{listen.rpartition(':')[0] or '0.0.0.0'}:{bound[1]}"
    log.info("metrics on http://%s/metrics", address)
    return Exporting(runner, address)
