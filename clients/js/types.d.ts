// Types of @runcast/client (runcast-client.js). The frames are those of
// docs/protocol.md; `tsc --noEmit` checks this file against the module.

export declare const VERSION: string;

/** How the client reaches the gateway. `auto`: WebSocket, SSE if upgrades are blocked. */
export type Transport = "auto" | "websocket" | "sse";

/** The client's connection, as a UI shows it. */
export type Status = "connecting" | "live" | "reconnecting" | "unauthorized" | "closed";

export interface StatusInfo {
  status: Status;
  /** The transport in use: `auto` settles on one of these. */
  transport: "websocket" | "sse";
  /** The WebSocket close code that caused a reconnect or a close. */
  code?: number;
  /** Why: the gateway's close reason, the 401's message, … */
  reason?: string;
  /** How long the client waits before the next attempt (reconnecting). */
  delayMs?: number;
}

export interface Backoff {
  /** The first wait's upper bound; it doubles per failed attempt. Default 100. */
  initialMs?: number;
  /** The largest upper bound. Default 5000. Every wait is uniformly random below the bound (full jitter). */
  maxMs?: number;
}

export interface ConnectOptions {
  /** A subscriber token (JWT). */
  token?: string;
  /**
   * Called for a token before connecting, when the gateway asks for a
   * refresh, and after a close with 4003 or a 401. A token it returns that
   * the gateway also refuses gives the `unauthorized` status: no loop.
   */
  getToken?: () => string | Promise<string>;
  /** Default `auto`. */
  transport?: Transport;
  backoff?: Backoff;
  /** An upgrade that has not opened by then counts as failed. Default 10000. */
  connectTimeoutMs?: number;
  /** How often the client sends `ping` frames; default: the gateway's heartbeat. */
  heartbeatMs?: number;
  /** A WebSocket constructor (default: the global one, else the `ws` package). */
  WebSocket?: any;
  /** A fetch function (default: the global one), used for SSE and probes. */
  fetch?: typeof fetch;
}

/** A run's state (docs/protocol.md, Run state). */
export interface RunState {
  run: string;
  seq: number;
  status: "running" | "completed" | "failed";
  events: number;
  started_ts: number;
  updated_ts: number;
  finished_ts?: number;
  percent?: number;
  progress?: unknown;
  last_status?: unknown;
  result?: unknown;
}

export interface StateFrame {
  type: "state";
  run: string;
  seq: number;
  state: RunState | null;
}

export interface EventFrame {
  type: "event";
  run: string;
  seq: number;
  kind: string;
  data: unknown;
  ts: number;
  traceparent?: string;
}

/** Events `from..=to` were dropped by retention and will never come. */
export interface GapFrame {
  type: "gap";
  run: string;
  from: number;
  to: number;
  message: string;
}

export interface ErrorFrame {
  type: "error";
  code: string;
  message: string;
  run?: string;
}

export interface Progress {
  done: number | null;
  total: number | null;
  /** 0..100, or null when the run has sent no progress yet. */
  percent: number | null;
  status: RunState["status"] | "waiting";
}

export interface SubscribeOptions {
  /** Resume after this seq (a cursor kept from earlier). */
  since?: number | null;
  /** The run's state: first on every (re)subscribe. */
  onState?: (state: RunState | null, frame: StateFrame) => void;
  /** Each event, exactly once, in order. */
  onEvent?: (event: EventFrame) => void;
  /** Events lost to retention. */
  onGap?: (gap: GapFrame) => void;
  /** Errors about this run; `forbidden` and final closes also end the subscription. */
  onError?: (error: RuncastError) => void;
  /** Events the async iterator may hold before the subscription ends with `slow_consumer`. Default 10000. */
  maxBuffered?: number;
}

export declare class RuncastError extends Error {
  constructor(code: string, message: string, run?: string);
  /** The protocol's error code (`forbidden`, `unauthorized`, …) or the client's (`slow_consumer`, `closed`). */
  code: string;
  run?: string;
}

export declare class Subscription implements AsyncIterable<EventFrame | GapFrame> {
  readonly run: string;
  /** The last seq processed: resume from here. */
  cursor: number | null;
  /** The state, kept current by every event. */
  state: RunState | null;
  ended: boolean;
  unsubscribe(): void;
  [Symbol.asyncIterator](): AsyncIterator<EventFrame | GapFrame>;
}

export declare class Client {
  status: Status;
  /** The transport in use now. */
  transport: "websocket" | "sse";
  /** Connections opened (WebSockets, or SSE streams). */
  connections: number;
  /** Reconnect attempts made. */
  reconnects: number;
  on(name: "status", fn: (info: StatusInfo) => void): () => void;
  on(name: "error", fn: (error: RuncastError) => void): () => void;
  on(name: "hello", fn: (hello: Record<string, unknown>) => void): () => void;
  /** The gateway asks for a fresh token before `expires` (seconds since the epoch). */
  on(name: "refresh", fn: (info: { expires: number }) => void): () => void;
  /** A token given to setToken() on a live connection was accepted. */
  on(name: "authenticated", fn: (info: { expires: number }) => void): () => void;
  subscribe(run: string, options?: SubscribeOptions): Subscription;
  /** A new token: sent in an `auth` frame when live, else used to start over. */
  setToken(token: string): void;
  close(): void;
}

export declare function connect(url: string | URL, options?: ConnectOptions): Client;
export declare function progress(state: RunState | null | undefined): Progress;
export declare function shouldResume(code: number): boolean;
export declare function backoffDelay(attempt: number, backoff: { initialMs: number; maxMs: number }, random?: () => number): number;

export declare class SseParser {
  push(chunk: string): string[];
}
