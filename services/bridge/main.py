"""Browser bridge process: HTTP and WebSocket in front of the public gRPC API.

It is a client of ``windflow.v1`` (the gateway stays pure gRPC), on aiohttp:

- ``GET /v1/stream`` (WebSocket): one session's stream (``services/bridge/relay.py``);
- ``GET /v1/models``, ``POST /v1/sessions`` (a ``SessionSpec`` as JSON): ListModels and
  CreateSession, JSON in and out;
- ``GET /`` the page, ``GET /healthz`` 200 once it serves.

Every call carries the caller's token to the gateway (``Authorization: Bearer ...``, or
``?token=`` where a browser cannot set the header); a gRPC status comes back as its HTTP
counterpart (401, 403, 404, 429 ...) with the message.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from aiohttp import web
from google.protobuf import json_format

from services.bridge.config import BridgeConfig
from services.bridge.relay import Relay
from windflow.common import grpc_util, lifecycle
from windflow.v1 import windflow_pb2 as pb
from windflow.v1 import windflow_pb2_grpc

log = logging.getLogger(__name__)

PAGE = Path(__file__).parent / "static" / "index.html"
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
    await relay.run()
    return socket


async def models(request: web.Request) -> web.Response:
    try:
        reply = await request.app[STUB].ListModels(
            pb.ListModelsRequest(), metadata=credentials(request), timeout=15.0
        )
    except grpc.aio.AioRpcError as exc:
        return _refused(exc)
    return web.json_response(json_format.MessageToDict(reply))


async def create_session(request: web.Request) -> web.Response:
    spec = pb.SessionSpec()
    try:
        json_format.Parse(await request.text(), spec)
    except json_format.ParseError as exc:
        return web.json_response({"code": "INVALID_ARGUMENT", "message": str(exc)}, status=400)
    try:
        reply = await request.app[STUB].CreateSession(
            pb.CreateSessionRequest(spec=spec), metadata=credentials(request), timeout=15.0
        )
    except grpc.aio.AioRpcError as exc:
        return _refused(exc)
    return web.json_response(json_format.MessageToDict(reply.session))


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
    app.router.add_get("/v1/stream", stream)
    return app


async def run(config: BridgeConfig) -> int:
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
