"""A small driver of headless Chromium over the DevTools protocol (CDP), on aiohttp.

For the browser tests and ``windflow bench browser``: launch Chromium, open pages,
navigate, evaluate JavaScript, press keys, take screenshots::

    async with Chromium() as browser:          # ChromiumNotFound when there is none
        page = await browser.new_page(url)
        await page.wait_for("document.readyState === 'complete'")
        title = await page.evaluate("document.title")
        await page.key_down("ArrowLeft"); await page.key_up("ArrowLeft")
        png = await page.screenshot()

Chromium runs headless in its own process group with a throwaway profile, with every
background service off and a host resolver that resolves nothing but ``localhost`` and
``127.0.0.1`` (other addresses, literal ones included, do not resolve)
(``--host-resolver-rules``), so a page reaches loopback and nothing else; WebRTC works on
loopback (``--allow-loopback-in-peer-connection``, host candidates as addresses, not mDNS
names). ``aclose()`` kills the process group and removes the profile.

The binary: ``$WINDFLOW_CHROMIUM``, else ``chromium`` (or ``chromium-browser``,
``google-chrome``) on the ``PATH``, else ``/usr/bin/chromium``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

ENV = "WINDFLOW_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

FLAGS: tuple[str, ...] = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--remote-debugging-port=0",
    # WebRTC on loopback: 127.0.0.1 as a host candidate, as an address (not an mDNS name)
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns,Translate,MediaRouter,OptimizationHints",
    # nothing outside: no background traffic, and only localhost resolves
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
    "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
    # pages in background tabs keep their pace (several pages at once)
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--autoplay-policy=no-user-gesture-required",
    "--hide-scrollbars",
    "--mute-audio",
)
MISSING = f"no Chromium found: set ${ENV} to its path or install it (apt-get install -y chromium)"
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0

# key code -> (key, windowsVirtualKeyCode, text)
_KEYS: dict[str, tuple[str, int, str]] = {
    "ArrowLeft": ("ArrowLeft", 37, ""),
    "ArrowUp": ("ArrowUp", 38, ""),
    "ArrowRight": ("ArrowRight", 39, ""),
    "ArrowDown": ("ArrowDown", 40, ""),
    "Enter": ("Enter", 13, "\r"),
    "Escape": ("Escape", 27, ""),
    "Space": (" ", 32, " "),
    "Tab": ("Tab", 9, ""),
    "Backspace": ("Backspace", 8, ""),
    **{f"Key{c}": (c.lower(), ord(c), c.lower()) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
    **{f"Digit{d}": (d, ord(d), d) for d in "0123456789"},
}


class ChromiumNotFound(RuntimeError):
    """No Chromium binary: set ``$WINDFLOW_CHROMIUM`` or install one (``apt-get install
    chromium``)."""


class CdpError(RuntimeError):
    """A DevTools call answered with an error, or JavaScript threw."""


def find_chromium() -> str | None:
    """The Chromium binary to run, or None (see the module's docstring)."""
    named = os.environ.get(ENV)
    if named:
        return named if os.access(named, os.X_OK) else shutil.which(named)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def key_event(code: str) -> dict[str, Any]:
    """``Input.dispatchKeyEvent`` fields of a key by its ``KeyboardEvent.code``."""
    if code not in _KEYS:
        raise ValueError(f"unknown key code {code!r} (known: {', '.join(sorted(_KEYS))})")
    key, vk, text = _KEYS[code]
    return {"code": code, "key": key, "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk} | (
        {"text": text, "unmodifiedText": text} if text else {}
    )


class Chromium:
    """One headless Chromium and its DevTools connection (browser-wide, flattened
    sessions: each page is a ``Page`` over the same socket)."""

    def __init__(
        self,
        binary: str | None = None,
        *,
        extra_args: Sequence[str] = (),
        window: tuple[int, int] = (900, 600),
    ) -> None:
        self.binary = binary or find_chromium()
        if not self.binary:
            raise ChromiumNotFound(MISSING)
        self.extra_args = tuple(extra_args)
        self.window = window
        self.profile: Path | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.endpoint = ""
        self.stderr_tail: deque[str] = deque(maxlen=50)
        self._http: aiohttp.ClientSession | None = None
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[tuple[str, str | None, asyncio.Queue[dict[str, Any]]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Chromium:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Launch Chromium and connect to its DevTools socket."""
        self.profile = Path(tempfile.mkdtemp(prefix="windflow-chromium-"))
        width, height = self.window
        argv = [
            str(self.binary),
            *FLAGS,
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            *self.extra_args,
            "about:blank",
        ]
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group: killed as one
            )
            self.endpoint = await asyncio.wait_for(self._endpoint(), START_TIMEOUT_S)
            self._tasks.append(asyncio.create_task(self._drain_stderr(), name="chromium-stderr"))
            self._http = aiohttp.ClientSession()
            self._socket = await self._http.ws_connect(self.endpoint, max_msg_size=0)
            self._tasks.append(asyncio.create_task(self._read(), name="chromium-cdp"))
        except BaseException as exc:
            tail = "\n".join(self.stderr_tail)
            await self.aclose()
            if isinstance(exc, TimeoutError | OSError | aiohttp.ClientError):
                raise RuntimeError(f"chromium did not start ({exc!r}):\n{tail}") from exc
            raise

    async def _endpoint(self) -> str:
        assert self.process is not None and self.process.stderr is not None
        while True:
            raw = await self.process.stderr.readline()
            if not raw:
                code = await self.process.wait()
                tail = "\n".join(self.stderr_tail)
                raise RuntimeError(f"chromium exited ({code}) before it listened:\n{tail}")
            line = raw.decode(errors="replace").rstrip()
            self.stderr_tail.append(line)
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                return found.group(1)

    async def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while raw := await self.process.stderr.readline():
            self.stderr_tail.append(raw.decode(errors="replace").rstrip())

    async def _read(self) -> None:
        assert self._socket is not None
        try:
            async for message in self._socket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                if "id" in data:
                    waiter = self._waiting.pop(data["id"], None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(data)
                    continue
                for method, session_id, queue in self._listeners:
                    if data.get("method") == method and (
                        session_id is None or data.get("sessionId") == session_id
                    ):
                        queue.put_nowait(data.get("params", {}))
        finally:
            gone = CdpError("the DevTools connection closed")
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(gone)
            self._waiting.clear()

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session_id: str | None = None,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> dict[str, Any]:
        """One DevTools call; its ``result``. Raises ``CdpError``."""
        if self._socket is None or self._socket.closed:
            raise CdpError("not connected to Chromium")
        call_id = next(self._ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = waiter
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        await self._socket.send_str(json.dumps(message))
        try:
            reply = await asyncio.wait_for(waiter, timeout_s)
        finally:
            self._waiting.pop(call_id, None)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error'].get('message', reply['error'])}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def listen(self, method: str, session_id: str | None = None) -> asyncio.Queue[dict[str, Any]]:
        """A queue of the params of every ``method`` event (of one page's session)."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._listeners.append((method, session_id, queue))
        return queue

    async def new_page(self, url: str = "about:blank", *, init_script: str = "") -> Page:
        """A new tab, attached; ``init_script`` runs in each of its documents before the
        page's own scripts; then it navigates to ``url`` (and waits for the load)."""
        created = await self.send("Target.createTarget", {"url": "about:blank"})
        target_id = created["targetId"]
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target_id, "flatten": True}
        )
        page = Page(self, target_id, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        width, height = self.window
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        # every page acts as the focused one (key events, no blur when another tab opens)
        await page.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
        if init_script:
            await page.send("Page.addScriptToEvaluateOnNewDocument", {"source": init_script})
        if url != "about:blank":
            await page.navigate(url)
        return page

    async def aclose(self) -> None:
        """Close the connection, kill Chromium's process group, remove the profile."""
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send("Browser.close", timeout_s=2.0), 3.0)
            await self._socket.close()
        if self._http is not None:
            await self._http.close()
        process = self.process
        if process is not None:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 5.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
            # helpers left in the group (zygotes, utilities) go too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._socket = self._http = self.process = None
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None


class Page:
    """One tab of a ``Chromium``."""

    def __init__(self, browser: Chromium, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id

    async def send(
        self, method: str, params: dict[str, Any] | None = None, timeout_s: float = CALL_TIMEOUT_S
    ) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session_id, timeout_s)

    async def navigate(self, url: str, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        """Go to ``url`` and wait for its load event."""
        loaded = self.browser.listen("Page.loadEventFired", self.session_id)
        try:
            reply = await self.send("Page.navigate", {"url": url})
            if reply.get("errorText"):
                raise CdpError(f"navigating to {url}: {reply['errorText']}")
            await asyncio.wait_for(loaded.get(), timeout_s)
        finally:
            self.browser._listeners = [
                entry for entry in self.browser._listeners if entry[2] is not loaded
            ]

    async def evaluate(
        self, expression: str, *, await_promise: bool = True, timeout_s: float = CALL_TIMEOUT_S
    ) -> Any:
        """The value of a JavaScript expression (a promise's once it settles), as JSON."""
        reply = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": await_promise, "returnByValue": True},
            timeout_s=timeout_s,
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            thrown = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"{expression[:200]}: {thrown}")
        return reply.get("result", {}).get("value")

    async def wait_for(
        self, expression: str, what: str = "", *, timeout_s: float = 15.0, every_s: float = 0.05
    ) -> Any:
        """Poll ``expression`` until it is truthy; its value. ``TimeoutError`` names
        ``what`` (or the expression)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            with contextlib.suppress(CdpError):
                value = await self.evaluate(expression)
                if value:
                    return value
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout_s} s waiting for {what or expression}"
                )
            await asyncio.sleep(every_s)

    async def key_down(self, code: str) -> None:
        """Press a key (by ``KeyboardEvent.code``: ``ArrowLeft``, ``KeyA`` ...)."""
        fields = key_event(code)
        kind = "keyDown" if "text" in fields else "rawKeyDown"
        await self.send("Input.dispatchKeyEvent", {"type": kind, **fields})

    async def key_up(self, code: str) -> None:
        fields = key_event(code)
        fields.pop("text", None)
        fields.pop("unmodifiedText", None)
        await self.send("Input.dispatchKeyEvent", {"type": "keyUp", **fields})

    async def press(self, code: str, hold_s: float = 0.05) -> None:
        await self.key_down(code)
        await asyncio.sleep(hold_s)
        await self.key_up(code)

    async def screenshot(
        self,
        path: str | Path | None = None,
        *,
        clip: tuple[float, float, float, float] | None = None,
        scale: float = 1.0,
    ) -> bytes:
        """The page as PNG (written to ``path`` too when given): the viewport, or ``clip``
        (x, y, width, height in CSS pixels, beyond the viewport too) scaled by ``scale``."""
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            x, y, width, height = clip
            params["clip"] = {"x": x, "y": y, "width": width, "height": height, "scale": scale}
            params["captureBeyondViewport"] = True
        reply = await self.send("Page.captureScreenshot", params)
        data = base64.b64decode(reply["data"])
        if path is not None:
            await asyncio.to_thread(Path(path).write_bytes, data)
        return data

    async def close(self) -> None:
        with contextlib.suppress(CdpError, TimeoutError):
            await self.browser.send("Target.closeTarget", {"targetId": self.target_id})
