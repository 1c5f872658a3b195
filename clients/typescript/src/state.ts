// What one client's view of a session stream keeps, whatever carries it (a WebSocket or a
// WebRTC data channel): where the stream stands, the controls a resume must send again,
// the events and in-stream errors, the role. Pure but for the clock.
import { create, equals } from "@bufbuild/protobuf";
import {
  CameraPoseSchema,
  ControlSchema,
  FrameFormat,
  InputFrameSchema,
  Role,
  SessionEvent_Kind,
  SessionEventSchema,
  type ClientMessage,
  type Control,
  type ControlReceipt,
  type Frame,
  type ServerMessage,
  type SessionEvent,
  type StreamError,
} from "./gen/windflow/v1/windflow_pb";
import { Code, WindflowError } from "./errors";
import type { AsyncQueue } from "./queue";

export type RoleName = "controller" | "spectator";

/** A control to send; what is left out is filled in (`StreamSession.send`). */
export interface ControlInput {
  /** Index into the model's `actions` (ModelInfo.actions). */
  action?: number;
  /** Continuous axes in [-1, 1], in the order of ModelInfo.axes. */
  axes?: number[];
  /** The frame it applies from; default: the next frame a control can still shape. */
  frameIndex?: number | bigint;
  /** The client's clock when sent (unix microseconds); default: now. The frame it first
   * shapes echoes it (Frame.control_client_time_us): control-to-frame latency. */
  clientTimeUs?: number | bigint;
  /** A text prompt, for a model whose ModelInfo.controls declares one; it stays in effect
   * until another. Omitted: the one in effect stays. */
  prompt?: string;
  /** A camera pose, one value per ModelInfo.controls.pose component. */
  pose?: number[];
  /** A frame in (video-to-video): JPEG bytes (or raw RGB with `format: "rgb"`) of the
   * size ModelInfo.controls.input_frame declares. */
  frame?: InputFrameInput;
}

export interface InputFrameInput {
  data: Uint8Array;
  width: number;
  height: number;
  format?: "jpeg" | "rgb";
}

/** The gateway's limit on one message (the public API's): a larger control is refused
 * RESOURCE_EXHAUSTED here, before it is sent. */
export const MAX_MESSAGE_BYTES = 1024 * 1024;

/** Controls remembered for a resume (the worker holds at most 256 future ones). */
export const MAX_REMEMBERED_CONTROLS = 1024;
/** Keep this many events and in-stream errors (the newest). */
export const HISTORY = 256;
/** A frame due this soon is being made already: a control stamped now aims past it. */
const MARGIN_US = 2_000;
/** At most this many frames past the next one does a default stamp aim (clocks may differ). */
const MAX_LEAD_FRAMES = 2;
/** Times a control stamped by default and refused as in the past is stamped again. */
const MAX_RESTAMPS = 3;

/** Unix microseconds, sub-millisecond where the platform has it. */
export function nowUs(): number {
  const perf = globalThis.performance;
  if (perf && typeof perf.timeOrigin === "number") {
    return Math.round((perf.timeOrigin + perf.now()) * 1000);
  }
  return Date.now() * 1000;
}

/** The controls sent for frames not received yet, less those refused: what a resumed stream
 * sends again (windflow/common/controls.py, the same rules). */
export class PendingControls {
  private controls: Control[] = [];

  constructor(private readonly limit = MAX_REMEMBERED_CONTROLS) {}

  get size(): number {
    return this.controls.length;
  }

  sent(control: Control): void {
    if (this.controls.length >= this.limit) this.controls.shift();
    this.controls.push(control);
  }

  /** Forget the newest sent control equal to `control` (the server refused it). */
  refused(control: Control): void {
    for (let i = this.controls.length - 1; i >= 0; i--) {
      if (equals(ControlSchema, this.controls[i]!, control)) {
        this.controls.splice(i, 1);
        return;
      }
    }
  }

  /** Frame `index` arrived: controls up to it are history. */
  received(index: bigint): void {
    if (this.controls.some((c) => c.frameIndex <= index)) {
      this.controls = this.controls.filter((c) => c.frameIndex > index);
    }
  }

  /** The session's future restarts (KIND_REWOUND): nothing sent before is sent again. */
  rewound(): void {
    this.controls = [];
  }

  /** Controls for frames after `after` (the last frame received), in the order sent. */
  toResend(after: bigint): Control[] {
    return this.controls.filter((c) => c.frameIndex > after);
  }
}

export interface Received {
  /** A frame to hand on (not a repeat). */
  frame?: Frame;
  /** A control to send again, stamped later (a default stamp that was already past). */
  resend?: Control;
  /** The session closed (KIND_CLOSED): the stream ends. */
  closed?: boolean;
}

export class StreamState {
  /** The last frame index received (-1: none yet). */
  lastIndex = -1;
  /** The next frame expected. */
  nextIndex = 0;
  /** Nothing at or below this index is handed on again (back down only at a rewind). */
  private floor = -1n;
  /** `nextIndex` is where the stream stands (it attached, or started at a resume_from). */
  positioned = false;
  /** The session's output fps (0: not known yet). */
  fps = 0;
  /** Deadline of the next frame on the worker's clock (unix us; 0 before a frame). */
  nextDueUs = 0;
  viewerId = "";
  readonly events: SessionEvent[] = [];
  readonly errors: StreamError[] = [];
  readonly pending = new PendingControls();
  /** The newest StreamError: the message of a status that ends the stream. */
  lastError: StreamError | undefined;
  private lastSent: Control | undefined;
  /** clientTimeUs of controls stamped by default -> times stamped again. */
  private readonly stamped = new Map<bigint, number>();
  /** Controls that were stamped again after a refusal (their refusals are not errors). */
  restamps = 0;
  /** The server's receipts of accepted controls, oldest first (the newest 256). */
  readonly receipts: ControlReceipt[] = [];
  /** `sendConfirmed` calls waiting for their answer, by the control's clientTimeUs. */
  private readonly answers = new Map<
    bigint,
    { resolve: (receipt: ControlReceipt) => void; reject: (error: WindflowError) => void }
  >();

  constructor(
    public role: RoleName,
    private readonly listeners: {
      onEvent?: ((event: SessionEvent) => void) | undefined;
      onError?: ((error: StreamError) => void) | undefined;
    } = {},
  ) {}

  /** The frame a control sent now can still shape: the next one, or a later one when the
   * worker is already making it by its deadline (at most MAX_LEAD_FRAMES later). */
  aim(): number {
    let index = this.nextIndex;
    if (this.nextDueUs > 0 && this.fps > 0) {
      const interval = 1e6 / this.fps;
      const now = nowUs();
      let due = this.nextDueUs;
      while (now > due - MARGIN_US && index < this.nextIndex + MAX_LEAD_FRAMES) {
        due += interval;
        index += 1;
      }
    }
    return index;
  }

  /** A Control from `input`, its frame index and client time filled in. */
  stamp(input: ControlInput): Control {
    const auto = input.frameIndex === undefined;
    const control = create(ControlSchema, {
      action: input.action ?? 0,
      axes: input.axes ?? [],
      frameIndex: BigInt(auto ? this.aim() : input.frameIndex!),
      clientTimeUs: BigInt(input.clientTimeUs ?? nowUs()),
    });
    if (input.prompt !== undefined) control.prompt = input.prompt;
    if (input.pose !== undefined) control.pose = create(CameraPoseSchema, { values: input.pose });
    if (input.frame !== undefined) {
      const f = input.frame;
      if (f.data.byteLength > MAX_MESSAGE_BYTES) {
        throw new WindflowError(
          Code.RESOURCE_EXHAUSTED,
          `a ${f.data.byteLength}-byte input frame is over the gateway's limit of ` +
            `${MAX_MESSAGE_BYTES} bytes; it was not sent`,
        );
      }
      control.frame = create(InputFrameSchema, {
        data: f.data,
        width: f.width,
        height: f.height,
        format: f.format === "rgb" ? FrameFormat.RGB : FrameFormat.JPEG,
      });
    }
    if (auto) {
      this.stamped.set(control.clientTimeUs, 0);
      if (this.stamped.size > HISTORY) this.stamped.delete(this.stamped.keys().next().value!);
    }
    return control;
  }

  sent(control: Control): void {
    this.pending.sent(control);
    this.lastSent = control;
  }

  /** The stream (re)started at `index` (an Attach's resume_from). */
  startAt(index: number): void {
    this.nextIndex = Math.max(this.nextIndex, index);
    this.positioned = true;
  }

  receive(message: ServerMessage): Received {
    const msg = message.msg;
    switch (msg.case) {
      case "frame": {
        const frame = msg.value;
        if (frame.frameIndex <= this.floor) return {}; // a repeat (a resume overlapping)
        this.floor = frame.frameIndex;
        this.positioned = true;
        this.lastIndex = Number(frame.frameIndex);
        this.nextIndex = this.lastIndex + 1;
        this.pending.received(frame.frameIndex);
        const ts = frame.timestamps;
        if (ts) {
          const next = Number(ts.nextDueUs);
          this.nextDueUs = next || (this.fps > 0 ? Number(ts.dueUs) + 1e6 / this.fps : 0);
        }
        return { frame };
      }
      case "event": {
        const event = msg.value;
        if (event.fps > 0) this.fps = event.fps;
        switch (event.kind) {
          case SessionEvent_Kind.ATTACHED:
            this.startAt(Number(event.frameIndex));
            if (event.viewerId) this.viewerId = event.viewerId;
            if (event.role !== Role.UNSPECIFIED) this.role = roleName(event.role);
            break;
          case SessionEvent_Kind.ROLE_CHANGED:
            if (event.role !== Role.UNSPECIFIED) this.role = roleName(event.role);
            break;
          case SessionEvent_Kind.REWOUND:
            this.nextIndex = Number(event.frameIndex);
            this.lastIndex = this.nextIndex - 1;
            this.floor = event.frameIndex - 1n;
            this.positioned = true;
            this.nextDueUs = 0;
            this.pending.rewound();
            break;
        }
        this.event(event); // (its listener sees the state after it)
        return event.kind === SessionEvent_Kind.CLOSED ? { closed: true } : {};
      }
      case "receipt": {
        const receipt = msg.value;
        this.receipts.push(receipt);
        if (this.receipts.length > HISTORY) this.receipts.shift();
        const waiting = this.answers.get(receipt.clientTimeUs);
        this.answers.delete(receipt.clientTimeUs);
        waiting?.resolve(receipt);
        return {};
      }
      case "error": {
        const error = msg.value;
        this.lastError = error;
        const refused = error.control;
        if (refused) {
          const again = this.restamp(error, refused);
          if (again) return { resend: again }; // (its answer is the new stamp's, same time)
          this.pending.refused(refused); // never sent again
          const waiting = this.answers.get(refused.clientTimeUs);
          this.answers.delete(refused.clientTimeUs);
          waiting?.reject(new WindflowError(error.code, error.message));
        }
        this.errors.push(error);
        if (this.errors.length > HISTORY) this.errors.shift();
        this.listeners.onError?.(error);
        return {};
      }
    }
    return {};
  }

  /** The server's answer to the control sent with `clientTimeUs`: its receipt, or its
   * refusal as a WindflowError; TIMEOUT-like UNAVAILABLE after `timeoutMs`. */
  answer(clientTimeUs: bigint, timeoutMs: number): Promise<ControlReceipt> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.answers.delete(clientTimeUs);
        reject(new WindflowError(Code.UNAVAILABLE, `no answer to the control in ${timeoutMs} ms`));
      }, timeoutMs);
      this.answers.set(clientTimeUs, {
        resolve: (receipt) => {
          clearTimeout(timer);
          resolve(receipt);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
    });
  }

  /** A local event (KIND_RECOVERED after a resume) into the history. */
  event(event: SessionEvent): void {
    this.events.push(event);
    if (this.events.length > HISTORY) this.events.shift();
    this.listeners.onEvent?.(event);
  }

  recovered(message: string, frameIndex: number): void {
    this.event(
      create(SessionEventSchema, {
        kind: SessionEvent_Kind.RECOVERED,
        message,
        frameIndex: BigInt(Math.max(0, frameIndex)),
      }),
    );
  }

  /** A control the SDK stamped itself, refused as in the past, and still the newest sent:
   * the same control for a later frame (a later control must not be overtaken by it). */
  private restamp(error: StreamError, refused: Control): Control | undefined {
    if (error.code !== Code.INVALID_ARGUMENT) return undefined;
    const tries = this.stamped.get(refused.clientTimeUs);
    const last = this.lastSent;
    if (tries === undefined || tries >= MAX_RESTAMPS || !last) return undefined;
    if (!equals(ControlSchema, last, refused)) return undefined;
    this.pending.refused(refused);
    this.stamped.set(refused.clientTimeUs, tries + 1);
    this.restamps += 1;
    const index = BigInt(Math.max(Number(refused.frameIndex) + 1, this.aim()));
    return create(ControlSchema, {
      action: refused.action,
      axes: [...refused.axes],
      frameIndex: index,
      clientTimeUs: refused.clientTimeUs,
    });
  }
}

export function roleName(role: Role): RoleName {
  return role === Role.SPECTATOR ? "spectator" : "controller";
}

export function roleOf(name: RoleName | undefined): Role {
  return name === "spectator" ? Role.SPECTATOR : Role.CONTROLLER;
}

/** What a stream of a session shows its reader, whatever carries it (`StreamSession`,
 * `WebRTCSession`). */
export abstract class SessionView {
  protected constructor(
    protected readonly state: StreamState,
    protected readonly queue: AsyncQueue<Frame>,
  ) {}

  /** Throws a WindflowError when the stream cannot take a message now. */
  protected abstract usable(): void;

  /** Hand `message` to the transport; false when it could not go now. */
  protected abstract write(message: Omit<ClientMessage, "$typeName">): boolean;

  /** Send a control; returns it as sent (frame index and client time filled in). Throws a
   * WindflowError when the stream is over, PERMISSION_DENIED from a spectator. (A
   * WebSocket stream being resumed sends it with the resume's Attach.) */
  send(input: ControlInput = {}): Control {
    this.usable();
    if (this.state.role === "spectator") {
      throw new WindflowError(Code.PERMISSION_DENIED, "a spectator sends no controls");
    }
    const control = this.state.stamp(input);
    this.state.sent(control);
    this.write({ msg: { case: "control", value: control } });
    return control;
  }

  /** Send a control and wait for the server's answer: its receipt (the frame it applies
   * from), or its refusal thrown as a WindflowError. The answer comes on the stream, so
   * its frames must be read meanwhile (as `frames()` does). */
  sendConfirmed(input: ControlInput = {}, timeoutMs = 5000): Promise<ControlReceipt> {
    const control = this.send(input);
    return this.state.answer(control.clientTimeUs, timeoutMs);
  }

  /** The server's receipts of accepted controls, oldest first (the newest 256). */
  get receipts(): readonly ControlReceipt[] {
    return this.state.receipts;
  }

  /** This stream's role now (a handover changes it). */
  get role(): RoleName {
    return this.state.role;
  }

  /** This stream's viewer id (from KIND_ATTACHED; "" before, or from an older server). */
  get viewerId(): string {
    return this.state.viewerId;
  }

  /** Server events, oldest first (the newest 256), and the local KIND_RECOVERED ones. */
  get events(): readonly SessionEvent[] {
    return this.state.events;
  }

  /** In-stream errors (refused controls ...), oldest first (the newest 256). */
  get errors(): readonly StreamError[] {
    return this.state.errors;
  }

  /** The last frame index received (-1: none yet). */
  get lastIndex(): number {
    return this.state.lastIndex;
  }

  /** The next frame expected. */
  get nextIndex(): number {
    return this.state.nextIndex;
  }

  /** The session's output fps as last announced (0: not yet). */
  get fps(): number {
    return this.state.fps;
  }
}
