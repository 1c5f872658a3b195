"""The bridge's page in real headless Chromium (docs/browser.md, "The page"), driven over
the DevTools protocol (``windflow.infra.chromium``) against a ``windflow up`` stack
(``Stack``, authenticating): the page loads and creates a session, its canvas shows
frames, a key moves the red agent the key's way, a spectator page from the share link
shows the same session, and WebRTC draws video frames. Skipped where there is no Chromium
(``$WINDFLOW_CHROMIUM``, ``chromium`` on the PATH, ``/usr/bin/chromium``)."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.e2e.mesh import StackLogs
from windflow.cli.bench_browser import PROBE_JS
from windflow.infra import Stack, StackConfig
from windflow.infra.chromium import MISSING, Chromium, Page, find_chromium

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        find_chromium() is None,
        reason=MISSING,
    ),
]

CANVAS_COLOURS = """
(() => {
  const canvas = document.getElementById('screen');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  for (let i = 0; i < data.length; i += 4) {
    seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  }
  return seen.size;
})()
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    state_dir = tmp_path_factory.mktemp("browser")
    logs = StackLogs(state_dir / "logs")
    try:
        async with Stack(StackConfig(state_dir=state_dir, workers=1)) as running:
            yield running
    finally:
        logs.closed()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Chromium]:
    async with Chromium() as running:
        yield running


def page_url(stack: Stack) -> str:
    assert stack.bridge_url is not None
    return stack.bridge_url + "?" + urllib.parse.urlencode({"token": stack.token, "fps": "24"})


async def play(browser: Chromium, stack: Stack, transport: str = "ws") -> Page:
    """A page that created a session and plays it."""
    page = await browser.new_page(page_url(stack), init_script=PROBE_JS)
    await page.wait_for("document.querySelectorAll('#model option').length > 0", "the models")
    await page.evaluate(
        f"document.getElementById('transport').value = '{transport}';"
        "document.getElementById('start').click()"
    )
    await page.wait_for("window.windflow.sessionId", "a session")
    return page


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def playing(browser: Chromium, stack: Stack) -> AsyncIterator[Page]:
    page = await play(browser, stack)
    yield page
    await page.close()


async def test_the_page_creates_a_session_and_draws_its_frames(
    playing: Page, tmp_path: Path
) -> None:
    await playing.wait_for("window.windflow.framesDrawn > 10", "frames drawn", timeout_s=20)
    state = await playing.evaluate("window.windflow")
    assert state["role"] == "controller" and state["transport"] == "ws"
    assert len(state["sessionId"]) > 0 and state["sessionFps"] == 24
    assert state["wsFirstFrameMs"] > state["wsAttachMs"] > 0
    assert await playing.evaluate(CANVAS_COLOURS) > 1  # a picture, not one colour
    assert await playing.evaluate("window.__probe.red") > 50  # the red agent is in it
    shot = await playing.screenshot(tmp_path / "page.png")
    assert shot.startswith(b"\x89PNG") and (tmp_path / "page.png").stat().st_size > 1000


@pytest.mark.parametrize(("key", "axis", "sign"), [("ArrowUp", "cy", -1), ("ArrowDown", "cy", 1)])
async def test_a_key_moves_the_red_agent_its_way(
    playing: Page, key: str, axis: str, sign: int
) -> None:
    await playing.wait_for("window.__probe.red > 50", "the red agent")
    before = await playing.evaluate(f"window.__probe.{axis}")
    moves = await playing.evaluate("window.__probe.moves.length")
    await playing.key_down(key)
    try:
        # the probe: the agent's centroid moved >= 1 px the key's way on a drawn frame
        await playing.wait_for(f"window.__probe.moves.length > {moves}", f"{key}'s effect")
        await playing.wait_for(
            f"(window.__probe.{axis} - {before}) * {sign} >= 4", f"{key} held: 4 px or more"
        )
    finally:
        await playing.key_up(key)
    state = await playing.evaluate("window.windflow")
    assert len(state["c2fMs"]) >= 1  # the page measured the control's frame


async def test_a_spectator_page_shows_the_same_session(
    browser: Chromium, playing: Page, tmp_path: Path
) -> None:
    link = await playing.wait_for(
        "(h => h.includes('spectate=') && h)(document.getElementById('share').href)",
        "the spectate link",
    )
    spectator = await browser.new_page(link, init_script=PROBE_JS)
    try:
        await spectator.wait_for("window.windflow.framesDrawn > 10", "the spectator's frames")
        theirs = await spectator.evaluate("window.windflow")
        mine = await playing.evaluate("window.windflow")
        assert theirs["role"] == "spectator" and theirs["sessionId"] == mine["sessionId"]
        assert await spectator.evaluate("document.getElementById('role').textContent") == (
            "spectating"
        )
        assert abs(theirs["lastFrameIndex"] - mine["lastFrameIndex"]) < 24
        # the controller moves the agent: the spectator's picture follows
        moves = await playing.evaluate("window.__probe.moves.length")
        await playing.key_down("ArrowDown")
        try:
            await playing.wait_for(f"window.__probe.moves.length > {moves}", "ArrowDown's effect")
        finally:
            await playing.key_up("ArrowDown")
        await asyncio.sleep(0.5)  # the agent stands still again
        at = await playing.evaluate("[window.__probe.cx, window.__probe.cy]")
        await spectator.wait_for(
            f"Math.abs(window.__probe.cx - {at[0]}) < 0.5 && "
            f"Math.abs(window.__probe.cy - {at[1]}) < 0.5",
            "the spectator's agent where the controller's is",
        )
        assert await spectator.evaluate(CANVAS_COLOURS) > 1
        await spectator.screenshot(tmp_path / "spectator.png")
    finally:
        await spectator.close()


async def test_webrtc_draws_video_frames(browser: Chromium, stack: Stack, tmp_path: Path) -> None:
    page = await play(browser, stack, "webrtc")
    try:
        await page.wait_for(
            "window.windflow.transport === 'webrtc' && window.windflow.videoFrames > 10",
            "WebRTC video frames drawn",
            timeout_s=20,
        )
        state = await page.evaluate("window.windflow")
        assert state["rtcFirstFrameMs"] > state["rtcAttachMs"] > 0
        assert await page.evaluate(CANVAS_COLOURS) > 1
        await page.wait_for("window.__probe.red > 50", "the red agent in the video")
        # a control over the data channel shows in the video
        before = await page.evaluate("window.__probe.cy")
        await page.key_down("ArrowUp")
        try:
            await page.wait_for(f"window.__probe.cy <= {before} - 2", "ArrowUp's effect")
        finally:
            await page.key_up("ArrowUp")
        await page.screenshot(tmp_path / "webrtc.png")
    finally:
        await page.close()
