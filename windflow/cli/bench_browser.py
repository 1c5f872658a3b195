"""``windflow bench browser``: the bridge's page in real headless Chromium, measured.

On its own stack (one worker, the bridge, authenticating: the stack's development token),
with Chromium driven over the DevTools protocol (``windflow.infra.chromium``), sessions
of the built-in world model at 24 fps (the page's ``?fps=24&quality=fixed``):

1. ``bridge_overhead_ms_p50``: two sessions of the same spec stream side by side for
   ``--seconds``, one to a Python WebSocket client of the bridge (binary protobuf, the
   browser's protocol), one to the Python SDK on the gateway; each frame's arrival minus
   its ``timestamps.gateway_sent_us`` (one clock: one machine), p50 over the bridge minus
   p50 direct;
2. per transport (``ws``: JPEG frames on the WebSocket; ``webrtc``: RGB frames re-encoded
   as VP8 video), a fresh page and a fresh session ``--first-frame-reps`` times:
   ``*_first_frame_ms``, the median from the page starting the attach (``client.attach``,
   or ``client.attachWebRTC``: the page's ``wsAttachMs``/``rtcAttachMs``) to the first
   frame of that transport drawn on the canvas (``wsFirstFrameMs``/``rtcFirstFrameMs``);
   the session's creation is not in it (the WebRTC page attaches over the WebSocket first
   and then over WebRTC, as a person's page does when WebRTC is picked before Start);
3. on the last of those pages: ``*_fps``, frames drawn per second over ``--seconds``, its
   ratio to the session's fps (``*_fps_ratio``) and ``*_dropped`` (the session's
   ``dropped_total`` as the page sees it, the worker's and the bridge's, plus the page's
   own, over that window);
4. on the same page: ``*_key_to_pixel_ms_p50`` / ``_p90``: ``--presses`` key presses
   (CDP ``Input.dispatchKeyEvent``), up and down in turn, each held until its effect
   shows and then released for a while (0.3-0.7 s, so that presses fall anywhere in the
   frame clock): from the page's keydown (``performance.now()`` in a capturing listener
   the probe adds before the page's own) to the first frame drawn on ``#screen`` where the
   red agent's centroid (pixels with r > 150, g < 90, b < 90, read back after each
   ``putImageData``/``drawImage``) moved at least 1 px the key's way (it moves 2 px a
   frame). A press whose effect does not show in 2 s (a wall, a ball in the way) counts
   in ``*_key_misses``. Up and down, not left and right: the trained model sometimes takes
   a few frames to start the agent moving sideways (from the start position of seed 0,
   left moves it only from the 4th or 5th frame made with that action, whatever the
   transport), which would measure the model, not the path; it follows up and down on the
   first frame almost always;
5. ``--spectators`` pages (tabs of the same Chromium, each the page's spectate link of a
   WebSocket session one controller page plays, with keys): ``spectator_fps_min``, the
   lowest frames drawn per second among them over ``--seconds``, and its ratio to the
   session's fps.

Progress goes to stderr, one JSON line to stdout at the end. ``--json`` also records the
result under ``--out-dir`` (``bench/results/browser-<UTC>.json``) and saves a screenshot
of the page (900x600) to ``--screenshot`` (``docs/browser-page.png``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp

from services.worker.models.registry import DEFAULT_MODEL
from windflow.cli import bench_results
from windflow.common import telemetry
from windflow.infra import Stack, StackConfig, StackFailed
from windflow.infra.chromium import MISSING, Chromium, ChromiumNotFound, Page, find_chromium
from windflow.sdk import Client
from windflow.v1 import windflow_pb2 as pb

FPS = 24.0
KEY_TIMEOUT_S = 2.0
GOALS = {
    "fps_ratio_min": 0.95,
    "webrtc_first_frame_ms": 300.0,
    "ws_key_to_pixel_ms_p50": 60.0,
    "webrtc_key_to_pixel_ms_p50": 100.0,
    "bridge_overhead_ms_p50": 0.5,
}

PROBE_JS = r"""
(() => {
  // The bench's probe: key presses (capturing, before the page's own listeners) and the
  // red agent's centroid on #screen after each draw of a frame.
  const DIRS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  const probe = { draws: 0, cx: NaN, cy: NaN, red: 0, pending: null, moves: [], keys: 0 };
  window.__probe = probe;
  addEventListener("keydown", (event) => {
    if (!(event.code in DIRS) || event.repeat) return;
    probe.keys += 1;
    probe.pending = { code: event.code, at: performance.now(), cx: probe.cx, cy: probe.cy };
  }, true);
  function measure(ctx) {
    const canvas = ctx.canvas;
    if (!canvas || canvas.id !== "screen") return;
    const now = performance.now();
    const w = canvas.width, h = canvas.height;
    const data = ctx.getImageData(0, 0, w, h).data;
    let n = 0, sx = 0, sy = 0;
    for (let i = 0, p = 0; i < data.length; i += 4, p += 1) {
      if (data[i] > 150 && data[i + 1] < 90 && data[i + 2] < 90) {
        n += 1; sx += p % w; sy += (p / w) | 0;
      }
    }
    probe.draws += 1;
    probe.red = n;
    if (n === 0) return;
    probe.cx = (sx / n) * 64 / w;  // in the arena's pixels
    probe.cy = (sy / n) * 64 / h;
    const pending = probe.pending;
    if (!pending) return;
    if (Number.isNaN(pending.cx)) { pending.cx = probe.cx; pending.cy = probe.cy; return; }
    const [dx, dy] = DIRS[pending.code];
    if ((probe.cx - pending.cx) * dx + (probe.cy - pending.cy) * dy >= 1) {
      probe.moves.push(now - pending.at);
      probe.pending = null;
    }
  }
  const proto = CanvasRenderingContext2D.prototype;
  const put = proto.putImageData, draw = proto.drawImage;
  proto.putImageData = function (...args) {
    const r = put.apply(this, args); measure(this); return r;
  };
  proto.drawImage = function (...args) {
    const r = draw.apply(this, args); measure(this); return r;
  };
})();
"""

WINDOW_JS = """
(async (ms) => {
  const s = window.windflow, t0 = performance.now();
  const a = {
    drawn: s.framesDrawn, video: s.videoFrames, dropped: s.dropped, index: s.lastFrameIndex,
  };
  await new Promise((resolve) => setTimeout(resolve, ms));
  const seconds = (performance.now() - t0) / 1000;
  return {
    seconds,
    fps: (s.framesDrawn - a.drawn) / seconds,
    video_fps: (s.videoFrames - a.video) / seconds,
    received_fps: (s.lastFrameIndex - a.index) / seconds,
    dropped: s.dropped - a.dropped,
    transport: s.transport,
    session_fps: s.sessionFps,
  };
})(%d)
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "browser", help="the bridge's page in headless Chromium", description=__doc__
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seconds", type=float, default=5.0, help="each fps window")
    parser.add_argument("--spectators", type=int, default=8, help="spectator pages")
    parser.add_argument("--presses", type=int, default=15, help="key presses per transport")
    parser.add_argument("--first-frame-reps", type=int, default=3, help="fresh pages per transport")
    parser.add_argument(
        "--json", action="store_true", help="record the result and save the screenshot"
    )
    parser.add_argument(
        "--out-dir", default="bench/results", help="where --json records the result"
    )
    parser.add_argument(
        "--screenshot", default="docs/browser-page.png", help="where --json saves the page"
    )
    parser.add_argument(
        "--worker-arg", action="append", default=[], help="extra argument for the worker"
    )
    parser.set_defaults(func=_main)


def progress(text: str) -> None:
    print(f"[browser] {text}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


# ---- the bridge's overhead: a WebSocket client of the bridge vs the SDK on the gateway ----


async def _over_bridge(stack: Stack, session: pb.Session, seconds: float) -> list[float]:
    assert stack.bridge_url is not None
    url = stack.bridge_url.replace("http://", "ws://") + "v1/stream?token=" + stack.token
    out: list[float] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as socket:
        attach = pb.Attach(session_id=session.session_id)
        await socket.send_bytes(pb.ClientMessage(attach=attach).SerializeToString())
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            data = await socket.receive_bytes(timeout=20)
            received = telemetry.now_us()
            message = pb.ServerMessage.FromString(data)
            if message.HasField("frame") and message.frame.timestamps.gateway_sent_us:
                out.append((received - message.frame.timestamps.gateway_sent_us) / 1000)
    return out


async def _direct(client: Client, session: pb.Session, seconds: float) -> list[float]:
    out: list[float] = []
    live = await client.attach(session)
    end = time.monotonic() + seconds
    async for frame in live.frames():
        sent = frame.frame.timestamps.gateway_sent_us
        if sent:
            out.append((frame.received_us - sent) / 1000)
        if time.monotonic() >= end:
            break
    await live.aclose()
    return out


async def measure_bridge_overhead(stack: Stack, seconds: float) -> dict[str, Any]:
    spec: dict[str, Any] = {"format": "jpeg", "fps": FPS, "quality": "fixed"}
    async with Client(stack.gateway_address, token=stack.token) as client:
        a = await client.create_session(DEFAULT_MODEL, seed=1, **spec)
        b = await client.create_session(DEFAULT_MODEL, seed=1, **spec)
        bridged, direct = await asyncio.gather(
            _over_bridge(stack, a, seconds), _direct(client, b, seconds)
        )
        for session in (a, b):
            await client.close_session(session.session_id)
    bridged, direct = bridged[5:], direct[5:]  # (the first frames: the attach's warm-up)
    p_bridge, p_direct = statistics.median(bridged), statistics.median(direct)
    return {
        "bridge_overhead_ms_p50": round(p_bridge - p_direct, 3),
        "bridge_gateway_to_client_ms_p50": round(p_bridge, 3),
        "direct_gateway_to_client_ms_p50": round(p_direct, 3),
        "bridge_overhead_frames": min(len(bridged), len(direct)),
    }


# ---- the page ----


async def shoot(page: Page, width: int = 900, height: int = 600) -> bytes:
    """The page from its top to its figures (under the canvas), scaled to fit
    ``width`` x ``height``."""
    bottom = float(
        await page.evaluate("document.getElementById('figures').getBoundingClientRect().bottom")
    )
    bottom += 6
    scale = min(1.0, height / bottom)
    return await page.screenshot(clip=(0, 0, width / scale, bottom), scale=scale)


class Bench:
    def __init__(self, stack: Stack, browser: Chromium, args: argparse.Namespace) -> None:
        self.stack = stack
        self.browser = browser
        self.args = args
        assert stack.bridge_url is not None
        query = urllib.parse.urlencode(
            {"token": stack.token, "fps": f"{FPS:g}", "quality": "fixed"}
        )
        self.url = f"{stack.bridge_url}?{query}"
        self.sessions: list[str] = []
        self.screenshot: bytes | None = None

    async def close_sessions(self) -> None:
        async with Client(self.stack.gateway_address, token=self.stack.token) as client:
            for session_id in self.sessions:
                with contextlib.suppress(Exception):
                    await client.close_session(session_id)
        self.sessions.clear()

    async def start_page(self, page: Page, transport: str) -> None:
        """Load the page, pick the transport, create a session and play it."""
        await page.navigate(self.url)
        await page.wait_for("document.querySelectorAll('#model option').length > 0", "the models")
        await page.evaluate(
            f"document.getElementById('transport').value = '{transport}';"
            "document.getElementById('start').click()"
        )
        await page.wait_for("window.windflow.sessionId", "a session")
        self.sessions.append(await page.evaluate("window.windflow.sessionId"))

    async def first_frame(self, page: Page, transport: str) -> float:
        await self.start_page(page, transport)
        if transport == "ws":
            await page.wait_for(
                "window.windflow.wsFirstFrameMs > 0", "the first frame", timeout_s=20
            )
            got = await page.evaluate("window.windflow.wsFirstFrameMs - window.windflow.wsAttachMs")
        else:
            await page.wait_for(
                "window.windflow.rtcFirstFrameMs > 0 && window.windflow.transport === 'webrtc'",
                "the first video frame",
                timeout_s=20,
            )
            got = await page.evaluate(
                "window.windflow.rtcFirstFrameMs - window.windflow.rtcAttachMs"
            )
        return float(got)

    async def window(self, page: Page, seconds: float) -> dict[str, Any]:
        got: dict[str, Any] = await page.evaluate(
            WINDOW_JS % round(seconds * 1000), timeout_s=seconds + 30
        )
        return got

    async def key_to_pixel(self, page: Page, presses: int) -> tuple[list[float], int]:
        await page.wait_for("window.__probe.red > 0", "the red agent on the canvas")
        got: list[float] = []
        misses = 0
        for i in range(presses):
            code = "ArrowUp" if i % 2 == 0 else "ArrowDown"
            before = int(await page.evaluate("window.__probe.moves.length"))
            await page.key_down(code)
            try:
                await page.wait_for(
                    f"window.__probe.moves.length > {before}",
                    timeout_s=KEY_TIMEOUT_S,
                    every_s=0.01,
                )
                got.append(float(await page.evaluate("window.__probe.moves.at(-1)")))
            except TimeoutError:
                misses += 1
                await page.evaluate("window.__probe.pending = null")
            await page.key_up(code)
            await asyncio.sleep(random.uniform(0.3, 0.7))
        return got, misses

    async def transport(self, transport: str) -> dict[str, Any]:
        args = self.args
        page = await self.browser.new_page(init_script=PROBE_JS)
        firsts = []
        for rep in range(max(1, args.first_frame_reps)):
            if rep:
                await self.close_sessions()
            firsts.append(await self.first_frame(page, transport))
            progress(f"{transport}: first frame {firsts[-1]:.0f} ms")
        await page.wait_for("window.windflow.framesDrawn > 24", "frames drawn", timeout_s=20)
        fps = await self.window(page, args.seconds)
        session_fps = fps["session_fps"] or FPS
        progress(f"{transport}: {fps['fps']:.1f} fps drawn ({fps})")
        presses, misses = await self.key_to_pixel(page, args.presses)
        if transport == "ws" and self.screenshot is None:
            self.screenshot = await shoot(page)
        progress(f"{transport}: key to pixel {[round(ms) for ms in presses]} ms, {misses} missed")
        still = await page.evaluate("window.windflow.transport")
        await page.close()
        await self.close_sessions()
        return {
            f"{transport}_first_frame_ms": rounded(statistics.median(firsts)),
            f"{transport}_first_frame_ms_all": [round(ms, 1) for ms in firsts],
            f"{transport}_fps": round(fps["fps"], 2),
            f"{transport}_fps_ratio": round(fps["fps"] / session_fps, 3),
            f"{transport}_dropped": fps["dropped"],
            f"{transport}_key_to_pixel_ms_p50": rounded(pct(presses, 0.5)),
            f"{transport}_key_to_pixel_ms_p90": rounded(pct(presses, 0.9)),
            f"{transport}_key_to_pixel_n": len(presses),
            f"{transport}_key_misses": misses,
            f"{transport}_stayed": still == transport,
            "_session_fps": session_fps,
        }

    async def spectators(self) -> dict[str, Any]:
        args = self.args
        controller = await self.browser.new_page(init_script=PROBE_JS)
        await self.start_page(controller, "ws")
        await controller.wait_for("window.windflow.framesDrawn > 5", "the controller's frames")
        link = await controller.wait_for(
            "(h => h.includes('spectate=') && h)(document.getElementById('share').href)",
            "the spectate link",
        )
        pages = [await self.browser.new_page(link) for _ in range(args.spectators)]
        for page in pages:
            await page.wait_for(
                "window.windflow.framesDrawn > 5 && window.windflow.role === 'spectator'",
                "a spectator's frames",
                timeout_s=30,
            )
        progress(f"{len(pages)} spectator pages drawing")

        async def play() -> None:
            i = 0
            while True:
                code = "ArrowUp" if i % 2 == 0 else "ArrowDown"
                await controller.key_down(code)
                await asyncio.sleep(0.25)
                await controller.key_up(code)
                await asyncio.sleep(0.25)
                i += 1

        keys = asyncio.create_task(play())
        try:
            windows = await asyncio.gather(
                self.window(controller, args.seconds),
                *(self.window(page, args.seconds) for page in pages),
            )
        finally:
            keys.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keys
        mine, theirs = windows[0], windows[1:]
        session_fps = mine["session_fps"] or FPS
        progress(
            f"spectators: controller {mine['fps']:.1f} fps, "
            f"spectators {[round(w['fps'], 1) for w in theirs]} fps"
        )
        for page in pages:
            await page.close()
        await controller.close()
        await self.close_sessions()
        low = min((w["fps"] for w in theirs), default=0.0)
        return {
            "spectators": len(theirs),
            "spectator_kind": "chromium pages (tabs of one browser, the WebSocket page)",
            "spectator_fps_min": round(low, 2),
            "spectator_fps_ratio_min": round(low / session_fps, 3),
            "spectator_dropped_max": max((w["dropped"] for w in theirs), default=0),
            "spectators_controller_fps": round(mine["fps"], 2),
        }


def goals(result: dict[str, Any]) -> dict[str, bool]:
    def at_most(key: str, limit: float) -> bool:
        value = result.get(key)
        return value is not None and value <= limit

    ratio = GOALS["fps_ratio_min"]
    return {
        "ws_fps_ratio>=0.95": result.get("ws_fps_ratio", 0) >= ratio,
        "webrtc_fps_ratio>=0.95": result.get("webrtc_fps_ratio", 0) >= ratio,
        "webrtc_first_frame_ms<=300": at_most("webrtc_first_frame_ms", 300.0),
        "ws_key_to_pixel_ms_p50<=60": at_most("ws_key_to_pixel_ms_p50", 60.0),
        "webrtc_key_to_pixel_ms_p50<=100": at_most("webrtc_key_to_pixel_ms_p50", 100.0),
        "bridge_overhead_ms_p50<=0.5": at_most("bridge_overhead_ms_p50", 0.5),
        "spectator_fps_ratio_min>=0.95": result.get("spectator_fps_ratio_min", 0) >= ratio,
    }


async def measure(stack: Stack, args: argparse.Namespace) -> tuple[dict[str, Any], bytes | None]:
    progress(f"stack up; bridge {stack.bridge_url}")
    result: dict[str, Any] = {}
    progress(f"bridge overhead: a WebSocket client and a gRPC client, {args.seconds:g} s")
    result |= await measure_bridge_overhead(stack, args.seconds)
    progress(f"bridge overhead p50 {result['bridge_overhead_ms_p50']} ms")
    async with Chromium() as browser:
        version = await browser.send("Browser.getVersion")
        result["browser"] = version.get("product", "")
        progress(f"{result['browser']} up")
        bench = Bench(stack, browser, args)
        try:
            session_fps = []
            for transport in ("ws", "webrtc"):
                got = await bench.transport(transport)
                session_fps.append(got.pop("_session_fps"))
                result |= got
            result["session_fps"] = session_fps[0]
            if args.spectators > 0:
                result |= await bench.spectators()
        finally:
            await bench.close_sessions()
    return result, bench.screenshot


def _small_png(data: bytes, limit: int = 150_000) -> bytes:
    """The screenshot as is when under ``limit`` bytes, else as a 64-colour PNG."""
    if len(data) <= limit:
        return data
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=64)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


async def _run(args: argparse.Namespace, state_dir: Path) -> tuple[dict[str, Any], bytes | None]:
    config = StackConfig(
        state_dir=state_dir, workers=1, worker_args=bench_results.stack_worker_args(args)
    )
    async with Stack(config) as stack:
        return await measure(stack, args)


def _main(args: argparse.Namespace) -> int:
    if find_chromium() is None:
        print(f"bench browser: {MISSING}", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    machine_desc = bench_results.machine()
    revision = bench_results.revision()
    state_dir = Path(tempfile.mkdtemp(prefix="windflow-bench-browser-"))
    try:
        measured, screenshot = asyncio.run(_run(args, state_dir))
    except ChromiumNotFound as exc:
        print(f"bench browser: {exc}", file=sys.stderr)
        return 2
    except StackFailed as exc:
        print(f"bench browser: the stack failed: {exc}; logs in {state_dir}", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        **measured,
        "goals": goals(measured),
        "machine": machine_desc,
        "commit": revision["commit"] if revision else None,
        "local_changes": revision["local_changes"] if revision else None,
    }
    print(bench_results.key_value_table(measured), file=sys.stderr, flush=True)
    if args.json:
        if args.out_dir:
            fields = {"model": args.model, "worker_args": args.worker_arg, "result": result}
            path = bench_results.write(args.out_dir, "browser", started, machine_desc, fields)
            progress(f"results written to {path}")
        if args.screenshot and screenshot is not None:
            png = _small_png(screenshot)
            Path(args.screenshot).write_bytes(png)
            progress(f"screenshot ({len(png)} bytes) written to {args.screenshot}")
    print(json.dumps(result), flush=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    return 0
