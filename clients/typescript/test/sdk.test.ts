// The SDK against a live stack's bridge (test/run.mjs starts one, or point
// WINDFLOW_BRIDGE_URL and WINDFLOW_TOKEN at one). Node 20: the ws package's WebSocket.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { WebSocket } from "ws";
import {
  Code,
  FrameFormat,
  OutputPolicy,
  QualityPolicy_Mode,
  SessionEvent_Kind,
  SessionState,
  WindflowError,
  connect,
  type Frame,
  type Session,
  type StreamSession,
  type WebSocketConstructor,
  type WindflowClient,
} from "../src/index";

// (type checks: the browser's WebSocket class and ws's both fit connect({ WebSocket }))
export const browserWebSocket: WebSocketConstructor | undefined = globalThis.WebSocket as
  | typeof globalThis.WebSocket
  | undefined;
export const nodeWebSocket: WebSocketConstructor = WebSocket;

const URL_ = process.env.WINDFLOW_BRIDGE_URL ?? "";
const TOKEN = process.env.WINDFLOW_TOKEN ?? "";
const MODEL = "windflow-world";

let client: WindflowClient;
const made: Session[] = [];

before(() => {
  assert.ok(URL_, "WINDFLOW_BRIDGE_URL is not set: run the tests with `node test/run.mjs`");
  client = connect({ url: URL_, token: TOKEN, WebSocket });
});

after(async () => {
  for (const session of made) await client.close(session.sessionId).catch(() => {});
});

async function newSession(seed = 7): Promise<Session> {
  const session = await client.createSession({
    modelId: MODEL,
    seed: BigInt(seed),
    format: FrameFormat.RGB,
    outputPolicy: OutputPolicy.PAUSE,
    quality: { mode: QualityPolicy_Mode.FIXED },
  });
  made.push(session);
  return session;
}

async function take(stream: StreamSession, count: number, each?: (f: Frame) => void): Promise<Frame[]> {
  const frames: Frame[] = [];
  for await (const frame of stream.frames()) {
    frames.push(frame);
    each?.(frame);
    if (frames.length >= count) break;
  }
  return frames;
}

function indices(frames: Frame[]): number[] {
  return frames.map((f) => Number(f.frameIndex));
}

function range(from: number, count: number): number[] {
  return Array.from({ length: count }, (_, i) => from + i);
}

async function rejectsWith(promise: Promise<unknown>, codeName: string): Promise<WindflowError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof WindflowError, `not a WindflowError: ${String(error)}`);
    assert.equal(error.codeName, codeName, error.message);
    assert.equal(error.code, Code[codeName as keyof typeof Code]);
    return error;
  }
  assert.fail(`expected ${codeName}, it succeeded`);
}

describe("unary calls", () => {
  test("models lists the built-in world model and its actions", async () => {
    const models = await client.models();
    const model = models.find((m) => m.modelId === MODEL);
    assert.ok(model, `no ${MODEL} in ${models.map((m) => m.modelId).join(", ")}`);
    assert.deepEqual(model.actions.slice(0, 5), ["noop", "up", "down", "left", "right"]);
    assert.ok(model.width > 0 && model.fps > 0);
  });

  test("create, get and close a session", async () => {
    const session = await newSession();
    assert.equal(session.spec?.modelId, MODEL);
    assert.equal(session.spec?.seed, 7n);
    const got = await client.getSession(session.sessionId);
    assert.equal(got.sessionId, session.sessionId);
    const closed = await client.close(session.sessionId);
    assert.equal(closed.sessionId, session.sessionId);
    assert.equal((await client.getSession(session.sessionId)).state, SessionState.CLOSED);
  });

  test("a bad token is UNAUTHENTICATED, HTTP and stream", async () => {
    const stranger = connect({ url: URL_, token: "not-a-token", WebSocket });
    const error = await rejectsWith(stranger.models(), "UNAUTHENTICATED");
    assert.equal(error.httpStatus, 401);
    const session = await newSession();
    const refused = await rejectsWith(stranger.attach(session.sessionId), "UNAUTHENTICATED");
    assert.equal(refused.closeCode, 4016);
  });

  test("an unknown session is NOT_FOUND, HTTP and stream", async () => {
    const unknown = "f".repeat(32);
    const error = await rejectsWith(client.getSession(unknown), "NOT_FOUND");
    assert.equal(error.httpStatus, 404);
    await rejectsWith(client.fork(unknown, 0), "NOT_FOUND");
    const refused = await rejectsWith(client.attach(unknown), "NOT_FOUND");
    assert.equal(refused.closeCode, 4005);
  });
});

describe("the stream", () => {
  test("attach, send a control, frames in order showing it", async () => {
    const session = await newSession();
    const events: SessionEvent_Kind[] = [];
    const stream = await client.attach(session.sessionId, { onEvent: (e) => events.push(e.kind) });
    assert.equal(events[0], SessionEvent_Kind.ATTACHED);
    assert.equal(stream.role, "controller");
    const first = await take(stream, 5);
    const control = stream.send({ action: 4 }); // "right", from the next frame it can shape
    assert.ok(Number(control.frameIndex) >= 5, `stamped ${control.frameIndex}`);
    assert.ok(control.clientTimeUs > 0n);
    const rest = await take(stream, 25);
    const frames = [...first, ...rest];
    assert.deepEqual(indices(frames), range(0, 30));
    const at = Number(control.frameIndex);
    for (const frame of frames) {
      const shaped = Number(frame.frameIndex) >= at;
      assert.equal(frame.action, shaped ? 4 : 0, `frame ${frame.frameIndex}`);
      assert.equal(frame.controlClientTimeUs, Number(frame.frameIndex) === at ? control.clientTimeUs : 0n);
      assert.equal(frame.data.length, frame.width * frame.height * 3);
    }
    assert.deepEqual(stream.errors, []);
    stream.close();
    assert.ok(stream.done);
    assert.throws(() => stream.send({ action: 1 }), (e: unknown) => e instanceof WindflowError && e.codeName === "FAILED_PRECONDITION");
  });

  test("sendConfirmed resolves with the receipt, and rejects a refused control", async () => {
    const session = await newSession();
    const stream = await client.attach(session.sessionId);
    const reading = take(stream, 20); // (the reader takes the answers)
    const receipt = await stream.sendConfirmed({ action: 3, frameIndex: 12 });
    assert.equal(receipt.frameIndex, 12n);
    assert.ok(receipt.clientTimeUs > 0n && receipt.receivedUs > 0n);
    await assert.rejects(
      stream.sendConfirmed({ action: 99, frameIndex: 15 }),
      (e: unknown) => e instanceof WindflowError && e.codeName === "INVALID_ARGUMENT",
    );
    const frames = await reading;
    const shaped = frames.find((f) => f.frameIndex === 12n);
    assert.ok(shaped);
    assert.deepEqual(shaped.appliedClientTimeUs, [receipt.clientTimeUs]);
    assert.equal(shaped.action, 3);
    assert.equal(stream.receipts.length, 1);
    stream.close();
  });

  test("input frames go to a model that declares them; an undeclared kind is refused", async () => {
    const restyle = (await client.models()).find((m) => m.modelId === "windflow-restyle");
    const spec = restyle?.controls?.inputFrame;
    assert.ok(spec, "windflow-restyle declares no input frames (is it served?)");
    assert.equal(restyle?.controls?.prompt, undefined);
    const session = await client.createSession({
      modelId: "windflow-restyle",
      seed: 3n,
      format: FrameFormat.RGB,
      outputPolicy: OutputPolicy.PAUSE,
      quality: { mode: QualityPolicy_Mode.FIXED },
    });
    made.push(session);
    const stream = await client.attach(session.sessionId);
    const reading = take(stream, 20);
    const { width, height } = spec;
    const gray = new Uint8Array(width * height * 3).fill(128);
    const receipt = await stream.sendConfirmed({
      frameIndex: 10,
      frame: { data: gray, width, height, format: "rgb" },
    });
    assert.equal(receipt.frameIndex, 10n);
    await assert.rejects(
      stream.sendConfirmed({ frameIndex: 12, prompt: "a fox" }),
      (e: unknown) =>
        e instanceof WindflowError && e.codeName === "INVALID_ARGUMENT" && e.message.includes("control.prompt"),
    );
    // over the gateway's limit: refused here, before it is sent
    assert.throws(
      () => stream.send({ frame: { data: new Uint8Array(2 << 20), width, height } }),
      (e: unknown) => e instanceof WindflowError && e.codeName === "RESOURCE_EXHAUSTED",
    );
    const frames = await reading;
    assert.deepEqual(
      frames.map((f) => f.frameIndex),
      Array.from({ length: 20 }, (_, i) => BigInt(i)),
    );
    assert.notDeepEqual(frames[9]!.data, frames[10]!.data); // the input changed the picture
    assert.equal(frames[19]!.inputDroppedTotal, 0n);
    stream.close();
    await client.close(session.sessionId); // (its slot: the worker's are few)
  });

  test("controls queued with the attach shape frame 0", async () => {
    const session = await newSession();
    const stream = await client.attach(session.sessionId, {
      controls: [{ action: 2, frameIndex: 0 }, { action: 3, frameIndex: 3 }],
    });
    const frames = await take(stream, 6);
    stream.close();
    assert.deepEqual(
      frames.map((f) => f.action),
      [2, 2, 2, 3, 3, 3],
    );
  });

  test("fork and rewind", async () => {
    const session = await newSession(11);
    const stream = await client.attach(session.sessionId, { controls: [{ action: 1, frameIndex: 0 }] });
    const original = await take(stream, 20);
    const head = Number((await client.getSession(session.sessionId)).headFrame);
    assert.ok(head >= 20, `head ${head}`);
    // rewind the attached session: KIND_REWOUND, then frames from there, the same pictures
    const rewound = await client.rewind(session.sessionId, 10);
    assert.equal(rewound.sessionId, session.sessionId);
    // (frames made before the rewind may still be on their way: 20 and on)
    const again: Frame[] = [];
    for await (const frame of stream.frames()) {
      if (frame.frameIndex < 20n || again.length > 0) again.push(frame);
      if (again.length >= 5) break;
    }
    assert.deepEqual(indices(again), range(10, 5));
    assert.ok(stream.events.some((e) => e.kind === SessionEvent_Kind.REWOUND && e.frameIndex === 10n));
    for (const frame of again) {
      assert.deepEqual(frame.data, original[Number(frame.frameIndex)]!.data, `frame ${frame.frameIndex}`);
    }
    stream.close();
    // a fork from frame 5: the same frames from there, in a new session
    const child = await client.fork(session.sessionId, 5);
    made.push(child);
    assert.equal(child.parentSessionId, session.sessionId);
    assert.equal(child.forkedAt, 5n);
    assert.notEqual(child.sessionId, session.sessionId);
    const forked = await client.attach(child.sessionId);
    const branch = await take(forked, 5);
    forked.close();
    assert.deepEqual(indices(branch), range(5, 5));
    for (const frame of branch) {
      assert.deepEqual(frame.data, original[Number(frame.frameIndex)]!.data, `frame ${frame.frameIndex}`);
    }
    await rejectsWith(client.fork(session.sessionId, 1_000_000), "OUT_OF_RANGE");
  });

  test("a dropped socket resumes: no gap, no repeat, pending controls kept", async () => {
    const session = await newSession(3);
    const stream = await client.attach(session.sessionId);
    const before = await take(stream, 10);
    const ahead = stream.send({ action: 3, frameIndex: stream.nextIndex + 15 });
    // drop the connection under it (as a network would: no close handshake)
    (stream._socket as unknown as WebSocket).terminate();
    const after = await take(stream, 30);
    stream.close();
    const frames = [...before, ...after];
    assert.deepEqual(indices(frames), range(0, 40));
    assert.equal(stream.resumes, 1);
    const recovered = stream.events.filter((e) => e.kind === SessionEvent_Kind.RECOVERED);
    assert.equal(recovered.length, 1, recovered.map((e) => e.message).join("; "));
    const at = Number(ahead.frameIndex);
    for (const frame of frames) {
      assert.equal(frame.action, Number(frame.frameIndex) >= at ? 3 : 0, `frame ${frame.frameIndex}`);
    }
  });

  test("a spectator watches, sends nothing, and takes a handover", async (t) => {
    const session = await newSession(5);
    const controller = await client.attach(session.sessionId);
    if (!controller.viewerId) {
      controller.close();
      t.skip("this server has no spectators (KIND_ATTACHED carries no viewer_id)");
      return;
    }
    await take(controller, 3);
    const spectator = await client.attach(session.sessionId, { role: "spectator" });
    assert.equal(spectator.role, "spectator");
    assert.throws(() => spectator.send({ action: 1 }), (e: unknown) => e instanceof WindflowError && e.codeName === "PERMISSION_DENIED");
    const watched = await take(spectator, 3);
    const seen = indices(watched);
    assert.deepEqual(seen, range(seen[0]!, 3));
    controller.handover(spectator.viewerId);
    const deadline = Date.now() + 10_000;
    const roleNow = (): string => spectator.role; // (asserts narrowed the property)
    while (roleNow() !== "controller" && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    assert.equal(roleNow(), "controller");
    assert.equal(controller.role as string, "spectator");
    const control = spectator.send({ action: 2 });
    for await (const frame of spectator.frames()) {
      if (frame.frameIndex >= control.frameIndex) {
        assert.equal(frame.action, 2);
        break;
      }
    }
    spectator.close();
    controller.close();
  });
});
