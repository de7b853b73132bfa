// @runcast/client: the browser and Node client for runcast gateways.
//
// One plain ES module with JSDoc types and no runtime dependencies, so the
// gateway serves this very file at /v1/client.js and a page can import it
// with no bundler. It implements docs/protocol.md, "Writing a client that
// loses nothing": a cursor per run, resume with `since` after every
// reconnect, gaps surfaced, close codes obeyed, tokens refreshed.
//
// Types: types.d.ts, checked against this file by `tsc --noEmit` (test/types.ts).

/** @typedef {import('./types.js').ConnectOptions} ConnectOptions */
/** @typedef {import('./types.js').SubscribeOptions} SubscribeOptions */
/** @typedef {import('./types.js').Status} Status */
/** @typedef {import('./types.js').StatusInfo} StatusInfo */
/** @typedef {import('./types.js').RunState} RunState */
/** @typedef {import('./types.js').EventFrame} EventFrame */
/** @typedef {import('./types.js').GapFrame} GapFrame */
/** @typedef {import('./types.js').StateFrame} StateFrame */
/** @typedef {import('./types.js').ErrorFrame} ErrorFrame */
/** @typedef {import('./types.js').Progress} Progress */
/** @typedef {import('./types.js').Transport} Transport */

export const VERSION = "0.1.0";

/** Run IDs become NATS subject tokens (docs/protocol.md, Concepts). */
const RUN_ID = /^[A-Za-z0-9_-]{1,128}$/;
/**
 * A JWT is three base64url parts. Checked before use: a WebSocket
 * subprotocol may hold only these characters, and anything else makes
 * `new WebSocket` throw instead of failing in a way we can report.
 */
const JWT = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;
/**
 * An SSE line longer than this cannot be a frame the gateway sent (its
 * publish limit is 1 MiB by default, escaped JSON at most doubles it): the
 * stream is cut and resumed rather than buffered without bound.
 */
const MAX_SSE_LINE = 4 * 1024 * 1024;
/** Error codes that refuse a subscribe: the subscription ends with them. */
const ENDS_SUBSCRIPTION = new Set(["forbidden", "invalid_run_id", "invalid_since", "since_out_of_range", "too_many_subscriptions"]);
/**
 * An option that is a duration in ms: a finite number of at least `min`.
 * @param {string} name
 * @param {unknown} value
 * @param {number} fallback
 * @param {number} min
 */
function duration(name, value, fallback, min) {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== "number" || !Number.isFinite(value) || value < min)
    throw new RuncastError("invalid_option", `${name} is a number of milliseconds, at least ${min}, not ${String(value)}`);
  return value;
}

/**
 * A message for anything thrown (getToken may throw null, a string, ...).
 * @param {unknown} e
 */
function why(e) {
  if (e && typeof e === "object" && "message" in e) return String(/** @type {any} */ (e).message);
  return String(e);
}

/**
 * A promise that rejects after `ms`: getToken() and probes that never
 * answer must not stall the client forever.
 * @template T
 * @param {Promise<T> | T} p
 * @param {number} ms
 * @param {string} what
 * @returns {Promise<T>}
 */
function within(p, ms, what) {
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let t;
  const timeout = new Promise((_, reject) => { t = setTimeout(() => reject(new Error(`${what} did not answer within ${ms} ms`)), ms); });
  return /** @type {Promise<T>} */ (Promise.race([p, timeout]).finally(() => clearTimeout(t)));
}

/**
 * The `exp` claim of a JWT, read only to pace refreshes (the gateway
 * checks the token; the client never trusts this for anything else).
 * @param {string} token
 * @returns {number | null}
 */
function expOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4))).exp;
    return typeof exp === "number" ? exp : null;
  } catch (e) {
    return null;
  }
}

/** A connection that stayed live this long resets the reconnect backoff. */
const STABLE_MS = 5000;

/** Upgrades that fail while plain HTTP works, before `auto` uses SSE. */
const BLOCKED_UPGRADES_BEFORE_SSE = 2;

/**
 * Whether a WebSocket close code means "reconnect and resume"
 * (docs/protocol.md, Close codes). 4003 is resumable too, with a fresh token.
 * @param {number} code
 */
export function shouldResume(code) {
  if (code >= 4000 && code < 4400) return true;
  if (code >= 4400 && code < 5000) return false;
  return ![1000, 1003, 1007, 1008, 1009, 1010].includes(code);
}

/**
 * What a progress bar needs from a run state: done and total when the
 * publisher sent them, and a percent from either form of progress data.
 * @param {RunState | null | undefined} state
 * @returns {Progress}
 */
export function progress(state) {
  const p = state && typeof state.progress === "object" && state.progress !== null ? state.progress : null;
  const num = (/** @type {unknown} */ v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  const done = p ? num(/** @type {any} */ (p).done) : null;
  const total = p ? num(/** @type {any} */ (p).total) : null;
  let percent = state ? num(state.percent) : null;
  if (percent === null) percent = percentOf(p);
  if (state && state.status === "completed") percent = 100;
  if (percent !== null) percent = Math.max(0, Math.min(100, percent));
  return { done, total, percent, status: state ? state.status : "waiting" };
}

/**
 * A percent from progress data: `{percent}` or `{done, total}`.
 * @param {unknown} data
 * @returns {number | null}
 */
function percentOf(data) {
  if (!data || typeof data !== "object") return null;
  const d = /** @type {any} */ (data);
  if (typeof d.percent === "number" && Number.isFinite(d.percent)) return Math.max(0, Math.min(100, d.percent));
  if (typeof d.done === "number" && typeof d.total === "number" && d.total > 0)
    return Math.max(0, Math.min(100, (100 * d.done) / d.total));
  return null;
}

/**
 * Full jitter: a uniformly random wait up to the exponential bound, so a
 * fleet of clients dropped at once does not come back at once.
 * @param {number} attempt
 * @param {{ initialMs: number, maxMs: number }} backoff
 * @param {() => number} random
 */
export function backoffDelay(attempt, backoff, random = Math.random) {
  const cap = Math.min(backoff.maxMs, backoff.initialMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/** An error carrying the protocol's error code. */
export class RuncastError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {string} [run]
   */
  constructor(code, message, run) {
    super(message);
    this.name = "RuncastError";
    this.code = code;
    this.run = run;
  }
}

/**
 * Connects to a gateway. Nothing is sent until the first subscribe, except
 * the connection itself: subscriptions made before it opens are sent when it
 * does.
 * @param {string | URL} url the gateway's base URL (http, https, ws or wss;
 *   relative URLs are resolved against the page's location)
 * @param {ConnectOptions} [options]
 * @returns {Client}
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}

/**
 * @param {string | URL} url
 * @returns {URL}
 */
function baseUrl(url) {
  const loc = typeof location !== "undefined" ? location.href : undefined;
  const u = new URL(String(url), loc);
  if (u.protocol === "ws:") u.protocol = "http:";
  if (u.protocol === "wss:") u.protocol = "https:";
  if (u.protocol !== "http:" && u.protocol !== "https:")
    throw new RuncastError("invalid_url", `a gateway URL is http, https, ws or wss, not ${u.protocol}`);
  if (!u.pathname.endsWith("/")) u.pathname += "/";
  u.search = "";
  u.hash = "";
  return u;
}

export class Client {
  /**
   * @param {string | URL} url
   * @param {ConnectOptions} options
   */
  constructor(url, options) {
    this.base = baseUrl(url);
    /** @type {Transport} */
    this.requested = options.transport || "auto";
    if (!["auto", "websocket", "sse"].includes(this.requested))
      throw new RuncastError("invalid_option", `transport is auto, websocket or sse, not ${this.requested}`);
    /** @type {"websocket" | "sse"} */
    this.transport = this.requested === "sse" ? "sse" : "websocket";
    this.options = options;
    this.backoff = {
      initialMs: duration("backoff.initialMs", options.backoff?.initialMs, 100, 1),
      maxMs: duration("backoff.maxMs", options.backoff?.maxMs, 5000, 1),
    };
    this.connectTimeoutMs = duration("connectTimeoutMs", options.connectTimeoutMs, 10000, 100);
    /** Over SSE there is no hello to say the gateway's heartbeat interval. */
    this.heartbeatMs = options.heartbeatMs === undefined ? null : duration("heartbeatMs", options.heartbeatMs, 20000, 100);
    /** @type {string | null} */
    this.token = options.token || null;
    /** @type {Map<string, Subscription>} */
    this.subs = new Map();
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map();
    /** @type {Status} */
    this.status = "connecting";
    /** @type {any} */
    this.ws = null;
    this.attempt = 0;
    this.blockedUpgrades = 0;
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.timer = null;
    /** @type {ReturnType<typeof setInterval> | null} */
    this.heartbeat = null;
    this.closed = false;
    /** A token sent in an `auth` frame, until the gateway accepts it. */
    /** @type {string | null} */
    this.offered = null;
    /** @type {any} */
    this.hello = null;
    /** How many times the client has (re)connected, for tests and UIs. */
    this.connections = 0;
    this.reconnects = 0;
    /** The next connection asks getToken() first (after 4003 or a 401). */
    this.needFreshToken = false;
    /** getToken() was asked once after a 401: a second 401 is final. */
    this.retriedToken = false;
    this.lastHeard = 0;
    /**
     * Unsubscribes sent on this connection and not answered yet, per run:
     * their `unsubscribed` answers are not about a later subscription.
     * @type {Map<string, number>}
     */
    this.unsubscribing = new Map();
    /** When the current connection (or SSE stream) became live. */
    this.liveSince = 0;
    /** A refresh is being answered; when the last one was. */
    this.refreshing = false;
    this.lastRefresh = 0;
    /** A WebSocket has worked here: later failures are no reason for SSE. */
    this.websocketWorked = false;
    // Started after the caller's code has run, so that listeners attached
    // right after connect() see every status, the first one included.
    queueMicrotask(() => {
      if (this.token !== null && !JWT.test(this.token)) {
        this.token = null;
        this.refuse("the token is not a JWT (three base64url parts separated by dots)");
        return;
      }
      this.start();
    });
  }

  /**
   * Listens to `status` (connecting, live, reconnecting, unauthorized,
   * closed), `error` (errors no subscription owns), `hello`, `refresh` (the
   * token expires soon) or `authenticated` (a token from an `auth` frame
   * was accepted).
   * @param {"status" | "error" | "hello" | "refresh" | "authenticated"} name
   * @param {(arg: any) => void} fn
   * @returns {() => void} removes the listener
   */
  on(name, fn) {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(fn);
    return () => set?.delete(fn);
  }

  /**
   * @param {string} name
   * @param {any} arg
   */
  emit(name, arg) {
    for (const fn of [...(this.listeners.get(name) || [])]) {
      try {
        fn(arg);
      } catch (e) {
        // A listener's bug must not stop delivery to the others.
        console.error("runcast: listener failed", e);
      }
    }
  }

  /**
   * @param {Status} status
   * @param {Partial<StatusInfo>} [info]
   */
  setStatus(status, info = {}) {
    this.status = status;
    this.emit("status", { status, transport: this.transport, ...info });
  }

  /**
   * Follows a run: its state first, then every event after it, exactly once
   * and in order, across reconnects.
   * @param {string} run
   * @param {SubscribeOptions} [options]
   * @returns {Subscription}
   */
  subscribe(run, options = {}) {
    if (typeof run !== "string" || !RUN_ID.test(run))
      throw new RuncastError("invalid_run_id", `run IDs are 1-128 characters of A-Z, a-z, 0-9, '_' and '-': ${JSON.stringify(run)}`, String(run));
    if (this.subs.has(run)) throw new RuncastError("already_subscribed", `already subscribed to ${run}`, run);
    if (this.closed) throw new RuncastError("closed", "the client is closed", run);
    const since = options.since;
    if (since !== undefined && since !== null && !(Number.isSafeInteger(since) && since >= 0))
      throw new RuncastError("invalid_since", `since is a non-negative integer, not ${since}`, run);
    const sub = new Subscription(this, run, options);
    this.subs.set(run, sub);
    if (this.transport === "sse") this.stream(sub);
    else this.sendSubscribe(sub);
    return sub;
  }

  /** @param {Subscription} sub */
  sendSubscribe(sub) {
    if (!this.ws || !this.hello || this.ws.readyState !== 1) return; // sent on the next hello
    /** @type {Record<string, unknown>} */
    const frame = { type: "subscribe", run: sub.run };
    if (sub.cursor !== null) frame.since = sub.cursor;
    this.send(frame);
  }

  /** @param {Subscription} sub */
  drop(sub) {
    if (this.subs.get(sub.run) !== sub) return;
    this.subs.delete(sub.run);
    if (sub.abort) sub.abort.abort();
    if (this.transport === "websocket" && this.ws && this.hello && this.ws.readyState === 1) {
      this.unsubscribing.set(sub.run, (this.unsubscribing.get(sub.run) || 0) + 1);
      this.send({ type: "unsubscribe", run: sub.run });
    }
  }

  /** @param {Record<string, unknown>} frame */
  send(frame) {
    try {
      this.ws.send(JSON.stringify(frame));
    } catch (e) {
      // The socket is closing; its close handler reconnects and resubscribes.
    }
  }

  /** Stops everything; subscriptions end. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.stopTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) ws.close(1000);
    for (const sub of [...this.subs.values()]) sub.end(null);
    this.subs.clear();
    this.setStatus("closed", { reason: "closed by the client" });
  }

  /**
   * A new token, e.g. after `unauthorized`. On a live WebSocket it goes in
   * an `auth` frame (subscriptions go on without a gap); otherwise the
   * client starts over with it and resumes every run from its cursor.
   * @param {string} token
   */
  setToken(token) {
    if (!JWT.test(token)) throw new RuncastError("unauthorized", "the token is not a JWT (three base64url parts separated by dots)");
    if (this.closed) return;
    if (this.status === "live" && this.transport === "websocket" && this.ws) {
      this.offered = token;
      this.send({ type: "auth", token });
      return;
    }
    this.token = token;
    if (this.status === "unauthorized") {
      this.attempt = 0;
      this.start();
    }
  }

  stopTimers() {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
  }

  start() {
    if (this.closed) return;
    if (this.transport === "sse") {
      this.setStatus("connecting");
      // Runs subscribed before this start already stream.
      for (const sub of this.subs.values()) if (!sub.abort || sub.abort.signal.aborted) this.stream(sub);
      return;
    }
    this.open().catch((e) => this.fail(String(e && e.message ? e.message : e)));
  }

  /**
   * Asks for a token: `getToken()` when given, else the static one.
   * @returns {Promise<string | null>}
   */
  async freshToken() {
    if (!this.options.getToken) return this.token;
    const t = await within(this.options.getToken(), this.connectTimeoutMs, "getToken()");
    if (typeof t !== "string" || !JWT.test(t)) throw new RuncastError("unauthorized", "getToken() did not return a JWT");
    this.token = t;
    return t;
  }

  /** The WebSocket constructor: an option, the global one, or Node's `ws`. */
  async socketClass() {
    if (this.options.WebSocket) return this.options.WebSocket;
    if (typeof WebSocket !== "undefined") return WebSocket;
    try {
      // Node 20 has no global WebSocket; `ws` is an optional peer dependency.
      // The name is in a variable so bundlers do not pull `ws` into a
      // browser build.
      const name = "ws";
      const mod = await import(name);
      return mod.WebSocket || mod.default;
    } catch (e) {
      throw new RuncastError("no_websocket", "no WebSocket here: install the optional peer `ws`, pass options.WebSocket, or use transport: 'sse'");
    }
  }

  async open() {
    this.stopTimers();
    if (this.closed) return;
    if (this.status !== "reconnecting") this.setStatus("connecting");
    if (this.options.getToken && (this.token === null || this.needFreshToken)) {
      this.needFreshToken = false;
      try {
        await this.freshToken();
      } catch (e) {
        // A token that is not a JWT will not become one: stop. A getToken()
        // that failed (a network error at the token endpoint, a timeout)
        // may work next time: retry with backoff, asking again.
        if (e instanceof RuncastError) return this.refuse(e.message);
        this.needFreshToken = true;
        this.emit("error", new RuncastError("token", `getToken() failed: ${why(e)}`));
        return this.retry({ reason: `getToken() failed: ${why(e)}` });
      }
    }
    const Socket = await this.socketClass();
    if (this.closed) return;
    const u = new URL("v1/ws", this.base);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    // A browser cannot set headers on a WebSocket: the token travels as a
    // subprotocol, and the gateway selects runcast.v1 so it is not echoed.
    const protocols = this.token ? ["runcast.v1", `runcast.bearer.${this.token}`] : ["runcast.v1"];
    const ws = new Socket(u.href, protocols);
    this.ws = ws;
    this.hello = null;
    let opened = false;
    // An upgrade that neither opens nor fails (a proxy holding it), or
    // opens but never says hello, counts as failed after connectTimeoutMs.
    this.timer = setTimeout(() => {
      if (this.ws === ws && !this.hello) {
        try { ws.close(); } catch (e) { /* not open yet */ }
        this.onClose(ws, opened, 1006, opened ? "the gateway sent no hello in time" : "the WebSocket did not open in time");
      }
    }, this.connectTimeoutMs);
    ws.onopen = () => {
      if (this.ws !== ws) return;
      opened = true;
    };
    ws.onmessage = (/** @type {{ data: any }} */ m) => {
      if (this.ws !== ws) return;
      this.lastHeard = Date.now();
      let f;
      try {
        f = JSON.parse(typeof m.data === "string" ? m.data : String(m.data));
      } catch (e) {
        this.emit("error", new RuncastError("invalid_json", "the gateway sent a frame that is not JSON"));
        return;
      }
      this.onFrame(f);
    };
    ws.onclose = (/** @type {{ code: number, reason: string }} */ e) => this.onClose(ws, opened, e.code, e.reason);
    // Errors are followed by a close event, which decides what to do.
    ws.onerror = () => {};
  }

  /**
   * @param {any} ws
   * @param {boolean} opened
   * @param {number} code
   * @param {string} reason
   */
  async onClose(ws, opened, code, reason) {
    if (this.ws !== ws) return; // replaced, or given up on
    this.ws = null;
    const wasLive = this.hello !== null;
    this.hello = null;
    this.stopTimers();
    if (this.closed) return;
    // The backoff starts over only after a connection that held: one that
    // is closed right after its hello (a token about to expire, a gateway
    // that keeps failing) must not reconnect in a tight loop.
    if (wasLive && Date.now() - this.liveSince >= STABLE_MS) this.attempt = 0;
    if (code === 4003) {
      // The token expired before a fresh one came: reconnect with a new one.
      if (!this.options.getToken) return this.refuse("the token expired");
      this.needFreshToken = true;
      return this.retry({ code, reason });
    }
    if (!shouldResume(code)) {
      this.setStatus("closed", { code, reason: reason || `closed by the gateway (${code})` });
      this.closed = true;
      for (const sub of [...this.subs.values()]) sub.end(new RuncastError("closed", `the gateway closed the connection (${code}) ${reason}`, sub.run));
      this.subs.clear();
      return;
    }
    if (!opened) {
      // A browser sees a refused upgrade (401, 426, 429, 503) only as a
      // close before open, without the status: ask plain HTTP why.
      const probe = await this.probe();
      if (this.closed || this.ws) return;
      if (probe.status === 401) {
        if (this.options.getToken && !this.retriedToken) {
          this.retriedToken = true;
          this.needFreshToken = true;
          return this.retry({ code, reason: probe.message });
        }
        return this.refuse(probe.message);
      }
      // HTTP gets through, WebSockets time after time do not: something in
      // between (a proxy that drops Upgrade) blocks them. Use SSE.
      // A gateway that is not ready (503) refused the upgrade itself: that
      // is no reason to leave WebSockets, only to retry (elsewhere).
      // Nor is any failure once a WebSocket has worked from here: the path
      // carries WebSockets, so this is a refusal (429, a restart), not a proxy.
      if (probe.reachable && probe.status !== 503 && !this.websocketWorked && ++this.blockedUpgrades >= BLOCKED_UPGRADES_BEFORE_SSE && this.requested === "auto")
        return this.fallBack("WebSocket upgrades fail while HTTP works (refused, stripped by a proxy, or timed out)");
    }
    // 1001 is a reconnect hint (drain, rebalance): the gateway already
    // paced it, so go to another gateway now rather than after a backoff.
    this.retry({ code, reason, immediate: wasLive && code === 1001 });
  }

  /**
   * Why an upgrade failed, asked over plain HTTP with the same token: 401
   * (the token), or whether the gateway answers HTTP at all.
   * @returns {Promise<{status: number, reachable: boolean, message: string}>}
   */
  async probe() {
    try {
      const res = await within(this.fetch("v1/runs?limit=1"), this.connectTimeoutMs, "the gateway");
      if (res.status === 401) return { status: 401, reachable: true, message: await reasonOf(res) };
      // A draining gateway (or one whose bus is down) refuses upgrades with
      // 503 but still serves reads: its readiness says so.
      const ready = await within(this.fetch("readyz"), this.connectTimeoutMs, "the gateway");
      if (ready.status === 503) return { status: 503, reachable: true, message: await reasonOf(ready) };
      return { status: res.status, reachable: true, message: "" };
    } catch (e) {
      return { status: 0, reachable: false, message: String(e) };
    }
  }

  /**
   * A fetch against the gateway, with the token as a bearer header.
   * @param {string} path relative to the base URL
   * @param {{ signal?: AbortSignal, headers?: Record<string, string> }} [init]
   */
  fetch(path, init = {}) {
    const f = this.options.fetch || globalThis.fetch;
    /** @type {Record<string, string>} */
    const headers = { ...(init.headers || {}) };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    return f(new URL(path, this.base).href, { headers, signal: init.signal, cache: "no-store" });
  }

  /** @param {string} why */
  fallBack(why) {
    this.transport = "sse";
    this.emit("error", new RuncastError("fallback", `using SSE: ${why}`));
    this.attempt = 0;
    this.start();
  }

  /**
   * @param {{ code?: number, reason?: string, immediate?: boolean }} info
   */
  retry({ code, reason, immediate }) {
    if (this.closed) return;
    const delayMs = immediate ? 0 : backoffDelay(this.attempt++, this.backoff);
    this.reconnects++;
    this.setStatus("reconnecting", { code, reason, delayMs });
    this.timer = setTimeout(() => this.start(), delayMs);
  }

  /**
   * The gateway will not let this token (or no token) in. Every retry would
   * fail the same way, and a loop of 401s only loads the gateway: stop, say
   * so, and wait for setToken().
   * @param {string} message
   */
  refuse(message) {
    this.stopTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) try { ws.close(1000); } catch (e) { /* already closed */ }
    for (const sub of this.subs.values()) if (sub.abort) sub.abort.abort();
    this.setStatus("unauthorized", { reason: message });
  }

  /** @param {string} message */
  fail(message) {
    this.emit("error", new RuncastError("client", message));
    this.retry({ reason: message });
  }

  /** @param {any} f */
  onFrame(f) {
    if (!f || typeof f !== "object") return;
    const sub = typeof f.run === "string" ? this.subs.get(f.run) : undefined;
    switch (f.type) {
      case "hello":
        this.hello = f;
        // A new connection: unsubscribes sent on the old one get no answer.
        this.unsubscribing.clear();
        this.connections++;
        this.liveSince = Date.now();
        this.websocketWorked = true;
        if (this.timer) clearTimeout(this.timer);
        this.timer = null;
        this.blockedUpgrades = 0;
        this.retriedToken = false;
        this.emit("hello", f);
        this.setStatus("live");
        this.startHeartbeat(f.heartbeat_ms);
        for (const s of this.subs.values()) this.sendSubscribe(s);
        return;
      case "state":
      case "event":
      case "gap":
        // Until the gateway answers an unsubscribe, frames of that run are
        // the old subscription's (in flight when it ended): a new one on
        // the same run starts with its own state, after the answer.
        if (this.unsubscribing.has(f.run)) return;
        if (sub) sub.onFrame(f);
        return;
      case "unsubscribed":
        // The answer to one of the client's own unsubscribes: that
        // subscription is gone already, and the run may have been
        // subscribed again since (resubscribing from the cursor).
        if (this.answered(f.run)) return;
        // Otherwise the gateway dropped a run a new token does not cover.
        if (sub) sub.end(new RuncastError("forbidden", "the new token does not cover this run", sub.run));
        return;
      case "error":
        // An unsubscribe after a refused subscribe (forbidden, ...) is
        // answered not_subscribed: nothing to report.
        if (f.code === "not_subscribed" && this.answered(f.run)) return;
        if (f.run && sub) {
          const err = new RuncastError(f.code, f.message, f.run);
          // A refused subscribe ends the subscription (onError once, with
          // the reason); other errors about the run leave it going.
          if (ENDS_SUBSCRIPTION.has(f.code)) sub.end(err);
          else sub.error(err);
        } else if (f.code === "unauthorized" && this.offered !== null) {
          // The token of an `auth` frame was refused; the old one holds
          // until its exp (then 4003, and getToken() is asked again).
          this.offered = null;
          this.emit("error", new RuncastError("unauthorized", f.message));
        } else {
          this.emit("error", new RuncastError(f.code || "error", f.message || "error frame"));
        }
        return;
      case "refresh":
        this.emit("refresh", { expires: f.expires });
        this.refresh(f.expires);
        return;
      case "authenticated":
        if (this.offered !== null) this.token = this.offered;
        this.offered = null;
        this.emit("authenticated", { expires: f.expires });
        return;
      case "pong":
        return;
      default:
        // Newer gateways may add frames; an old client ignores them.
        return;
    }
  }

  /**
   * Whether a frame about `run` answers one of the client's own
   * unsubscribes on this connection (and counts it answered).
   * @param {unknown} run
   */
  answered(run) {
    const pending = typeof run === "string" ? this.unsubscribing.get(run) || 0 : 0;
    if (pending === 0) return false;
    if (pending > 1) this.unsubscribing.set(/** @type {string} */ (run), pending - 1);
    else this.unsubscribing.delete(/** @type {string} */ (run));
    return true;
  }

  /**
   * Answers a `refresh` frame with a fresh token from getToken(). One at a
   * time and at most one a second, and only with a token that outlives the
   * current one (`expires`): a cached token sent back, or tokens as short
   * as the refresh window, would otherwise make gateway and client trade
   * refresh and auth frames in a tight loop.
   * @param {unknown} expires
   */
  async refresh(expires) {
    // Without getToken() the application renews with setToken(), after
    // the "refresh" event; at exp the gateway closes with 4003.
    if (!this.options.getToken || this.refreshing) return;
    this.refreshing = true;
    const ws = this.ws;
    try {
      const wait = this.lastRefresh + 1000 - Date.now();
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      this.lastRefresh = Date.now();
      if (this.ws !== ws || !ws) return;
      const t = await within(this.options.getToken(), this.connectTimeoutMs, "getToken()");
      if (typeof t !== "string" || !JWT.test(t)) throw new Error("getToken() did not return a JWT");
      if (this.ws !== ws || !ws) return;
      const exp = expOf(t);
      if (exp !== null && typeof expires === "number" && exp <= expires) {
        this.emit("error", new RuncastError("token_not_renewed", `getToken() returned a token that expires no later than the current one (${exp}); at ${expires} the gateway closes the connection and the client reconnects with a new token`));
        return;
      }
      this.offered = t;
      this.send({ type: "auth", token: t });
    } catch (e) {
      this.emit("error", new RuncastError("token", `getToken() failed: ${why(e)}`));
    } finally {
      this.refreshing = false;
    }
  }

  /**
   * Browsers cannot see WebSocket pings, so a connection that died without
   * a close (a cut cable, a frozen proxy) is found with `ping` frames: no
   * frame at all for a heartbeat interval after one means it is gone.
   * @param {number} heartbeatMs
   */
  startHeartbeat(heartbeatMs) {
    const every = this.heartbeatMs ?? (Number.isFinite(heartbeatMs) && heartbeatMs >= 100 ? heartbeatMs : 20000);
    const ws = this.ws;
    this.lastHeard = Date.now();
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = setInterval(() => {
      if (this.ws !== ws) return;
      if (Date.now() - this.lastHeard > 2 * every) {
        try { ws.close(4001); } catch (e) { /* gone already */ }
        this.onClose(ws, true, 4001, "no frame from the gateway for two heartbeat intervals");
        return;
      }
      this.send({ type: "ping" });
    }, every);
  }

  // ---------------------------------------------------------------- SSE

  /**
   * Streams one run over SSE (one run per stream: docs/protocol.md). Read
   * with fetch, not EventSource, so the client sees the HTTP status (a 401
   * is not a reason to retry), sends the token as a header rather than in
   * the URL, and resumes from its own cursor.
   * @param {Subscription} sub
   */
  async stream(sub) {
    if (sub.abort) sub.abort.abort();
    const abort = new AbortController();
    sub.abort = abort;
    let attempt = 0;
    let tokenRetried = false;
    while (!this.closed && this.subs.get(sub.run) === sub && !abort.signal.aborted) {
      if (this.status === "unauthorized") return;
      /** @type {Response | null} */
      let res = null;
      let failure = "the stream ended";
      // Aborted by the subscription's end, or when the gateway has not
      // answered within connectTimeoutMs (a held connection).
      const request = new AbortController();
      const onAbort = () => request.abort();
      abort.signal.addEventListener("abort", onAbort);
      const timer = setTimeout(() => request.abort(), this.connectTimeoutMs);
      try {
        if (this.options.getToken && (this.token === null || this.needFreshToken)) {
          this.needFreshToken = false;
          await this.freshToken();
        }
        const q = sub.cursor !== null ? `?since=${sub.cursor}` : "";
        res = await this.fetch(`v1/runs/${sub.run}/stream${q}`, { signal: request.signal, headers: { Accept: "text/event-stream" } });
      } catch (e) {
        if (abort.signal.aborted) return;
        // A token that is not a JWT will not become one; any other failure
        // (network, a timeout, getToken() failing) is retried.
        if (e instanceof RuncastError && e.code === "unauthorized") return this.refuse(e.message);
        if (this.options.getToken && this.token === null) this.needFreshToken = true;
        failure = why(e);
      } finally {
        clearTimeout(timer);
      }
      if (res && res.status === 200 && res.body) {
        tokenRetried = false;
        this.connections++;
        const opened = Date.now();
        if (this.status !== "live") this.setStatus("live");
        let end;
        try {
          end = await this.readStream(sub, res.body, request);
        } catch (e) {
          end = null;
        }
        abort.signal.removeEventListener("abort", onAbort);
        if (abort.signal.aborted || this.subs.get(sub.run) !== sub) return;
        // As over WebSockets, the backoff starts over only after a stream
        // that held.
        if (Date.now() - opened >= STABLE_MS) attempt = 0;
        if (end === "expired") {
          if (!this.options.getToken) return this.refuse("the token expired");
          this.needFreshToken = true;
          failure = "the token expired";
        } else if (end === "silent") failure = "no heartbeat from the gateway";
      } else if (res && res.status === 401) {
        abort.signal.removeEventListener("abort", onAbort);
        const message = await reasonOf(res);
        if (this.options.getToken && !tokenRetried) {
          tokenRetried = true;
          this.needFreshToken = true;
          continue;
        }
        return this.refuse(message);
      } else if (res && res.status >= 400 && res.status < 500 && res.status !== 408 && res.status !== 429) {
        abort.signal.removeEventListener("abort", onAbort);
        const body = await errorOf(res);
        sub.end(new RuncastError(body.code, body.message, sub.run));
        return;
      } else {
        abort.signal.removeEventListener("abort", onAbort);
        if (res) failure = `HTTP ${res.status}`;
        // A refusal's body is not needed; release the connection.
        if (res && res.body) res.body.cancel().catch(() => {});
      }
      // A stream that ended (drain, slow consumer, a dead gateway, an
      // expired token) or a refusal worth retrying (429, 503): back off,
      // then resume.
      const delayMs = backoffDelay(attempt++, this.backoff);
      this.reconnects++;
      this.setStatus("reconnecting", { delayMs, reason: failure });
      await sleep(delayMs, abort.signal);
    }
  }

  /**
   * Reads an SSE body until it ends. Returns "expired" when the gateway
   * ended the stream because the token expired, "silent" when nothing (not
   * even a heartbeat comment) came for two heartbeat intervals: a stream
   * frozen somewhere on the way, which would otherwise look live forever.
   * @param {Subscription} sub
   * @param {ReadableStream<Uint8Array>} body
   * @param {AbortController} request aborts the fetch (and so the body)
   */
  async readStream(sub, body, request) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser();
    /** @type {string | null} */
    let ended = null;
    // SSE has no hello to announce the gateway's heartbeat interval: the
    // option, or the protocol's default (20 s).
    const every = this.heartbeatMs ?? 20000;
    let heard = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - heard > 2 * every) {
        ended = "silent";
        request.abort();
        reader.cancel().catch(() => {});
      }
    }, Math.min(every, 5000));
    const onAbort = () => reader.cancel().catch(() => {});
    request.signal.addEventListener("abort", onAbort);
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (e) {
          break; // cut, or aborted by the watchdog: `ended` says which
        }
        const { value, done } = chunk;
        if (done) break;
        heard = Date.now();
        for (const data of parser.push(decoder.decode(value, { stream: true }))) {
          let f;
          try {
            f = JSON.parse(data);
          } catch (e) {
            this.emit("error", new RuncastError("invalid_json", "the gateway sent an SSE message that is not JSON"));
            continue;
          }
          if (f && f.type === "error" && f.code === "unauthorized" && !f.run) {
            ended = "expired";
            reader.cancel().catch(() => {});
            return ended;
          }
          this.onFrame(f);
        }
      }
    } finally {
      clearInterval(watchdog);
      request.signal.removeEventListener("abort", onAbort);
    }
    return ended;
  }
}

/**
 * The SSE format (WHATWG "interpret an event stream"), reduced to what the
 * client needs: the data of each message. Lines end in CRLF, LF or CR.
 */
export class SseParser {
  constructor() {
    this.buf = "";
    /** @type {string[]} */
    this.data = [];
    this.sawCR = false;
  }

  /**
   * @param {string} chunk
   * @returns {string[]} the data of every message this chunk completed
   */
  push(chunk) {
    /** @type {string[]} */
    const out = [];
    let text = chunk;
    // A CR at the end of the last chunk and an LF at the start of this one
    // are a single line end.
    if (this.sawCR && text.startsWith("\n")) text = text.slice(1);
    this.sawCR = false;
    this.buf += text;
    let start = 0;
    for (let i = 0; i < this.buf.length; i++) {
      const c = this.buf.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this.line(this.buf.slice(start, i), out);
      if (c === 13) {
        if (i + 1 === this.buf.length) this.sawCR = true;
        else if (this.buf.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    this.buf = this.buf.slice(start);
    if (this.buf.length > MAX_SSE_LINE) throw new RuncastError("too_large", "an SSE line over the client's limit");
    return out;
  }

  /**
   * @param {string} line
   * @param {string[]} out
   */
  line(line, out) {
    if (line === "") {
      if (this.data.length) out.push(this.data.join("\n"));
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
  }
}

/**
 * @param {number} ms
 * @param {AbortSignal} signal
 */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(t); resolve(undefined); }, { once: true });
  });
}

/** @param {Response} res */
async function errorOf(res) {
  try {
    const body = await res.json();
    if (body && body.error && typeof body.error.code === "string") return { code: body.error.code, message: String(body.error.message) };
  } catch (e) { /* not a JSON error body */ }
  return { code: `http_${res.status}`, message: `HTTP ${res.status}` };
}

/** @param {Response} res */
async function reasonOf(res) {
  return (await errorOf(res)).message;
}

/**
 * One followed run. Its `cursor` is the last seq processed; `state` is the
 * run's state kept current by every event after the snapshot.
 */
export class Subscription {
  /**
   * @param {Client} client
   * @param {string} run
   * @param {SubscribeOptions} options
   */
  constructor(client, run, options) {
    this.client = client;
    this.run = run;
    this.options = options;
    /** @type {number | null} */
    this.cursor = options.since ?? null;
    /** @type {RunState | null} */
    this.state = null;
    /** The seq the state includes: later events are folded into it. */
    this.folded = 0;
    /** @type {AbortController | null} */
    this.abort = null;
    this.ended = false;
    /** @type {RuncastError | null} */
    this.endError = null;
    /** For the async iterator: frames not yet taken, and the waiting taker. */
    /** @type {(EventFrame | GapFrame)[]} */
    this.queue = [];
    /** @type {((v: IteratorResult<EventFrame | GapFrame>) => void) | null} */
    this.wake = null;
    /** @type {((e: any) => void) | null} */
    this.wakeError = null;
    this.iterating = false;
    /**
     * A subscription without onEvent is meant to be iterated: frames that
     * come before the loop starts (an `await` in between) wait for it, up to
     * maxBuffered. Past that they are dropped, and the loop, when it comes,
     * fails at once instead of starting silently in the middle.
     */
    this.holdForIterator = !options.onEvent;
    this.missedBeforeIterator = false;
    this.maxBuffered = options.maxBuffered ?? 10000;
  }

  /** @param {any} f */
  onFrame(f) {
    if (this.ended) return;
    if (f.type === "state") {
      // On a fresh subscribe the state's seq is the cursor; on a resume
      // the cursor stays, since the events after it are being replayed.
      if (this.cursor === null) this.cursor = f.seq;
      if (this.state === null || f.seq > this.folded) {
        this.state = f.state ? { ...f.state } : null;
        this.folded = f.seq;
      }
      this.call("onState", this.state, f);
    } else if (f.type === "event") {
      // Cannot happen within one connection; guards the client's own
      // reconnect races, so an event is never processed twice.
      if (this.cursor !== null && f.seq <= this.cursor) return;
      this.cursor = f.seq;
      if (f.seq > this.folded) this.fold(f);
      this.call("onEvent", f);
      this.push(f);
    } else if (f.type === "gap") {
      if (this.cursor === null || f.to > this.cursor) this.cursor = f.to;
      this.call("onGap", f);
      this.push(f);
    }
  }

  /**
   * Folds an event into the state the way the gateway does, so `state`
   * and `progress(state)` stay current between snapshots.
   * @param {EventFrame} f
   */
  fold(f) {
    const s = this.state || (this.state = /** @type {RunState} */ ({ run: this.run, seq: 0, status: "running", events: 0, started_ts: f.ts, updated_ts: f.ts }));
    s.events = (s.events || 0) + 1;
    s.seq = f.seq;
    s.updated_ts = f.ts;
    const finished = s.status === "completed" || s.status === "failed";
    if (f.kind === "progress") {
      s.progress = f.data;
      const p = percentOf(f.data);
      if (p !== null && !finished) s.percent = p;
    } else if (f.kind === "status") s.last_status = f.data;
    else if (f.kind === "complete" && !finished) {
      s.status = "completed"; s.percent = 100; s.finished_ts = f.ts; s.result = f.data;
    } else if (f.kind === "error" && !finished) {
      s.status = "failed"; s.finished_ts = f.ts; s.result = f.data;
    }
    this.folded = f.seq;
  }

  /**
   * @param {"onState" | "onEvent" | "onGap" | "onError"} name
   * @param {...any} args
   */
  call(name, ...args) {
    const fn = this.options[name];
    if (!fn) return;
    try {
      /** @type {Function} */ (fn)(...args);
    } catch (e) {
      console.error(`runcast: ${name} failed`, e);
    }
  }

  /** @param {RuncastError} e */
  error(e) {
    this.call("onError", e);
  }

  /** @param {EventFrame | GapFrame} f */
  push(f) {
    if (!this.iterating) {
      if (!this.holdForIterator || this.missedBeforeIterator) return;
      this.queue.push(f);
      if (this.queue.length > this.maxBuffered) {
        this.queue = [];
        this.missedBeforeIterator = true;
      }
      return;
    }
    if (this.wake) {
      const w = this.wake;
      this.wake = this.wakeError = null;
      w({ value: f, done: false });
      return;
    }
    this.queue.push(f);
    if (this.queue.length > this.maxBuffered) {
      // A consumer that cannot keep up would grow this without bound.
      // Dropping would lose events silently, so end the subscription with
      // an error instead; its cursor says where to resubscribe from.
      this.end(new RuncastError("slow_consumer", `more than ${this.maxBuffered} events waited for the iterator; resubscribe with since: ${this.cursor}`, this.run));
    }
  }

  /**
   * Ends the subscription: with an error (forbidden, a final close) or
   * without one (unsubscribe, close).
   * @param {RuncastError | null} err
   */
  end(err) {
    if (this.ended) return;
    this.ended = true;
    this.endError = err;
    this.client.drop(this);
    if (err) this.call("onError", err);
    if (this.wake) {
      const w = this.wake, we = this.wakeError;
      this.wake = this.wakeError = null;
      if (err && we && this.queue.length === 0) we(err);
      else w({ value: undefined, done: true });
    }
  }

  /** Stops following the run. */
  unsubscribe() {
    this.end(null);
  }

  /** @returns {AsyncIterator<EventFrame | GapFrame>} */
  [Symbol.asyncIterator]() {
    // One consumer: a second loop would take events from the first.
    if (this.iterating) throw new RuncastError("invalid_state", "a subscription has one iterator; subscribe again (after unsubscribe) for another", this.run);
    this.iterating = true;
    if (this.missedBeforeIterator && !this.ended) {
      this.end(new RuncastError("slow_consumer", `more than ${this.maxBuffered} events came before the loop started; resubscribe with since: ${this.cursor} and start iterating at once`, this.run));
    }
    return {
      next: () => {
        const f = this.queue.shift();
        if (f) return Promise.resolve({ value: f, done: false });
        if (this.ended) {
          if (this.endError) {
            const e = this.endError;
            this.endError = null;
            return Promise.reject(e);
          }
          return Promise.resolve({ value: undefined, done: true });
        }
        return new Promise((resolve, reject) => { this.wake = resolve; this.wakeError = reject; });
      },
      return: () => {
        // Leaving the loop ends the subscription, and what it held.
        this.unsubscribe();
        this.queue = [];
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }
}
