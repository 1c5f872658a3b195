// One session's stream over WebRTC: the frames as one video track, and a data channel
// labelled "windflow" carrying binary protobuf ClientMessages out (controls, handover)
// and ServerMessages in (events, errors, and each frame's Frame message without its data:
// its index, timestamps and control_client_time_us).
//
// Signaling: POST /v1/sessions/{id}/webrtc?token=... with
//   {"type": "offer", "sdp": ..., "role": "controller"|"spectator", "resume_from": n}
// answered {"type": "answer", "sdp": ...}. One exchange, no trickle: the offer goes once
// its ICE candidates are gathered.
import { create, fromBinary, toBinary, type JsonValue } from "@bufbuild/protobuf";
import {
  ClientMessageSchema,
  HandoverSchema,
  ServerMessageSchema,
  type ClientMessage,
  type Control,
  type Frame,
  type SessionEvent,
  type StreamError,
} from "./gen/windflow/v1/windflow_pb";
import { Code, WindflowError } from "./errors";
import { AsyncQueue } from "./queue";
import { SessionView, StreamState, type ControlInput, type RoleName } from "./state";
import { bytes } from "./stream";

export interface WebRTCOptions {
  /** "controller" (default) or "spectator". */
  role?: RoleName;
  /** The first frame (a controller taking its own stream over, e.g. from a WebSocket). */
  resumeFrom?: number | bigint;
  /** Frames in flight on the bridge's gRPC stream (0..64; default the server's). */
  window?: number;
  /** The video codec the bridge encodes with (default its own: VP8). */
  codec?: "vp8" | "h264";
  onEvent?: (event: SessionEvent) => void;
  onError?: (error: StreamError) => void;
  /** The connection ended after it was up (failed, closed by the server, or `close()`d:
   * then no error). */
  onClose?: (error?: WindflowError) => void;
  /** ICE servers (default none: host candidates, as on one network or loopback). */
  iceServers?: RTCIceServer[];
  /** How long ICE and the data channel may take to come up (ms; default 5000). */
  connectTimeoutMs?: number;
  /** How long candidates are gathered before the offer goes anyway (ms; default 2000). */
  gatherTimeoutMs?: number;
  /** The RTCPeerConnection class (default the platform's). */
  RTCPeerConnection?: typeof RTCPeerConnection;
  /** Frames' messages kept for a slow `frames()` reader (default 256). */
  maxBufferedFrames?: number;
}

type Signal = (offer: JsonValue) => Promise<JsonValue>;

export const DATA_CHANNEL_LABEL = "windflow";

/** A WebRTC stream: `stream` (a MediaStream with the video track) to show in a <video>,
 * `frames()` the frames' messages (without data), `send` / `handover` / `close` as on a
 * WebSocket stream. No resume of its own: on failure, attach again (e.g. over a WebSocket
 * with `resumeFrom: session.nextIndex`). */
export class WebRTCSession extends SessionView {
  readonly id: string;
  readonly pc: RTCPeerConnection;
  readonly channel: RTCDataChannel;
  /** The remote video (its track arrives with the answer). */
  readonly stream: MediaStream;
  private readonly options: WebRTCOptions;
  private up = false;
  private over = false;

  /** @internal use `client.attachWebRTC` */
  constructor(
    sessionId: string,
    options: WebRTCOptions,
    private readonly signal: Signal,
  ) {
    super(
      new StreamState(options.role ?? "controller", {
        onEvent: options.onEvent,
        onError: options.onError,
      }),
      new AsyncQueue(options.maxBufferedFrames ?? 256),
    );
    this.id = sessionId;
    this.options = options;
    const PeerConnection =
      options.RTCPeerConnection ??
      (globalThis as { RTCPeerConnection?: typeof RTCPeerConnection }).RTCPeerConnection;
    if (!PeerConnection) {
      throw new WindflowError(Code.UNIMPLEMENTED, "no RTCPeerConnection here (a browser has one)");
    }
    if (options.resumeFrom !== undefined) this.state.startAt(Number(options.resumeFrom));
    this.pc = new PeerConnection({ iceServers: options.iceServers ?? [] });
    this.stream = new MediaStream();
    const transceiver = this.pc.addTransceiver("video", { direction: "recvonly" });
    lowLatency(transceiver.receiver);
    this.pc.ontrack = (event) => {
      lowLatency(event.receiver);
      if (!this.stream.getTracks().includes(event.track)) this.stream.addTrack(event.track);
    };
    // the data channel before the offer: its m-line goes in the offer
    this.channel = this.pc.createDataChannel(DATA_CHANNEL_LABEL, { ordered: true });
    this.channel.binaryType = "arraybuffer";
    this.channel.onmessage = (event) => this.message(event.data);
  }

  get done(): boolean {
    return this.over;
  }

  /** The frames' messages (no data: the picture is the video track's), in order. */
  frames(): AsyncIterableIterator<Frame> {
    return this.queue;
  }

  /** @internal Offer, answer, and wait for ICE and the data channel. */
  async start(): Promise<void> {
    const pc = this.pc;
    try {
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      await gathered(pc, this.options.gatherTimeoutMs ?? 2_000);
      const body: { [key: string]: JsonValue } = {
        type: "offer",
        sdp: pc.localDescription?.sdp ?? offer.sdp ?? "",
        role: this.state.role,
      };
      if (this.options.resumeFrom !== undefined) body.resume_from = Number(this.options.resumeFrom);
      if (this.options.window !== undefined) body.window = this.options.window;
      if (this.options.codec !== undefined) body.codec = this.options.codec;
      const answer = await this.signal(body);
      const sdp = typeof answer === "object" && answer && !Array.isArray(answer) ? answer.sdp : undefined;
      if (typeof sdp !== "string") {
        throw new WindflowError(Code.INTERNAL, "the WebRTC answer has no sdp");
      }
      await pc.setRemoteDescription({ type: "answer", sdp });
      await this.connected(this.options.connectTimeoutMs ?? 5_000);
    } catch (error) {
      this.end(undefined);
      if (error instanceof WindflowError) throw error;
      throw new WindflowError(Code.UNAVAILABLE, `WebRTC: ${error instanceof Error ? error.message : String(error)}`);
    }
    this.up = true;
    pc.addEventListener("connectionstatechange", () => {
      if (pc.connectionState === "failed" || pc.connectionState === "closed") {
        this.end(this.failure(`the WebRTC connection ${pc.connectionState}`));
      }
    });
    this.channel.addEventListener("close", () => {
      this.end(this.failure("the data channel closed"));
    });
  }

  handover(viewerId = ""): void {
    this.usable();
    this.write({ msg: { case: "handover", value: create(HandoverSchema, { viewerId }) } });
  }

  /** End the stream (the session goes on). */
  close(): void {
    this.end(undefined);
  }

  protected usable(): void {
    if (this.over) throw new WindflowError(Code.FAILED_PRECONDITION, `the WebRTC stream of ${this.id} has ended`);
    if (this.channel.readyState !== "open") {
      throw new WindflowError(Code.UNAVAILABLE, "the data channel is not open");
    }
  }

  protected write(message: Omit<ClientMessage, "$typeName">): boolean {
    const data = toBinary(ClientMessageSchema, create(ClientMessageSchema, message));
    this.channel.send(data as Uint8Array<ArrayBuffer>);
    return true;
  }

  private message(data: unknown): void {
    if (this.over) return;
    let message;
    try {
      message = fromBinary(ServerMessageSchema, bytes(data));
    } catch (error) {
      this.end(new WindflowError(Code.INTERNAL, `a malformed ServerMessage: ${String(error)}`));
      return;
    }
    const got = this.state.receive(message);
    if (got.frame) this.queue.push(got.frame);
    if (got.resend && this.channel.readyState === "open") {
      this.state.sent(got.resend);
      this.write({ msg: { case: "control", value: got.resend } });
    }
    if (got.closed) this.end(undefined);
  }

  private failure(what: string): WindflowError {
    const last = this.state.lastError;
    return last
      ? new WindflowError(last.code, last.message)
      : new WindflowError(Code.UNAVAILABLE, what);
  }

  private connected(timeoutMs: number): Promise<void> {
    const pc = this.pc;
    const channel = this.channel;
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (pc.connectionState === "failed" || pc.connectionState === "closed") {
          done(new WindflowError(Code.UNAVAILABLE, `ICE ${pc.connectionState}`));
        } else if (pc.connectionState === "connected" && channel.readyState === "open") {
          done();
        }
      };
      const timer = setTimeout(
        () =>
          done(
            new WindflowError(
              Code.UNAVAILABLE,
              `WebRTC did not connect in ${timeoutMs} ms (connection ${pc.connectionState}, ` +
                `data channel ${channel.readyState})`,
            ),
          ),
        timeoutMs,
      );
      const done = (error?: WindflowError): void => {
        clearTimeout(timer);
        pc.removeEventListener("connectionstatechange", check);
        channel.removeEventListener("open", check);
        if (error) reject(error);
        else resolve();
      };
      pc.addEventListener("connectionstatechange", check);
      channel.addEventListener("open", check);
      check();
    });
  }

  private end(error: WindflowError | undefined): void {
    if (this.over) return;
    this.over = true;
    try {
      this.channel.close();
    } catch {
      /* already */
    }
    this.pc.close();
    for (const track of this.stream.getTracks()) track.stop();
    this.queue.end(error);
    if (this.up) this.options.onClose?.(error);
  }
}

/** Play frames as they come: no jitter buffer to speak of (where the browser lets one set it). */
function lowLatency(receiver: RTCRtpReceiver): void {
  const tunable = receiver as unknown as { jitterBufferTarget?: number | null; playoutDelayHint?: number };
  try {
    if ("jitterBufferTarget" in tunable) tunable.jitterBufferTarget = 0;
    else if ("playoutDelayHint" in tunable) tunable.playoutDelayHint = 0; // older Chrome
  } catch {
    /* not supported here */
  }
}

/** Wait until ICE candidates are gathered (or `timeoutMs`: the offer goes with what it has). */
function gathered(pc: RTCPeerConnection, timeoutMs: number): Promise<void> {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(finish, timeoutMs);
    function finish(): void {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    }
    function check(): void {
      if (pc.iceGatheringState === "complete") finish();
    }
    pc.addEventListener("icegatheringstatechange", check);
  });
}
