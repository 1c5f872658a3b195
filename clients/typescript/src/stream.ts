// One session's stream over the bridge's WebSocket (/v1/stream): one binary protobuf
// ClientMessage per WebSocket message out, one ServerMessage in (docs/browser.md).
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  AttachSchema,
  ClientMessageSchema,
  HandoverSchema,
  ServerMessageSchema,
  type ClientMessage,
  type Control,
  type Frame,
  type ServerMessage,
  type SessionEvent,
  type StreamError,
} from "./gen/windflow/v1/windflow_pb";
import { Code, WindflowError, statusOfClose } from "./errors";
import { AsyncQueue } from "./queue";
import { SessionView, StreamState, roleOf, type ControlInput, type RoleName } from "./state";

/** What the SDK needs of a WebSocket: the browser's, or the `ws` package's in Node. */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array<ArrayBuffer>): void;
  close(code?: number, reason?: string): void;
  // (events typed loosely: the browser's and ws's event classes differ)
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
}

/** A WebSocket class: `globalThis.WebSocket` in a browser, `ws`'s `WebSocket` in Node 20. */
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface AttachOptions {
  /** Frames in flight unacknowledged on the gateway's stream (1..64; default the server's 8). */
  window?: number;
  /** "controller" (default): sends controls; "spectator": watches, sends none. */
  role?: RoleName;
  /** Resume: the first frame sent is exactly this one (Attach.resume; a controller's). */
  resumeFrom?: number | bigint;
  /** Controls queued with the Attach, before any frame is made (a controller's). */
  controls?: ControlInput[];
  /** Each server event, as it comes (also kept in `session.events`). */
  onEvent?: (event: SessionEvent) => void;
  /** Each non-fatal in-stream error (a refused control ...; also in `session.errors`). */
  onError?: (error: StreamError) => void;
  /** How long a dropped stream keeps trying to resume (ms; default 15000; 0: never). */
  resumeTimeoutMs?: number;
  /** Frames kept for a slow `frames()` reader; older ones are dropped (default 256). */
  maxBufferedFrames?: number;
  /** How long one attach may take to be answered (ms; default 10000). */
  attachTimeoutMs?: number;
}

export const RESUME_TIMEOUT_MS = 15_000;
const FIRST_RETRY_DELAY_MS = 50;
const MAX_RETRY_DELAY_MS = 1_000;
const OPEN = 1;
const CLOSE_NORMAL = 1000;

/** The pause before resume attempt `attempt` (0-based) of one outage (windflow/sdk/resume.py). */
export function retryDelayMs(attempt: number): number {
  if (attempt <= 0) return 0;
  return Math.min(MAX_RETRY_DELAY_MS, FIRST_RETRY_DELAY_MS * 2 ** (attempt - 1));
}

interface Outage {
  reason: string;
  started: number;
  deadline: number;
  attempts: number;
  resumeFrom: number | undefined;
}

/**
 * A live session stream. Made by `client.attach(...)`, which resolves once the server has
 * answered the Attach (or rejects with its WindflowError: NOT_FOUND, UNAUTHENTICATED ...).
 *
 * Frames come from `frames()` in order, with no repeat; `send()` sends a control;
 * `close()` ends the stream (not the session: `client.close(id)` does that).
 *
 * Resume: when the socket drops (not closed by `close()`, not ended by a gRPC status other
 * than UNAVAILABLE), it opens a new one and attaches again: a controller with
 * `resume` at the frame after the last one received and the controls sent for frames not
 * received yet (no gap, no repeat), a spectator afresh. It tries with a backoff for
 * `resumeTimeoutMs`, then `frames()` throws UNAVAILABLE. Each resume counts in `resumes`
 * and leaves a local KIND_RECOVERED event.
 */
export class StreamSession extends SessionView {
  readonly id: string;
  /** Times the stream was resumed after its socket dropped. */
  resumes = 0;
  /** The socket now (internal; tests drop it to see a resume). */
  _socket: WebSocketLike | undefined;
  private readonly initial: ControlInput[];
  private readonly window: number;
  private readonly resumeTimeoutMs: number;
  private readonly attachTimeoutMs: number;
  private readonly resumeFrom: number | bigint | undefined;
  private attachedOn: WebSocketLike | undefined;
  private outage: Outage | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private closed = false;
  private ended = false;
  private failure: WindflowError | undefined;
  private started: { resolve: () => void; reject: (error: WindflowError) => void } | undefined;

  /** @internal use `client.attach` */
  constructor(
    private readonly url: string,
    private readonly WebSocketClass: WebSocketConstructor,
    sessionId: string,
    options: AttachOptions = {},
  ) {
    super(
      new StreamState(options.role ?? "controller", {
        onEvent: options.onEvent,
        onError: options.onError,
      }),
      new AsyncQueue(options.maxBufferedFrames ?? 256),
    );
    this.id = sessionId;
    this.window = options.window ?? 0;
    this.resumeTimeoutMs = options.resumeTimeoutMs ?? RESUME_TIMEOUT_MS;
    this.attachTimeoutMs = options.attachTimeoutMs ?? 10_000;
    this.initial = options.controls ?? [];
    if (options.resumeFrom !== undefined) this.state.startAt(Number(options.resumeFrom));
    this.resumeFrom = options.resumeFrom;
  }

  /** @internal Open the socket and attach; resolves once the server answers. */
  start(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.started = { resolve, reject };
      this.open();
    });
  }

  /** Frames a slow `frames()` reader missed here (the bridge's drops are in dropped_total). */
  get droppedLocally(): number {
    return this.queue.dropped;
  }

  /** Whether the stream is over (closed, ended by the server, or failed). */
  get done(): boolean {
    return this.closed || this.ended || this.failure !== undefined;
  }

  /** Frames as they arrive, in order, no repeat; ends when the stream does, throwing its
   * WindflowError when it failed. One reader at a time. */
  frames(): AsyncIterableIterator<Frame> {
    return this.queue;
  }

  /** Hand the controller role to spectator `viewerId` (from the controller), or take it
   * (a spectator, `viewerId` its own or "", while there is no controller). */
  handover(viewerId = ""): void {
    this.usable();
    const handover = create(HandoverSchema, { viewerId });
    if (!this.write({ msg: { case: "handover", value: handover } })) {
      throw new WindflowError(Code.UNAVAILABLE, "the stream is reconnecting; try again");
    }
  }

  /** End the stream (the session goes on: it parks when left alone; `client.close` ends it). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.stopTimer();
    const socket = this._socket;
    this._socket = undefined;
    socket?.close(CLOSE_NORMAL, "closed by the client");
    this.queue.end();
    this.started?.reject(new WindflowError(Code.CANCELLED, "closed before it attached"));
    this.started = undefined;
  }

  protected usable(): void {
    if (this.failure) throw this.failure;
    if (this.closed || this.ended) {
      throw new WindflowError(Code.FAILED_PRECONDITION, `the stream of session ${this.id} has ended`);
    }
  }

  protected write(message: Omit<ClientMessage, "$typeName">): boolean {
    const socket = this._socket;
    if (!socket || socket !== this.attachedOn || socket.readyState !== OPEN) return false;
    socket.send(encode(create(ClientMessageSchema, message)));
    return true;
  }

  private attachMessage(resuming: boolean): ClientMessage {
    const state = this.state;
    const attach = create(AttachSchema, {
      sessionId: this.id,
      window: this.window,
      role: roleOf(state.role),
    });
    if (state.role === "controller") {
      if (!resuming) {
        attach.controls = this.initial.map((input) => state.stamp(input));
        attach.controls.forEach((control) => state.sent(control));
        if (this.resumeFrom !== undefined) {
          attach.resume = true;
          attach.resumeFrom = BigInt(this.resumeFrom);
        }
      } else {
        const from = state.positioned ? state.nextIndex : undefined;
        attach.controls = state.pending.toResend(BigInt(from === undefined ? -1 : from - 1));
        if (from !== undefined) {
          attach.resume = true;
          attach.resumeFrom = BigInt(from);
        }
        if (this.outage) this.outage.resumeFrom = from;
      }
    }
    return create(ClientMessageSchema, { msg: { case: "attach", value: attach } });
  }

  private open(): void {
    const resuming = this.outage !== undefined;
    let socket: WebSocketLike;
    try {
      socket = new this.WebSocketClass(this.url);
    } catch (error) {
      this.dropped(`could not open ${this.url}: ${String(error)}`);
      return;
    }
    socket.binaryType = "arraybuffer";
    this._socket = socket;
    let answered = false;
    const timeout = setTimeout(() => {
      if (!answered && this._socket === socket) socket.close(); // (its close event follows)
    }, this.attachTimeoutMs);
    socket.onopen = () => {
      if (this._socket !== socket) return;
      socket.send(encode(this.attachMessage(resuming)));
      this.attachedOn = socket;
    };
    socket.onmessage = (event: { data: unknown }) => {
      if (this._socket !== socket || this.closed) return;
      const message = this.decode(event.data);
      if (!message) return;
      if (!answered && message.msg.case !== "error") {
        // (an error first is the refusal of the attach: its close code follows)
        answered = true;
        clearTimeout(timeout);
        this.answered();
      }
      this.message(message);
    };
    socket.onerror = () => {}; // a close event follows
    socket.onclose = (event: { code: number; reason: string }) => {
      clearTimeout(timeout);
      if (this._socket !== socket) return;
      this._socket = undefined;
      this.attachedOn = undefined;
      this.socketClosed(event.code, event.reason);
    };
  }

  private answered(): void {
    const outage = this.outage;
    if (outage) {
      this.outage = undefined;
      this.resumes += 1;
      const took = Math.round(now() - outage.started);
      const where =
        outage.resumeFrom !== undefined ? `at frame ${outage.resumeFrom}` : "afresh";
      this.state.recovered(
        `stream resumed ${where} after ${took} ms and ${outage.attempts} attempt(s): ${outage.reason}`,
        outage.resumeFrom ?? 0,
      );
    }
    this.started?.resolve();
    this.started = undefined;
  }

  private decode(data: unknown): ServerMessage | undefined {
    try {
      return fromBinary(ServerMessageSchema, bytes(data));
    } catch (error) {
      this.fail(new WindflowError(Code.INTERNAL, `a malformed ServerMessage: ${String(error)}`));
      return undefined;
    }
  }

  private message(message: ServerMessage): void {
    const got = this.state.receive(message);
    if (got.frame) this.queue.push(got.frame);
    if (got.resend) {
      this.state.sent(got.resend);
      this.write({ msg: { case: "control", value: got.resend } });
    }
    if (got.closed) {
      this.ended = true;
      this.queue.end();
    }
  }

  private socketClosed(code: number, reason: string): void {
    if (this.closed || this.ended || this.failure) return;
    if (code === CLOSE_NORMAL) {
      // the server ended the stream (another stream of this client took the role over)
      this.ended = true;
      this.queue.end();
      this.started?.reject(new WindflowError(Code.UNAVAILABLE, `the stream ended: ${reason}`));
      this.started = undefined;
      return;
    }
    const status = statusOfClose(code);
    if (status !== undefined && status !== Code.UNAVAILABLE) {
      const last = this.state.lastError;
      const message =
        last && last.code === status ? last.message : reason || `stream closed (${code})`;
      this.fail(new WindflowError(status, message, { closeCode: code }));
      return;
    }
    const why =
      status === Code.UNAVAILABLE
        ? `UNAVAILABLE: ${this.state.lastError?.message || reason}`
        : `socket closed ${code}${reason ? ` (${reason})` : ""}`;
    this.dropped(why);
  }

  /** The socket went away without a final status: resume, or give up. */
  private dropped(reason: string): void {
    if (this.started && !this.outage) {
      // the first attach: not resumed, its caller learns why
      this.fail(new WindflowError(Code.UNAVAILABLE, `could not attach: ${reason}`));
      return;
    }
    if (this.resumeTimeoutMs <= 0) {
      this.fail(new WindflowError(Code.UNAVAILABLE, `the stream dropped: ${reason}`));
      return;
    }
    const t = now();
    const outage = (this.outage ??= {
      reason,
      started: t,
      deadline: t + this.resumeTimeoutMs,
      attempts: 0,
      resumeFrom: undefined,
    });
    const left = outage.deadline - t;
    if (left <= 0) {
      this.fail(
        new WindflowError(
          Code.UNAVAILABLE,
          `the stream of session ${this.id} dropped (${outage.reason}) and could not be ` +
            `resumed in ${this.resumeTimeoutMs} ms (${outage.attempts} attempt(s)): ${reason}`,
        ),
      );
      return;
    }
    const delay = Math.min(retryDelayMs(outage.attempts), left);
    outage.attempts += 1;
    this.stopTimer();
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (!this.closed) this.open();
    }, delay);
  }

  private fail(error: WindflowError): void {
    if (this.failure || this.closed) return;
    this.failure = error;
    this.stopTimer();
    const socket = this._socket;
    this._socket = undefined;
    socket?.close(CLOSE_NORMAL);
    this.queue.end(error);
    this.started?.reject(error);
    this.started = undefined;
  }

  private stopTimer(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }
}

/** A ClientMessage's bytes (in an ArrayBuffer of its own, as send() takes them). */
function encode(message: ClientMessage): Uint8Array<ArrayBuffer> {
  return toBinary(ClientMessageSchema, message) as Uint8Array<ArrayBuffer>;
}

function now(): number {
  return globalThis.performance ? performance.now() : Date.now();
}

/** A binary WebSocket message's bytes (ArrayBuffer, or a Node Buffer / view). */
export function bytes(data: unknown): Uint8Array {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (Array.isArray(data)) {
    // ws's "fragments"
    const parts = data as Uint8Array[];
    const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
    let at = 0;
    for (const part of parts) {
      out.set(part, at);
      at += part.byteLength;
    }
    return out;
  }
  throw new WindflowError(Code.INTERNAL, `not a binary message (${typeof data})`);
}
