// The bridge's page (services/bridge/static/index.html loads this, built to static/app.js):
// pick a model, create a session, play it with the keyboard over the SDK (binary protobuf
// on a WebSocket, or WebRTC), with live figures, a timeline (fork, rewind), spectating
// (?spectate=SESSION_ID) and handover. The token comes from ?token= in the page's address.
import {
  FrameFormat,
  QualityPolicy_Mode,
  SessionEvent_Kind,
  WindflowError,
  connect,
  type ControlSpec,
  type Frame,
  type InputFrameSpec,
  type RoleName,
  type Session,
  type SessionEvent,
  type StreamError,
  type StreamSession,
  type WebRTCSession,
} from "../index";

type Transport = "ws" | "webrtc";

/** What automated browser tests read (window.windflow). */
interface PageState {
  framesDrawn: number;
  lastFrameIndex: number;
  fps: number;
  /** Each measured control-to-frame, ms (key press -> the first frame showing it). */
  c2fMs: number[];
  transport: Transport;
  videoFrames: number;
  sessionId: string;
  role: RoleName | "";
  latencyMs: number;
  dropped: number;
  status: string;
  /** The session's output fps as its stream announced it (0: not known yet). */
  sessionFps: number;
  /** performance.now() when the newest WebSocket attach started, and when that stream's
   * first frame was drawn (0: not yet). */
  wsAttachMs: number;
  wsFirstFrameMs: number;
  /** The same for the newest WebRTC attach and its first video frame drawn. */
  rtcAttachMs: number;
  rtcFirstFrameMs: number;
}

declare global {
  interface Window {
    windflow: PageState;
  }
}

const state: PageState = {
  framesDrawn: 0,
  lastFrameIndex: -1,
  fps: 0,
  c2fMs: [],
  transport: "ws",
  videoFrames: 0,
  sessionId: "",
  role: "",
  latencyMs: 0,
  dropped: 0,
  status: "",
  sessionFps: 0,
  wsAttachMs: 0,
  wsFirstFrameMs: 0,
  rtcAttachMs: 0,
  rtcFirstFrameMs: 0,
};
window.windflow = state;

const KEYS: Record<string, string> = {
  ArrowUp: "up",
  KeyW: "up",
  ArrowDown: "down",
  KeyS: "down",
  ArrowLeft: "left",
  KeyA: "left",
  ArrowRight: "right",
  KeyD: "right",
};
/** A video frame must come this soon after WebRTC connects, else back to the WebSocket. */
const VIDEO_TIMEOUT_MS = 5_000;
const C2F_KEPT = 1_000;

function $<T extends HTMLElement>(id: string): T {
  const element = document.getElementById(id);
  if (!element) throw new Error(`the page has no #${id}`);
  return element as T;
}

const params = new URLSearchParams(location.search);
const token = params.get("token") ?? "";
const spectate = params.get("spectate");
const formatParam = params.get("format");
/** ?fps= and ?quality=fixed|adaptive: the spec of the sessions it creates (default: the
 * model's fps, adaptive). */
const fpsParam = Number(params.get("fps") ?? 0);
const qualityParam = params.get("quality");
/** Selected first where it is served: the keyboard-driven built-in world model. */
const DEFAULT_MODEL = "windflow-world";
const client = connect({ url: new URL("./", location.href).toString(), token });

const ui = {
  model: $<HTMLSelectElement>("model"),
  start: $<HTMLButtonElement>("start"),
  transport: $<HTMLSelectElement>("transport"),
  role: $("role"),
  screen: $<HTMLCanvasElement>("screen"),
  video: $<HTMLVideoElement>("video"),
  fps: $("fps"),
  latency: $("latency"),
  c2f: $("c2f"),
  dropped: $("dropped"),
  frame: $("frame"),
  timeline: $<HTMLInputElement>("timeline"),
  at: $("at"),
  fork: $<HTMLButtonElement>("fork"),
  rewind: $<HTMLButtonElement>("rewind"),
  share: $<HTMLAnchorElement>("share"),
  viewerId: $("viewer-id"),
  viewer: $<HTMLInputElement>("viewer"),
  handover: $<HTMLButtonElement>("handover"),
  status: $("status"),
  promptRow: $("prompt-row"),
  prompt: $<HTMLInputElement>("prompt"),
  sendPrompt: $<HTMLButtonElement>("send-prompt"),
  framesRow: $("frames-row"),
  camera: $<HTMLButtonElement>("camera"),
  inputStatus: $("input-status"),
};
const ctx = ui.screen.getContext("2d")!;

// ---- the session and its streams ----

let info: Session | undefined;
let actions: string[] = [];
let ws: StreamSession | undefined;
let rtc: WebRTCSession | undefined;
/** A WebRTC attach is under way (the WebSocket stream it takes over may end meanwhile). */
let rtcStarting = false;
/** What the canvas shows: WebSocket frames, or the video once its first frame came. */
let showing: Transport = "ws";
let role: RoleName = "controller";
let viewerId = "";
/** Bumped at each switch of session: streams of an older one are ignored. */
let generation = 0;

function say(text: string): void {
  state.status = text;
  ui.status.textContent = text;
}

function failed(what: string, error: unknown): void {
  const text = error instanceof WindflowError ? `${error.codeName}: ${error.detail}` : String(error);
  say(`${what}: ${text}`);
}

/** The stream controls go on: the data channel once WebRTC is up, else the WebSocket. */
function active(): StreamSession | WebRTCSession | undefined {
  if (rtc && !rtc.done && showing === "webrtc") return rtc;
  if (ws && !ws.done) return ws;
  return rtc && !rtc.done ? rtc : undefined;
}

function setRole(now: RoleName): void {
  role = now;
  state.role = now;
  ui.role.textContent = now === "spectator" ? "spectating" : "controller";
  ui.handover.disabled = false;
  ui.rewind.disabled = now === "spectator";
  if (now === "spectator") held.clear();
}

function onEvent(event: SessionEvent): void {
  switch (event.kind) {
    case SessionEvent_Kind.ATTACHED:
      if (event.viewerId) {
        viewerId = event.viewerId;
        ui.viewerId.textContent = viewerId;
      }
      break;
    case SessionEvent_Kind.ROLE_CHANGED:
    case SessionEvent_Kind.REWOUND:
    case SessionEvent_Kind.CLOSED:
    case SessionEvent_Kind.RECOVERED:
    case SessionEvent_Kind.MIGRATED:
    case SessionEvent_Kind.BUDGET_WARNING:
    case SessionEvent_Kind.BUDGET_EXHAUSTED:
      say(`${SessionEvent_Kind[event.kind]}: ${event.message}`);
      break;
  }
  const stream = active();
  if (stream) setRole(stream.role);
  if (event.kind === SessionEvent_Kind.REWOUND) {
    state.lastFrameIndex = Number(event.frameIndex) - 1;
    pinned = false;
  }
}

function onError(error: StreamError): void {
  say(`${error.codeName}: ${error.message}`);
}

async function play(session: Session, as: RoleName, resumeFrom?: number): Promise<void> {
  const mine = ++generation;
  stopStreams();
  info = session;
  actions = session.model?.actions ?? [];
  showControls(session.model?.controls);
  state.sessionId = session.sessionId;
  state.lastFrameIndex = -1;
  pinned = false;
  sentAction = -1;
  setRole(as);
  share(session.sessionId);
  say(`attaching to ${session.sessionId} as ${as === "spectator" ? "a spectator" : "the controller"}`);
  try {
    wsStarted();
    const stream = await client.attach(session.sessionId, {
      role: as,
      ...(resumeFrom !== undefined ? { resumeFrom } : {}),
      onEvent,
      onError,
    });
    if (mine !== generation) {
      stream.close();
      return;
    }
    ws = stream;
    setRole(stream.role);
    say(`session ${session.sessionId}${as === "spectator" ? " (spectating)" : ""}`);
    void pumpWebSocket(stream, mine);
    if (ui.transport.value === "webrtc") void startWebRTC(mine);
  } catch (error) {
    failed("attach", error);
  }
}

function stopStreams(): void {
  ws?.close();
  ws = undefined;
  rtc?.close();
  rtc = undefined;
  ui.video.srcObject = null;
  showing = "ws";
  state.transport = "ws";
}

async function pumpWebSocket(stream: StreamSession, mine: number): Promise<void> {
  try {
    for await (const frame of stream.frames()) {
      if (mine !== generation) return;
      arrived(frame, stream.droppedLocally);
      if (showing === "ws") draw(frame);
      if (feeding && !rtc) void feedFrame(frame.inputDroppedTotal);
    }
    if (mine === generation && ws === stream && !rtc && !rtcStarting) say("the stream ended");
  } catch (error) {
    if (mine === generation && ws === stream) failed("stream", error);
  }
}

// ---- WebRTC: video track + data channel, WebSocket until its first video frame ----

async function startWebRTC(mine: number): Promise<void> {
  if (!info || rtc || rtcStarting) return;
  const from = ws && !ws.done ? ws.nextIndex : state.lastFrameIndex + 1;
  say("WebRTC: connecting ...");
  let session: WebRTCSession;
  rtcStarting = true;
  state.rtcAttachMs = performance.now();
  state.rtcFirstFrameMs = 0;
  try {
    session = await client.attachWebRTC(info.sessionId, {
      role,
      ...(role === "controller" ? { resumeFrom: Math.max(0, from) } : {}),
      onEvent,
      onError,
      onClose: (error) => {
        if (rtc === session) void fallBack(mine, error ? `WebRTC ended: ${error.message}` : "");
      },
    });
  } catch (error) {
    if (mine === generation) {
      failed("WebRTC failed, staying on the WebSocket", error);
      ui.transport.value = "ws";
      if (!ws || ws.done) void reattach(mine);
    }
    return;
  } finally {
    rtcStarting = false;
  }
  if (mine !== generation || ui.transport.value !== "webrtc") {
    session.close();
    return;
  }
  rtc = session;
  ui.video.srcObject = session.stream;
  void ui.video.play().catch(() => {}); // muted: allowed without a gesture
  watchVideo(session, mine);
  void pumpFrameInfo(session, mine);
  setTimeout(() => {
    if (rtc === session && showing !== "webrtc") {
      void fallBack(mine, `WebRTC: no video frame within ${VIDEO_TIMEOUT_MS / 1000} s`);
    }
  }, VIDEO_TIMEOUT_MS);
}

/** The frames' messages on the data channel: the figures (the picture is the video's). */
async function pumpFrameInfo(session: WebRTCSession, mine: number): Promise<void> {
  try {
    for await (const frame of session.frames()) {
      if (mine !== generation || rtc !== session) return;
      arrived(frame, 0);
      if (feeding) void feedFrame(frame.inputDroppedTotal);
    }
  } catch {
    /* onClose falls back */
  }
}

function watchVideo(session: WebRTCSession, mine: number): void {
  const video = ui.video as HTMLVideoElement & {
    requestVideoFrameCallback?: (callback: () => void) => number;
  };
  let lastTime = -1;
  const next = (): void => {
    if (mine !== generation || rtc !== session) return;
    if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(frame);
    else requestAnimationFrame(frame);
  };
  const frame = (): void => {
    if (mine !== generation || rtc !== session) return;
    if (video.videoWidth > 0 && video.currentTime !== lastTime) {
      lastTime = video.currentTime;
      if (showing !== "webrtc") firstVideoFrame(session);
      fit(video.videoWidth, video.videoHeight);
      ctx.drawImage(video, 0, 0, ui.screen.width, ui.screen.height);
      state.videoFrames += 1;
      state.framesDrawn += 1;
      if (state.rtcFirstFrameMs === 0) state.rtcFirstFrameMs = performance.now();
    }
    next();
  };
  next();
}

function firstVideoFrame(session: WebRTCSession): void {
  showing = "webrtc";
  state.transport = "webrtc";
  setRole(session.role);
  say(`session ${info?.sessionId ?? ""} over WebRTC`);
  // the WebSocket's part is over (a controller's was taken over by the WebRTC attach)
  ws?.close();
  ws = undefined;
}

/** Back to the WebSocket (ICE failed, no video, the user asked): attach again there. */
async function fallBack(mine: number, why: string): Promise<void> {
  const was = rtc;
  rtc = undefined;
  was?.close();
  ui.video.srcObject = null;
  showing = "ws";
  state.transport = "ws";
  ui.transport.value = "ws";
  if (mine !== generation) return;
  if (why) say(`${why}; back on the WebSocket`);
  if (!ws || ws.done) await reattach(mine);
}

async function reattach(mine: number): Promise<void> {
  if (!info || mine !== generation) return;
  const from = state.lastFrameIndex + 1;
  try {
    wsStarted();
    const stream = await client.attach(info.sessionId, {
      role,
      ...(role === "controller" ? { resumeFrom: Math.max(0, from) } : {}),
      onEvent,
      onError,
    });
    if (mine !== generation) {
      stream.close();
      return;
    }
    ws = stream;
    void pumpWebSocket(stream, mine);
  } catch (error) {
    failed("attach", error);
  }
}

// ---- frames: drawing and figures ----

const arrivals: number[] = [];
let latencyAvg = 0;
/** clientTimeUs of each control sent -> performance.now() at its key press. */
const pressed = new Map<bigint, number>();

function arrived(frame: Frame, droppedHere: number): void {
  const now = performance.now();
  arrivals.push(now);
  while (arrivals.length > 0 && arrivals[0]! < now - 1000) arrivals.shift();
  state.fps = arrivals.length;
  state.lastFrameIndex = Number(frame.frameIndex);
  const ts = frame.timestamps;
  const from = ts ? Number(ts.dueUs || ts.modelStartUs) : 0;
  if (from > 0) {
    const ms = ((performance.timeOrigin + now) * 1000 - from) / 1000;
    latencyAvg = latencyAvg === 0 ? ms : latencyAvg * 0.9 + ms * 0.1;
    state.latencyMs = latencyAvg;
  }
  const sent = frame.controlClientTimeUs;
  if (sent !== 0n) {
    const at = pressed.get(sent);
    if (at !== undefined) {
      pressed.delete(sent);
      state.c2fMs.push(now - at);
      if (state.c2fMs.length > C2F_KEPT) state.c2fMs.shift();
    }
  }
  state.dropped = Number(frame.droppedTotal) + droppedHere;
  const stream = active();
  if (stream && stream.fps > 0) state.sessionFps = stream.fps;
  figures();
}

let figuresAt = 0;
function figures(): void {
  const now = performance.now();
  if (now - figuresAt < 100) return; // (ten times a second is plenty to read)
  figuresAt = now;
  ui.fps.textContent = state.fps.toFixed(0);
  ui.latency.textContent = state.latencyMs.toFixed(1);
  const c2f = state.c2fMs;
  ui.c2f.textContent = c2f.length
    ? `${c2f[c2f.length - 1]!.toFixed(0)} (median ${median(c2f).toFixed(0)})`
    : "–";
  ui.dropped.textContent = String(state.dropped);
  ui.frame.textContent = String(state.lastFrameIndex);
  timeline();
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? 0;
}

function fit(width: number, height: number): void {
  if (ui.screen.width !== width) ui.screen.width = width;
  if (ui.screen.height !== height) ui.screen.height = height;
}

function wsStarted(): void {
  state.wsAttachMs = performance.now();
  state.wsFirstFrameMs = 0;
}

function drewWebSocketFrame(): void {
  state.framesDrawn += 1;
  if (state.wsFirstFrameMs === 0) state.wsFirstFrameMs = performance.now();
}

let newestJpeg: Frame | undefined;
let decoding = false;

function draw(frame: Frame): void {
  if (frame.format === FrameFormat.RGB) {
    const { width, height, data } = frame;
    fit(width, height);
    const image = ctx.createImageData(width, height);
    const out = image.data;
    for (let i = 0, j = 0; i + 2 < data.length && j < out.length; i += 3, j += 4) {
      out[j] = data[i]!;
      out[j + 1] = data[i + 1]!;
      out[j + 2] = data[i + 2]!;
      out[j + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    drewWebSocketFrame();
    return;
  }
  newestJpeg = frame; // JPEG (or unspecified): decoded off the main path, newest only
  if (!decoding) void decode();
}

async function decode(): Promise<void> {
  decoding = true;
  try {
    while (newestJpeg) {
      const frame = newestJpeg;
      newestJpeg = undefined;
      const bitmap = await createImageBitmap(
        new Blob([frame.data as Uint8Array<ArrayBuffer>], { type: "image/jpeg" }),
      );
      if (showing === "ws") {
        fit(bitmap.width, bitmap.height);
        ctx.drawImage(bitmap, 0, 0);
        drewWebSocketFrame();
      }
      bitmap.close();
    }
  } catch (error) {
    failed("decode", error);
  } finally {
    decoding = false;
  }
}

// ---- the keyboard: key-down/key-up state, not the browser's key repeat ----

const held = new Set<string>();
let sentAction = -1;

function wanted(): number {
  const keys = [...held];
  const name = keys.length ? KEYS[keys[keys.length - 1]!] : undefined;
  const index = name ? actions.indexOf(name) : 0;
  return index < 0 ? 0 : index;
}

function steer(at: number): void {
  const stream = active();
  if (!stream || role !== "controller") return;
  const action = wanted();
  if (action === sentAction) return;
  try {
    const control = stream.send({ action });
    sentAction = action;
    pressed.set(control.clientTimeUs, at);
    if (pressed.size > 256) pressed.delete(pressed.keys().next().value!);
  } catch (error) {
    failed("control", error);
  }
}

document.addEventListener("keydown", (event) => {
  if (!(event.code in KEYS) || event.target instanceof HTMLInputElement) return;
  event.preventDefault();
  if (event.repeat || role !== "controller") return;
  held.delete(event.code); // (last pressed wins)
  held.add(event.code);
  steer(performance.now());
});
document.addEventListener("keyup", (event) => {
  if (!(event.code in KEYS)) return;
  held.delete(event.code);
  steer(performance.now());
});
window.addEventListener("blur", () => {
  held.clear();
  steer(performance.now());
});

// ---- timeline, fork, rewind ----

/** The user moved the timeline: it stays there until fork/rewind (else it follows the head). */
let pinned = false;

function timeline(): void {
  const head = Math.max(0, state.lastFrameIndex);
  ui.timeline.max = String(head);
  if (!pinned) ui.timeline.value = String(head);
  ui.at.textContent = ui.timeline.value;
}

ui.timeline.addEventListener("input", () => {
  pinned = true;
  ui.at.textContent = ui.timeline.value;
});

ui.fork.addEventListener("click", async () => {
  if (!info) return;
  const at = Number(ui.timeline.value);
  try {
    const child = await client.fork(info.sessionId, at);
    say(`forked ${info.sessionId} at frame ${at}: ${child.sessionId}`);
    await play(child, "controller");
  } catch (error) {
    failed("fork", error);
  }
});

ui.rewind.addEventListener("click", async () => {
  if (!info) return;
  const at = Number(ui.timeline.value);
  try {
    await client.rewind(info.sessionId, at);
    pinned = false;
    say(`rewound to frame ${at}`);
  } catch (error) {
    failed("rewind", error);
  }
});

// ---- spectating and handover ----

function share(sessionId: string): void {
  const link = new URL(location.pathname, location.href);
  link.searchParams.set("spectate", sessionId);
  if (token) link.searchParams.set("token", token);
  ui.share.href = link.toString();
  ui.share.textContent = link.toString();
}

ui.handover.addEventListener("click", () => {
  const stream = active();
  if (!stream) return;
  try {
    stream.handover(ui.viewer.value.trim());
    say(role === "controller" ? `handing over to ${ui.viewer.value.trim()}` : "taking control");
  } catch (error) {
    failed("handover", error);
  }
});

// ---- prompts and frames in, where the model declares them ----

let inputSpec: InputFrameSpec | undefined;
let feeding = false;
let feedBusy = false;
let camera: HTMLVideoElement | undefined;
let fed = 0;
const inputCanvas = document.createElement("canvas");

function showControls(spec: ControlSpec | undefined): void {
  ui.promptRow.hidden = !spec?.prompt;
  if (spec?.prompt) {
    ui.prompt.maxLength = spec.prompt.maxChars;
    ui.prompt.placeholder = spec.prompt.defaultPrompt || "a prompt";
  }
  inputSpec = spec?.inputFrame;
  ui.framesRow.hidden = !inputSpec;
  feeding = false;
  ui.camera.textContent = "Camera in";
  ui.inputStatus.textContent = "";
}

ui.sendPrompt.addEventListener("click", () => {
  const stream = active();
  if (!stream || role !== "controller") return;
  try {
    stream.send({ action: wanted(), prompt: ui.prompt.value });
    say(`prompt switched to ${JSON.stringify(ui.prompt.value)}`);
  } catch (error) {
    failed("prompt", error);
  }
});

ui.camera.addEventListener("click", async () => {
  if (feeding) {
    feeding = false;
    ui.camera.textContent = "Camera in";
    return;
  }
  if (!camera) {
    try {
      const media = await navigator.mediaDevices.getUserMedia({ video: true });
      camera = document.createElement("video");
      camera.muted = true;
      camera.srcObject = media;
      await camera.play();
    } catch {
      camera = undefined; // no camera (or refused): a moving test pattern instead
    }
  }
  feeding = true;
  ui.camera.textContent = "Stop input";
});

/** Send the next input frame (one per frame received: the model's own rate), JPEG at the
 * size the model declares; one at a time. */
async function feedFrame(dropped: bigint): Promise<void> {
  const stream = active();
  if (!stream || !inputSpec || feedBusy || role !== "controller") return;
  feedBusy = true;
  try {
    const { width, height } = inputSpec;
    inputCanvas.width = width;
    inputCanvas.height = height;
    const g = inputCanvas.getContext("2d")!;
    if (camera) {
      g.drawImage(camera, 0, 0, width, height);
    } else {
      g.fillStyle = `hsl(${(fed * 4) % 360} 60% 40%)`;
      g.fillRect(0, 0, width, height);
      g.fillStyle = "#fe4";
      const t = fed / 10;
      g.beginPath();
      g.arc(width / 2 + (width / 3) * Math.cos(t), height / 2 + (height / 3) * Math.sin(t), width / 8, 0, 7);
      g.fill();
    }
    const blob = await new Promise<Blob | null>((done) => inputCanvas.toBlob(done, "image/jpeg", 0.9));
    if (!blob || !feeding) return;
    stream.send({ action: wanted(), frame: { data: new Uint8Array(await blob.arrayBuffer()), width, height } });
    fed += 1;
    ui.inputStatus.textContent = `${camera ? "camera" : "test pattern"}: ${fed} sent, ${dropped} dropped`;
  } catch (error) {
    feeding = false;
    failed("input frame", error);
  } finally {
    feedBusy = false;
  }
}

// ---- transport switch ----

ui.transport.addEventListener("change", () => {
  const mine = generation;
  if (ui.transport.value === "webrtc") {
    if (!rtc) void startWebRTC(mine);
  } else if (rtc) {
    void fallBack(mine, "");
  }
});

// ---- start ----

async function models(): Promise<void> {
  try {
    for (const model of await client.models()) {
      const option = document.createElement("option");
      option.value = model.modelId;
      option.textContent = `${model.modelId} (${model.width}x${model.height}, ${model.fps} fps)`;
      ui.model.appendChild(option);
    }
    // the built-in world model first when it is served (the list comes sorted by id)
    if ([...ui.model.options].some((o) => o.value === DEFAULT_MODEL)) ui.model.value = DEFAULT_MODEL;
  } catch (error) {
    failed("models", error);
  }
}

ui.start.addEventListener("click", async () => {
  try {
    // JPEG on the WebSocket; RGB for WebRTC (the bridge encodes frames as video anyway)
    const rgb = formatParam ? formatParam === "rgb" : ui.transport.value === "webrtc";
    const format = rgb ? FrameFormat.RGB : FrameFormat.JPEG;
    const session = await client.createSession({
      modelId: ui.model.value,
      format,
      ...(fpsParam > 0 ? { fps: fpsParam } : {}),
      ...(qualityParam === "fixed" || qualityParam === "adaptive"
        ? {
            quality: {
              mode: qualityParam === "fixed" ? QualityPolicy_Mode.FIXED : QualityPolicy_Mode.ADAPTIVE,
            },
          }
        : {}),
    });
    await play(session, "controller");
  } catch (error) {
    failed("create session", error);
  }
});

if (spectate) {
  ui.start.disabled = true;
  client
    .getSession(spectate)
    .then((session) => play(session, "spectator"))
    .catch((error: unknown) => failed("spectate", error));
} else {
  void models();
}
