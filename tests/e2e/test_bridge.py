"""The browser bridge end to end (docs/browser.md): HTTP and the WebSocket protocol over a
``windflow up`` stack (``Stack``, authenticating), with an aiohttp client in the role of
the browser. Real etcd, NATS and services."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from services.worker.models.registry import DEFAULT_MODEL
from tests.e2e.mesh import logged_stack
from windflow.infra import Stack
from windflow.sdk import Client
from windflow.v1 import windflow_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

SPEC = {"seed": 17, "format": "rgb", "output_policy": "pause", "quality": "fixed"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with logged_stack(tmp_path_factory.mktemp("bridge"), workers=1) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def ws_url(stack: Stack, **query: str) -> str:
    assert stack.bridge_url is not None
    url = stack.bridge_url.replace("http://", "ws://") + "v1/stream"
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


async def session_for(stack: Stack, size: int = 0) -> pb.Session:
    async with Client(stack.gateway_address, token=stack.token) as client:
        return await client.create_session(
            DEFAULT_MODEL,
            width=size,
            height=size,
            **SPEC,  # type: ignore[arg-type]
        )


async def close(stack: Stack, *sessions: pb.Session) -> None:
    async with Client(stack.gateway_address, token=stack.token) as client:
        for session in sessions:
            await client.close_session(session.session_id)


async def frames_over(
    socket: aiohttp.ClientWebSocketResponse, count: int, delay_s: float = 0.0
) -> tuple[list[pb.Frame], list[pb.SessionEvent]]:
    frames: list[pb.Frame] = []
    events: list[pb.SessionEvent] = []
    while len(frames) < count:
        message = pb.ServerMessage.FromString(await socket.receive_bytes(timeout=20))
        if message.HasField("frame"):
            frames.append(message.frame)
            await asyncio.sleep(delay_s)
        elif message.HasField("event"):
            events.append(message.event)
    return frames, events


async def test_http_endpoints_and_the_page(stack: Stack, http: aiohttp.ClientSession) -> None:
    base = stack.bridge_url
    assert base is not None
    async with http.get(base + "healthz") as reply:
        assert reply.status == 200
    async with http.get(base) as reply:
        assert reply.status == 200 and "Windflow" in await reply.text()
    async with http.get(base + "v1/models") as reply:
        assert reply.status == 401  # no token
        assert (await reply.json())["code"] == "UNAUTHENTICATED"
    async with http.get(base + f"v1/models?token={stack.token}") as reply:
        assert reply.status == 200
        assert [m["modelId"] for m in (await reply.json())["models"]] == [DEFAULT_MODEL]
    auth = {"Authorization": f"Bearer {stack.token}"}
    async with http.post(base + "v1/sessions", json={"modelId": "nope"}, headers=auth) as reply:
        assert reply.status == 404
    async with http.post(base + "v1/sessions", data="{not json", headers=auth) as reply:
        assert reply.status == 400
    async with http.post(
        base + "v1/sessions", json={"modelId": DEFAULT_MODEL}, headers=auth
    ) as reply:
        assert reply.status == 200
        made = await reply.json()
        assert made["spec"]["modelId"] == DEFAULT_MODEL
    await close(stack, pb.Session(session_id=made["sessionId"]))


async def test_a_websocket_stream_is_the_grpc_stream_frame_for_frame(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    reference = await session_for(stack)
    async with Client(stack.gateway_address, token=stack.token) as client:
        live = await client.attach(reference, controls=[(0, 1), (20, 3)])
        expected = [f.frame.data async for f in live.frames(limit=40)]
        await live.aclose()
    session = await session_for(stack)
    headers = {"Authorization": f"Bearer {stack.token}"}
    async with http.ws_connect(ws_url(stack), headers=headers) as socket:
        attach = pb.Attach(
            session_id=session.session_id, controls=[pb.Control(frame_index=0, action=1)]
        )
        await socket.send_bytes(pb.ClientMessage(attach=attach).SerializeToString())
        await socket.send_bytes(
            pb.ClientMessage(control=pb.Control(frame_index=20, action=3)).SerializeToString()
        )
        frames, events = await frames_over(socket, 40)
    assert events[0].kind == pb.SessionEvent.KIND_ATTACHED
    assert [f.frame_index for f in frames] == list(range(40))
    assert [f.data for f in frames] == expected
    await close(stack, reference, session)


async def test_json_messages_for_debugging(stack: Stack, http: aiohttp.ClientSession) -> None:
    session = await session_for(stack)
    async with http.ws_connect(ws_url(stack, token=stack.token, format="json")) as socket:
        await socket.send_str(json.dumps({"attach": {"sessionId": session.session_id}}))
        got: list[int] = []
        while len(got) < 3:
            message = json.loads(await socket.receive_str(timeout=20))
            if "frame" in message:
                got.append(int(message["frame"].get("frameIndex", 0)))
    await close(stack, session)
    assert got == [0, 1, 2]


@pytest.mark.parametrize(
    ("query", "first", "close_code"),
    [
        ({}, "attach", 4016),  # no token: UNAUTHENTICATED
        ({"token": "nope"}, "attach", 4016),
        ({"token": "TOKEN"}, "unknown", 4005),  # NOT_FOUND
        ({"token": "TOKEN"}, "garbage", 1007),  # not a ClientMessage
        ({"token": "TOKEN"}, "oversize", 1009),
    ],
)
async def test_bad_input_closes_with_a_clear_code(
    stack: Stack, http: aiohttp.ClientSession, query: dict[str, str], first: str, close_code: int
) -> None:
    session = await session_for(stack) if first == "attach" else pb.Session()
    query = {k: stack.token if v == "TOKEN" else v for k, v in query.items()}
    async with http.ws_connect(ws_url(stack, **query)) as socket:
        if first == "garbage":
            await socket.send_bytes(b"\xff\xff\xff not protobuf")
        elif first == "oversize":
            with contextlib.suppress(ConnectionError):  # (closed under the write)
                await socket.send_bytes(b"\x00" * (2 << 20))
        else:
            target = session.session_id if first == "attach" else "f" * 32
            attach = pb.Attach(session_id=target)
            await socket.send_bytes(pb.ClientMessage(attach=attach).SerializeToString())
        last = None
        async for message in socket:
            if message.type == aiohttp.WSMsgType.BINARY:
                last = pb.ServerMessage.FromString(message.data)
        if first == "oversize":
            # the bridge closes 1009 while the client is still writing: a client may see
            # the connection dropped (1006) before it reads that close frame
            assert socket.close_code in (close_code, 1006)
        else:
            assert socket.close_code == close_code
    if session.session_id:
        await close(stack, session)
    if close_code >= 4000:
        assert last is not None and last.error.code == close_code - 4000


async def test_session_routes_get_fork_rewind_close(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    base = stack.bridge_url
    assert base is not None
    auth = {"Authorization": f"Bearer {stack.token}"}
    session = await session_for(stack)
    async with Client(stack.gateway_address, token=stack.token) as client:
        live = await client.attach(session)
        async for _ in live.frames(limit=12):
            pass
        await live.aclose()
    sessions = base + "v1/sessions/"
    url = sessions + session.session_id
    async with http.get(url, headers=auth) as reply:
        assert reply.status == 200
        got = await reply.json()
        assert got["sessionId"] == session.session_id and int(got["headFrame"]) >= 12
    async with http.post(url + "/fork", json={"atFrame": 5}, headers=auth) as reply:
        assert reply.status == 200
        child = await reply.json()
        assert child["parentSessionId"] == session.session_id and child["forkedAt"] == "5"
    async with http.post(url + "/rewind", json={"toFrame": 3}, headers=auth) as reply:
        assert reply.status == 200
        assert (await reply.json())["sessionId"] == session.session_id
    async with http.get(url, headers=auth) as reply:
        assert int((await reply.json())["headFrame"]) == 3
    async with http.post(url + "/fork", json={"atFrame": 1_000_000}, headers=auth) as reply:
        assert reply.status == 400  # OUT_OF_RANGE: beyond the head
        assert (await reply.json())["code"] == "OUT_OF_RANGE"
    for route in ("/fork", "/rewind"):
        async with http.post(url + route, data="{not json", headers=auth) as reply:
            assert reply.status == 400
            assert (await reply.json())["code"] == "INVALID_ARGUMENT"
        async with http.post(url + route, json={"frame": 1}, headers=auth) as reply:
            assert reply.status == 400  # not a field of the request
    async with http.get(url) as reply:
        assert reply.status == 401  # no token
    async with http.get(url, params={"token": "nope"}) as reply:
        assert reply.status == 401
    async with http.get(sessions + "f" * 32, headers=auth) as reply:
        assert reply.status == 404
        assert (await reply.json())["code"] == "NOT_FOUND"
    async with http.post(sessions + "f" * 32 + "/rewind", json={}, headers=auth) as reply:
        assert reply.status == 404
    async with http.delete(sessions + child["sessionId"], headers=auth) as reply:
        assert reply.status == 200
        assert (await reply.json())["state"] == "SESSION_STATE_CLOSED"
    async with http.delete(url, params={"token": stack.token}) as reply:
        assert reply.status == 200
    async with http.get(url, headers=auth) as reply:
        assert (await reply.json())["state"] == "SESSION_STATE_CLOSED"


async def test_the_page_and_its_script(stack: Stack, http: aiohttp.ClientSession) -> None:
    base = stack.bridge_url
    assert base is not None
    async with http.get(base) as reply:
        page = await reply.text()
        assert '<canvas id="screen"' in page and "static/app.js" in page
    async with http.get(base + "static/app.js") as reply:
        assert reply.status == 200
        assert "javascript" in reply.headers["Content-Type"]
        assert len(await reply.read()) > 1000
    async with http.get(base + "static/../main.py") as reply:
        assert reply.status in (403, 404)
