// @windflow/sdk: the Windflow browser bridge's API for browsers and Node 20 (docs/browser.md,
// "TypeScript SDK").
export { connect, WindflowClient, type ConnectOptions, type SessionSpecInit } from "./client";
export {
  StreamSession,
  RESUME_TIMEOUT_MS,
  retryDelayMs,
  type AttachOptions,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./stream";
export { WebRTCSession, DATA_CHANNEL_LABEL, type WebRTCOptions } from "./webrtc";
export {
  Code,
  WindflowError,
  codeName,
  codeOf,
  statusOfClose,
  CLOSE_STATUS_BASE,
  type CodeName,
} from "./errors";
export {
  MAX_MESSAGE_BYTES,
  PendingControls,
  nowUs,
  type ControlInput,
  type InputFrameInput,
  type RoleName,
} from "./state";
export * from "./gen/windflow/v1/windflow_pb";
