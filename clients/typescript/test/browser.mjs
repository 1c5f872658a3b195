// The bridge's page in a real browser (headless Chromium over the DevTools protocol),
// against a live stack: play with the keyboard, the figures, fork, rewind, spectate,
// handover, WebRTC. Optional (not in `make test`): needs Chromium.
//
//   node test/browser.mjs            # CHROMIUM=/path/to/chromium to choose the browser
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { WebSocket } from "ws";
import { startStack } from "./stack.mjs";

const CANDIDATES = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"];

function findChromium() {
  if (process.env.CHROMIUM) return process.env.CHROMIUM;
  for (const dir of (process.env.PATH ?? "").split(":")) {
    for (const name of CANDIDATES) if (existsSync(join(dir, name))) return join(dir, name);
  }
  return undefined;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Chromium, headless, with its DevTools socket. */
async function launch(binary, extra = []) {
  const profile = mkdtempSync(join(tmpdir(), "windflow-chromium-"));
  const child = spawn(
    binary,
    [
      "--headless=new",
      "--no-sandbox",
      "--disable-gpu",
      "--no-first-run",
      "--remote-debugging-port=0",
      `--user-data-dir=${profile}`,
      // host candidates as addresses, not mDNS names (the bridge runs on this machine)
      "--disable-features=WebRtcHideLocalIpsWithMdns",
      ...extra,
      "about:blank",
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  const endpoint = await new Promise((resolve, reject) => {
    let err = "";
    const timer = setTimeout(() => reject(new Error(`chromium did not start:\n${err}`)), 30_000);
    child.stderr.on("data", (chunk) => {
      err += chunk;
      const found = /DevTools listening on (ws:\/\/\S+)/.exec(err);
      if (found) {
        clearTimeout(timer);
        resolve(found[1]);
      }
    });
    child.on("exit", (code) => reject(new Error(`chromium exited ${code}:\n${err}`)));
  });
  const socket = new WebSocket(endpoint);
  await new Promise((resolve, reject) => {
    socket.once("open", resolve);
    socket.once("error", reject);
  });
  let next = 0;
  const waiting = new Map();
  socket.on("message", (data) => {
    const message = JSON.parse(String(data));
    const pending = waiting.get(message.id);
    if (!pending) return;
    waiting.delete(message.id);
    if (message.error) pending.reject(new Error(`${pending.method}: ${message.error.message}`));
    else pending.resolve(message.result);
  });
  const send = (method, params = {}, sessionId = undefined) =>
    new Promise((resolve, reject) => {
      const id = ++next;
      waiting.set(id, { resolve, reject, method });
      socket.send(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }));
    });
  const close = async () => {
    socket.close();
    child.kill("SIGTERM");
    await new Promise((resolve) => (child.exitCode !== null ? resolve() : child.once("exit", resolve)));
    rmSync(profile, { recursive: true, force: true });
  };
  return { send, close };
}

/** One tab: evaluate, wait for a condition, press keys. */
async function open(browser, url) {
  const { targetId } = await browser.send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await browser.send("Target.attachToTarget", { targetId, flatten: true });
  const send = (method, params) => browser.send(method, params, sessionId);
  await send("Page.enable");
  await send("Page.navigate", { url });
  const evaluate = async (expression) => {
    const reply = await send("Runtime.evaluate", { expression, awaitPromise: true, returnByValue: true });
    if (reply.exceptionDetails) throw new Error(`${expression}: ${reply.exceptionDetails.text} ${reply.exceptionDetails.exception?.description ?? ""}`);
    return reply.result.value;
  };
  const until = async (expression, what, timeoutMs = 15_000) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      let value;
      try {
        value = await evaluate(expression);
      } catch {
        value = undefined;
      }
      if (value) return value;
      if (Date.now() > deadline) {
        const state = await evaluate("JSON.stringify(window.windflow)").catch(() => "?");
        throw new Error(`timed out waiting for ${what} (${expression}); page state ${state}`);
      }
      await sleep(100);
    }
  };
  const KEYS = { ArrowRight: 39, ArrowLeft: 37, ArrowUp: 38, ArrowDown: 40 };
  const key = (type, code) =>
    send("Input.dispatchKeyEvent", { type, code, key: code, windowsVirtualKeyCode: KEYS[code] });
  return { evaluate, until, key, close: () => browser.send("Target.closeTarget", { targetId }) };
}

const state = (tab) => tab.evaluate("window.windflow");

async function main() {
  const binary = findChromium();
  if (!binary) {
    console.log("no Chromium found (set CHROMIUM): skipping the browser test");
    return 0;
  }
  const started = Date.now();
  let stack;
  let url = process.env.WINDFLOW_BRIDGE_URL;
  let token = process.env.WINDFLOW_TOKEN ?? "";
  if (!url) {
    stack = startStack();
    ({ url, token } = await stack.ready);
  }
  const browser = await launch(binary);
  let failed = true;
  try {
    const page = `${url}?token=${encodeURIComponent(token)}`;
    const a = await open(browser, page);
    await a.until("document.querySelectorAll('#model option').length > 0", "the models");
    await a.evaluate("document.getElementById('start').click()");
    await a.until("window.windflow.framesDrawn > 10", "frames drawn");
    // the keyboard: a held key is one control, its release another; each measured
    await a.key("keyDown", "ArrowRight");
    await sleep(400);
    await a.key("keyUp", "ArrowRight");
    await a.until("window.windflow.c2fMs.length >= 2", "two control-to-frame figures");
    let s = await state(a);
    assert.ok(s.fps > 5, `fps ${s.fps}`);
    assert.ok(s.c2fMs.every((ms) => ms > 0 && ms < 2000), `c2f ${s.c2fMs}`);
    for (const id of ["fps", "latency", "c2f", "frame"]) {
      const text = await a.evaluate(`document.getElementById('${id}').textContent`);
      assert.ok(text && text !== "–", `#${id} shows ${text}`);
    }
    console.log(`ok - play: ${s.framesDrawn} frames drawn, ${s.fps} fps, c2f ${s.c2fMs.map((m) => m.toFixed(0))} ms, latency ${s.latencyMs.toFixed(1)} ms`);

    // rewind this session to frame 5: the head goes back
    const first = s.sessionId;
    await a.evaluate("(() => { const t = document.getElementById('timeline'); t.value = '5'; t.dispatchEvent(new Event('input')); document.getElementById('rewind').click(); })()");
    await a.until("window.windflow.lastFrameIndex >= 5 && window.windflow.lastFrameIndex < 15 && /rewound|REWOUND/.test(window.windflow.status)", "the rewind");
    console.log("ok - rewind");
    // fork at frame 3: the page switches to the new session
    await sleep(300);
    await a.evaluate("(() => { const t = document.getElementById('timeline'); t.value = '3'; t.dispatchEvent(new Event('input')); document.getElementById('fork').click(); })()");
    await a.until(`window.windflow.sessionId && window.windflow.sessionId !== '${first}' && window.windflow.lastFrameIndex >= 3`, "the fork");
    s = await state(a);
    console.log(`ok - fork: ${first} -> ${s.sessionId}`);

    // a spectator in a second tab, from the share link; then the controller hands over
    const link = await a.evaluate("document.getElementById('share').href");
    assert.match(link, /spectate=/);
    const b = await open(browser, link);
    await b.until("window.windflow.framesDrawn > 5", "the spectator's frames");
    assert.equal(await b.evaluate("document.getElementById('role').textContent"), "spectating");
    const viewer = await b.until("(t => t && t !== '–' && t)(document.getElementById('viewer-id').textContent)", "the spectator's viewer id");
    await a.evaluate(`(() => { document.getElementById('viewer').value = '${viewer}'; document.getElementById('handover').click(); })()`);
    await b.until("window.windflow.role === 'controller'", "the handover");
    await a.until("window.windflow.role === 'spectator'", "the old controller spectating");
    const before = (await state(b)).c2fMs.length;
    await b.key("keyDown", "ArrowLeft");
    await b.until(`window.windflow.c2fMs.length > ${before}`, "a control from the new controller");
    await b.key("keyUp", "ArrowLeft");
    console.log(`ok - spectate and handover (viewer ${viewer})`);
    await b.close();
    await a.close();

    // WebRTC: a new session, switched to WebRTC: video frames drawn, controls on the data channel
    const c = await open(browser, page);
    await c.until("document.querySelectorAll('#model option').length > 0", "the models");
    await c.evaluate("document.getElementById('start').click()");
    await c.until("window.windflow.framesDrawn > 5", "frames drawn");
    await c.evaluate("(() => { const t = document.getElementById('transport'); t.value = 'webrtc'; t.dispatchEvent(new Event('change')); })()");
    await c.until("window.windflow.transport === 'webrtc' && window.windflow.videoFrames > 10", "WebRTC video frames", 20_000);
    const c2f = (await state(c)).c2fMs.length;
    await c.key("keyDown", "ArrowUp");
    await c.until(`window.windflow.c2fMs.length > ${c2f}`, "control-to-frame over WebRTC");
    await c.key("keyUp", "ArrowUp");
    s = await state(c);
    console.log(`ok - webrtc: ${s.videoFrames} video frames, ${s.fps} fps, c2f ${s.c2fMs.map((m) => m.toFixed(0))} ms, latency ${s.latencyMs.toFixed(1)} ms`);
    // and back to the WebSocket
    await c.evaluate("(() => { const t = document.getElementById('transport'); t.value = 'ws'; t.dispatchEvent(new Event('change')); })()");
    const drawn = (await state(c)).framesDrawn;
    await c.until(`window.windflow.transport === 'ws' && window.windflow.framesDrawn > ${drawn + 10}`, "WebSocket frames again");
    console.log("ok - back to the WebSocket");
    await c.close();

    // WebRTC that cannot connect (no UDP at all): back to the WebSocket, frames go on
    const blocked = await launch(binary, ["--webrtc-ip-handling-policy=disable_non_proxied_udp"]);
    try {
      const d = await open(blocked, page);
      await d.until("document.querySelectorAll('#model option').length > 0", "the models");
      await d.evaluate("document.getElementById('start').click()");
      await d.until("window.windflow.framesDrawn > 5", "frames drawn");
      await d.evaluate("(() => { const t = document.getElementById('transport'); t.value = 'webrtc'; t.dispatchEvent(new Event('change')); })()");
      await d.until("/WebRTC/.test(window.windflow.status)", "the WebRTC attempt");
      await d.until("/WebSocket/.test(window.windflow.status)", "the fallback", 20_000);
      const at = (await state(d)).lastFrameIndex;
      await d.until(`window.windflow.transport === 'ws' && window.windflow.lastFrameIndex > ${at + 10}`, "WebSocket frames after the fallback");
      s = await state(d);
      assert.equal(s.videoFrames, 0);
      console.log(`ok - webrtc fallback: ${s.status}`);
    } finally {
      await blocked.close();
    }
    failed = false;
  } finally {
    await browser.close();
    if (stack) await stack.stop(failed);
  }
  console.log(`browser test passed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return 0;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    console.error(error instanceof Error ? error.stack : error);
    process.exit(1);
  },
);
