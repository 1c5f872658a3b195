"""Metrics go over OTLP/gRPC when an endpoint is configured: a minimal collector receives
them, with the service's name, when the exporter is flushed at close."""

from __future__ import annotations

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

from windflow.common import metrics
from windflow.infra import free_port


class Collector(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    async def Export(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self.requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def test_metrics_are_exported_over_otlp() -> None:
    collector = Collector()
    server = grpc.aio.server()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        exporting = await metrics.start(
            "windflow-worker-test", otlp_endpoint=f"http://127.0.0.1:{port}"
        )
        assert exporting.address is None  # no /metrics asked for
        m = metrics.get()
        assert m.live
        m.frame_latency_ms.record(8.0, {"model": "windflow-world"})
        m.sessions_active.add(lambda: [(1.0, {"model": "windflow-world"})])
        await exporting.aclose()  # flushes
    finally:
        await server.stop(None)
    names = set()
    services = set()
    for request in collector.requests:
        for resource in request.resource_metrics:
            attributes = resource.resource.attributes
            services |= {a.value.string_value for a in attributes if a.key == "service.name"}
            for scope in resource.scope_metrics:
                names |= {metric.name for metric in scope.metrics}
    assert {"windflow_frame_latency_ms", "windflow_sessions_active"} <= names
    assert services == {"windflow-worker-test"}
