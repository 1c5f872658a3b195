// Typed errors: every failure the SDK reports is a WindflowError carrying a gRPC status
// (the bridge maps the gateway's status to HTTP statuses and WebSocket close codes).

/** gRPC status codes by name. */
export const Code = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  ALREADY_EXISTS: 6,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  OUT_OF_RANGE: 11,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  DATA_LOSS: 15,
  UNAUTHENTICATED: 16,
} as const;

export type CodeName = keyof typeof Code;

const NAMES = Object.fromEntries(Object.entries(Code).map(([name, code]) => [code, name])) as Record<
  number,
  CodeName
>;

/** The name of gRPC status `code` ("UNKNOWN" for a number that is none). */
export function codeName(code: number): CodeName {
  return NAMES[code] ?? "UNKNOWN";
}

/** The number of gRPC status `name` (UNKNOWN for a name that is none). */
export function codeOf(name: string): number {
  return (Code as Record<string, number>)[name] ?? Code.UNKNOWN;
}

/** WebSocket close code of a stream ended by gRPC status s: this + s (services/bridge/relay.py). */
export const CLOSE_STATUS_BASE = 4000;
/** WebSocket close code: a message that is not a ClientMessage. */
export const CLOSE_MALFORMED = 1007;
/** WebSocket close code: a message over the bridge's limit. */
export const CLOSE_TOO_BIG = 1009;

export interface WindflowErrorDetails {
  /** The HTTP status of a unary call's refusal. */
  httpStatus?: number;
  /** The WebSocket close code that ended a stream. */
  closeCode?: number;
}

/** A call or a stream refused or ended by the server (or lost on the way). */
export class WindflowError extends Error {
  /** The gRPC status code (Code.NOT_FOUND ...). */
  readonly code: number;
  /** Its name ("NOT_FOUND" ...). */
  readonly codeName: CodeName;
  readonly httpStatus: number | undefined;
  readonly closeCode: number | undefined;
  /** The server's message without the "CODE: " prefix. */
  readonly detail: string;

  constructor(code: number, message: string, details: WindflowErrorDetails = {}) {
    const name = codeName(code);
    super(`${name}: ${message}`);
    this.name = "WindflowError";
    this.code = code;
    this.codeName = name;
    this.httpStatus = details.httpStatus;
    this.closeCode = details.closeCode;
    this.detail = message;
  }
}

/** The status a WebSocket close code stands for (undefined: no status, a dropped socket). */
export function statusOfClose(closeCode: number): number | undefined {
  if (closeCode >= CLOSE_STATUS_BASE && closeCode < CLOSE_STATUS_BASE + 100) {
    return closeCode - CLOSE_STATUS_BASE;
  }
  if (closeCode === CLOSE_MALFORMED) return Code.INVALID_ARGUMENT;
  if (closeCode === CLOSE_TOO_BIG) return Code.RESOURCE_EXHAUSTED;
  return undefined;
}

/** The gRPC status an HTTP status stands for, where the body does not say (a proxy's error). */
export function statusOfHttp(status: number): number {
  switch (status) {
    case 400:
      return Code.INVALID_ARGUMENT;
    case 401:
      return Code.UNAUTHENTICATED;
    case 403:
      return Code.PERMISSION_DENIED;
    case 404:
      return Code.NOT_FOUND;
    case 409:
      return Code.FAILED_PRECONDITION;
    case 429:
      return Code.RESOURCE_EXHAUSTED;
    case 502:
    case 503:
    case 504:
      return Code.UNAVAILABLE;
    default:
      return Code.UNKNOWN;
  }
}
