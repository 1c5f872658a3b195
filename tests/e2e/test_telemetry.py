"""Spans per session and per frame, across gateway and worker, exported over real OTLP."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import nats
from nats.aio.msg import Msg
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import Mesh
from windflow.common import names
from windflow.infra import free_port
from windflow.sdk import Client


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC trace receiver: keeps every span with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_frame_spans_share_the_gateway_trace(tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    mesh = Mesh(tmp_path, workers=1, env=env)
    try:
        await mesh.start()
        headers: list[dict[str, str]] = []
        nc = await nats.connect(mesh.nats.url)

        async def on_placed(msg: Msg) -> None:
            headers.append(dict(msg.headers or {}))

        await nc.subscribe("windflow.v1.session.placed", cb=on_placed)
        async with Client(mesh.gateway) as client, client.session(DEFAULT_MODEL) as session:
            frames = [f async for f in session.frames(limit=10)]
        await nc.close()
        assert len(frames) == 10
        deadline = asyncio.get_running_loop().time() + 15
        by_name: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        while asyncio.get_running_loop().time() < deadline:
            by_name.clear()
            for service, span in collector.spans:
                by_name[span.name].append((service, span))
            # the stream and session spans end (and are exported) after the stream closes
            if (
                len(by_name[names.SPAN_WORKER_FRAME]) >= 10
                and by_name[names.SPAN_GATEWAY_FRAME]
                and by_name[names.SPAN_GATEWAY_STREAM]
                and by_name[names.SPAN_WORKER_SESSION]
            ):
                break
            await asyncio.sleep(0.2)
        (gw_service, stream_span), *_ = by_name[names.SPAN_GATEWAY_STREAM] or [("", None)]
        assert stream_span is not None, sorted(by_name)
        assert gw_service == "windflow-gateway"
        trace_id = stream_span.trace_id
        worker_frames = [s for svc, s in by_name[names.SPAN_WORKER_FRAME]]
        assert {svc for svc, _ in by_name[names.SPAN_WORKER_FRAME]} == {"windflow-worker-worker-1"}
        assert len(worker_frames) >= 10
        assert all(s.trace_id == trace_id for s in worker_frames)
        sessions = [s for _, s in by_name[names.SPAN_WORKER_SESSION]]
        assert sessions and sessions[0].trace_id == trace_id
        assert sessions[0].parent_span_id == stream_span.span_id
        assert all(s.parent_span_id == sessions[0].span_id for s in worker_frames)
        gateway_frames = [s for _, s in by_name[names.SPAN_GATEWAY_FRAME]]
        assert all(s.trace_id == trace_id for s in gateway_frames)
        # the router's placement span joined the CreateSession trace
        creates = [s for _, s in by_name[names.SPAN_CREATE_SESSION]]
        places = [s for svc, s in by_name[names.SPAN_ROUTER_PLACE] if svc == "windflow-router"]
        assert places and places[0].trace_id == creates[0].trace_id
        # ... and so did the NATS event it published (W3C traceparent header)
        assert headers and headers[0]["traceparent"].split("-")[1] == creates[0].trace_id.hex()
    finally:
        await mesh.aclose()
        await server.stop(0)
