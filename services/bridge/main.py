"""Browser bridge process: HTTP and WebSocket in front of the public gRPC API.

It is a client of ``windflow.v1`` (the gateway stays pure gRPC), on aiohttp:

- ``GET /v1/stream`` (WebSocket): one session's stream (``services/bridge/relay.py``);
- ``GET /v1/models``, ``POST /v1/sessions`` (a ``SessionSpec`` as JSON): ListModels and
  CreateSession, JSON in and out;
- ``GET /v1/sessions/{id}``, ``DELETE /v1/sessions/{id}``, ``POST /v1/sessions/{id}/fork``
  (``{"atFrame": n}``), ``POST /v1/sessions/{id}/rewind`` (``{"toFrame": n}``): GetSession,
  CloseSession, Fork and Rewind, the ``Session`` as JSON out;
- ``GET /`` the page (``static/index.html``, its script ``/static/app.js`` built from
  ``clients/typescript/src/page/``), ``GET /healthz`` 200 once it serves.

Every call carries the caller's token to the gateway (``Authorization: Bearer ...``, or
``?token=`` where a browser cannot set the header); a gRPC status comes back as its HTTP
counterpart (401, 403, 404, 429 ...) with the message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from services.bridge import webrtc
from services.bridge.config import BridgeConfig
from services.bridge.relay import Relay
from windflow.common import grpc_util, lifecycle, metrics
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGE = STATIC / "index.html"
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
STUB: web.AppKey[windflow_pb2_grpc.WindflowStub] = web.AppKey("stub")
MAX_BYTES: web.AppKey[int] = web.AppKey("max_message_bytes")
RELAYS: web.AppKey[set[Relay]] = web.AppKey("relays")


def credentials(request: web.Request) -> list[tuple[str, str]]:
    """The caller's token, as the gateway takes it."""
    header = request.headers.get("Authorization", "")
    token = request.query.get("token", "")
    if header:
        return [("authorization", header)]
    return [("authorization", f"Bearer {token}")] if token else []


def _refused(exc: grpc.aio.AioRpcError) -> web.Response:
    code = exc.code()
    return web.json_response(
        {"code": code.name, "message": exc.details() or code.name},
        status=HTTP_STATUS.get(code, 502),
    )


async def stream(request: web.Request) -> web.StreamResponse:
    socket = web.WebSocketResponse(
        max_msg_size=request.app[MAX_BYTES], compress=False, heartbeat=20.0
    )
    await socket.prepare(request)
    relay = Relay(
        socket,
        request.app[STUB],
        credentials(request),
        json_mode=request.query.get("format") == "json",
    )
    relays = request.app[RELAYS]
    relays.add(relay)
    try:
        await relay.run()
    finally:
        relays.discard(relay)
    return socket


UNARY_TIMEOUT_S = 30.0


async def _unary(
    request: web.Request,
    method: str,
    ask: Message,
    pick: Callable[[Any], Message] = lambda reply: reply,
) -> web.Response:
    """Call ``Windflow/<method>`` with the caller's token: the answer (``pick`` of it) as
    JSON, or the refusal as its HTTP status."""
    try:
        reply = await getattr(request.app[STUB], method)(
            ask, metadata=credentials(request), timeout=UNARY_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as exc:
        return _refused(exc)
    return web.json_response(json_format.MessageToDict(pick(reply)))


async def _parsed(request: web.Request, ask: Message) -> web.Response | None:
    """Fill ``ask`` from the request's JSON body; a 400 when it is not one."""
    try:
        json_format.Parse(await request.text() or "{}", ask)
    except (json_format.ParseError, ValueError) as exc:  # (not UTF-8: a ValueError)
        return web.json_response({"code": "INVALID_ARGUMENT", "message": str(exc)}, status=400)
    return None


async def models(request: web.Request) -> web.Response:
    return await _unary(request, "ListModels", pb.ListModelsRequest())


async def create_session(request: web.Request) -> web.Response:
    """A ``SessionSpec`` as JSON in; the ``Session`` out."""
    spec = pb.SessionSpec()
    if (bad := await _parsed(request, spec)) is not None:
        return bad
    ask = pb.CreateSessionRequest(spec=spec)
    return await _unary(request, "CreateSession", ask, lambda reply: reply.session)


async def get_session(request: web.Request) -> web.Response:
    ask = pb.GetSessionRequest(session_id=request.match_info["session_id"])
    return await _unary(request, "GetSession", ask)


async def fork(request: web.Request) -> web.Response:
    """A ``ForkRequest`` as JSON (``{"atFrame": n}``); the session id is the path's."""
    ask = pb.ForkRequest()
    if (bad := await _parsed(request, ask)) is not None:
        return bad
    ask.session_id = request.match_info["session_id"]
    return await _unary(request, "Fork", ask)


async def rewind(request: web.Request) -> web.Response:
    """A ``RewindRequest`` as JSON (``{"toFrame": n}``); the session id is the path's."""
    ask = pb.RewindRequest()
    if (bad := await _parsed(request, ask)) is not None:
        return bad
    ask.session_id = request.match_info["session_id"]
    return await _unary(request, "Rewind", ask)


async def close_session(request: web.Request) -> web.Response:
    ask = pb.CloseSessionRequest(session_id=request.match_info["session_id"])
    return await _unary(request, "CloseSession", ask, lambda reply: reply.session)


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def application(config: BridgeConfig, channel: grpc.aio.Channel) -> web.Application:
    app = web.Application(client_max_size=config.max_message_bytes)
    app[STUB] = windflow_pb2_grpc.WindflowStub(channel)
    app[MAX_BYTES] = config.max_message_bytes
    app.router.add_get("/", page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/sessions", create_session)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_delete("/v1/sessions/{session_id}", close_session)
    app.router.add_post("/v1/sessions/{session_id}/fork", fork)
    app.router.add_post("/v1/sessions/{session_id}/rewind", rewind)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/v1/stream", stream)
    webrtc.setup(app, config)  # POST /v1/sessions/{session_id}/webrtc
    app[RELAYS] = set()
    metrics.get().bridge_connections.add(
        lambda: [
            (len(app[RELAYS]), {"transport": "websocket"}),
            (len(app[webrtc.PEERS]), {"transport": "webrtc"}),
        ]
    )
    return app


async def run(config: BridgeConfig) -> int:
    exporting = await metrics.start(
        "windflow-bridge", listen=config.metrics_listen, otlp_endpoint=config.otlp_endpoint
    )
    channel = grpc_util.channel(config.gateway, max_send_bytes=config.max_message_bytes)
    runner = web.AppRunner(application(config, channel), access_log=None)
    await runner.setup()
    host, _, port = config.listen.rpartition(":")
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    bound = runner.addresses[0]
    log.info("bridge serving on http://%s:%d/ (gateway %s)", bound[0], bound[1], config.gateway)
    forever = asyncio.create_task(asyncio.Event().wait(), name="bridge-server")
    try:
        return await lifecycle.wait_for_stop(forever)
    finally:
        forever.cancel()
        await runner.cleanup()
        await channel.close()
        await exporting.aclose()
