// The bridge's API from a browser or Node 20: unary calls as HTTP JSON, a session's stream
// over a WebSocket (binary protobuf) or WebRTC (docs/browser.md).
import { create, fromJson, toJson, type JsonValue, type MessageInitShape } from "@bufbuild/protobuf";
import {
  CloseSessionResponseSchema,
  ListModelsResponseSchema,
  SessionSchema,
  SessionSpecSchema,
  type ModelInfo,
  type Session,
} from "./gen/windflow/v1/windflow_pb";
import { Code, WindflowError, codeOf, statusOfHttp } from "./errors";
import { StreamSession, type AttachOptions, type WebSocketConstructor } from "./stream";
import { WebRTCSession, type WebRTCOptions } from "./webrtc";

export interface ConnectOptions {
  /** The bridge's base address, e.g. "http://127.0.0.1:8080/" (a page: `location.origin`). */
  url: string;
  /** The session token (docs/access.md); none against a stack run with --insecure. */
  token?: string;
  /** The WebSocket class: default `globalThis.WebSocket` (a browser, Node 22+); in Node 20
   * pass the `ws` package's (`import { WebSocket } from "ws"`). */
  WebSocket?: WebSocketConstructor;
  /** The fetch function: default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** How long one HTTP call may take (ms; default 30000). */
  timeoutMs?: number;
}

export type SessionSpecInit = MessageInitShape<typeof SessionSpecSchema>;

const READ = { ignoreUnknownFields: true } as const;

/** A client of one bridge. */
export class WindflowClient {
  /** The bridge's base address, ending in "/". */
  readonly url: string;
  private readonly token: string;
  private readonly WebSocketClass: WebSocketConstructor | undefined;
  private readonly fetcher: typeof fetch;
  private readonly timeoutMs: number;

  constructor(options: ConnectOptions) {
    this.url = options.url.endsWith("/") ? options.url : `${options.url}/`;
    this.token = options.token ?? "";
    this.WebSocketClass =
      options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    const fetcher = options.fetch ?? globalThis.fetch;
    if (!fetcher) throw new Error("no fetch here: pass connect({ fetch })");
    this.fetcher = fetcher.bind(globalThis);
    this.timeoutMs = options.timeoutMs ?? 30_000;
  }

  /** The models the mesh serves now (ListModels). */
  async models(): Promise<ModelInfo[]> {
    const reply = await this.call("GET", "v1/models");
    return fromJson(ListModelsResponseSchema, reply, READ).models;
  }

  /** Create a session (CreateSession): `{ modelId, seed, format, ... }` (a SessionSpec). */
  async createSession(spec: SessionSpecInit): Promise<Session> {
    const body = toJson(SessionSpecSchema, create(SessionSpecSchema, spec));
    return fromJson(SessionSchema, await this.call("POST", "v1/sessions", body), READ);
  }

  async getSession(sessionId: string): Promise<Session> {
    return fromJson(SessionSchema, await this.call("GET", sessionPath(sessionId)), READ);
  }

  /** A new session that continues from frame `atFrame` of this one (Fork). */
  async fork(sessionId: string, atFrame: number | bigint): Promise<Session> {
    const body = { atFrame: String(atFrame) };
    return fromJson(SessionSchema, await this.call("POST", `${sessionPath(sessionId)}/fork`, body), READ);
  }

  /** The session goes on from frame `toFrame`; its log after that is dropped (Rewind). */
  async rewind(sessionId: string, toFrame: number | bigint): Promise<Session> {
    const body = { toFrame: String(toFrame) };
    return fromJson(SessionSchema, await this.call("POST", `${sessionPath(sessionId)}/rewind`, body), READ);
  }

  /** Close the session (CloseSession); returns it as it was closed. */
  async close(sessionId: string): Promise<Session> {
    const reply = await this.call("DELETE", sessionPath(sessionId));
    return fromJson(CloseSessionResponseSchema, { session: reply }, READ).session!;
  }

  /** Attach to a session's stream over a WebSocket; resolves once the server answered. */
  async attach(sessionId: string, options: AttachOptions = {}): Promise<StreamSession> {
    const WebSocketClass = this.WebSocketClass;
    if (!WebSocketClass) {
      throw new WindflowError(
        Code.UNIMPLEMENTED,
        "no WebSocket here: pass connect({ WebSocket }) (in Node 20, the ws package's)",
      );
    }
    const session = new StreamSession(this.streamUrl(), WebSocketClass, sessionId, options);
    await session.start();
    return session;
  }

  /** Attach over WebRTC (video track + "windflow" data channel); resolves once connected,
   * rejects (UNAVAILABLE) when ICE fails or it does not connect in time. */
  async attachWebRTC(sessionId: string, options: WebRTCOptions = {}): Promise<WebRTCSession> {
    const session = new WebRTCSession(sessionId, options, (offer) =>
      this.call("POST", `${sessionPath(sessionId)}/webrtc`, offer, true),
    );
    await session.start();
    return session;
  }

  /** The WebSocket address of the stream (the token in its query: a browser cannot set
   * the Authorization header on a WebSocket). */
  streamUrl(): string {
    const url = new URL("v1/stream", this.url);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    if (this.token) url.searchParams.set("token", this.token);
    return url.toString();
  }

  private async call(
    method: string,
    path: string,
    body?: JsonValue,
    tokenInQuery = false,
  ): Promise<JsonValue> {
    const url = new URL(path, this.url);
    const headers: Record<string, string> = { Accept: "application/json" };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (this.token && tokenInQuery) url.searchParams.set("token", this.token);
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let reply: Response;
    try {
      reply = await this.fetcher(url, {
        method,
        headers,
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
        ...(typeof AbortSignal.timeout === "function"
          ? { signal: AbortSignal.timeout(this.timeoutMs) }
          : {}),
      });
    } catch (error) {
      const timedOut = error instanceof Error && error.name === "TimeoutError";
      throw new WindflowError(
        timedOut ? Code.DEADLINE_EXCEEDED : Code.UNAVAILABLE,
        `${method} ${url.pathname}: ${error instanceof Error ? error.message : String(error)}`,
      );
    }
    const text = await reply.text();
    let parsed: JsonValue | undefined;
    try {
      parsed = text ? (JSON.parse(text) as JsonValue) : undefined;
    } catch {
      parsed = undefined;
    }
    if (!reply.ok) {
      const refusal = isObject(parsed) ? parsed : {};
      const code =
        typeof refusal.code === "string" ? codeOf(refusal.code) : statusOfHttp(reply.status);
      const message =
        typeof refusal.message === "string" ? refusal.message : text || reply.statusText;
      throw new WindflowError(code, message, { httpStatus: reply.status });
    }
    if (parsed === undefined) {
      throw new WindflowError(Code.INTERNAL, `${method} ${url.pathname}: not JSON: ${text.slice(0, 80)}`);
    }
    return parsed;
  }
}

/** A client of the bridge at `options.url`. */
export function connect(options: ConnectOptions): WindflowClient {
  return new WindflowClient(options);
}

function sessionPath(sessionId: string): string {
  return `v1/sessions/${encodeURIComponent(sessionId)}`;
}

function isObject(value: JsonValue | undefined): value is { [key: string]: JsonValue } {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
