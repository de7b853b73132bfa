// Unit tests of @runcast/client with fake sockets and a fake fetch: the
// rules of docs/protocol.md that a real gateway makes hard to provoke on
// demand (every close code, refusals, heartbeats, cursors at every seam).
// The end-to-end tests (e2e.test.js) run the same client against real
// gateways in Chromium.
import { test, afterEach } from "node:test";
import assert from "node:assert/strict";
import { connect, progress, shouldResume, backoffDelay, SseParser, RuncastError } from "../runcast-client.js";

const TOKEN = "aaa.bbb.ccc";
const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

/** A WebSocket the test drives: open it, feed it frames, close it. */
class FakeSocket {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }
  send(text) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(JSON.parse(text));
  }
  close(code) {
    this.closedWith = code ?? 1005;
    this.readyState = 3;
  }
  // test side
  open(hello = {}) {
    this.readyState = 1;
    this.onopen?.({});
    this.frame({ type: "hello", version: 1, connection: 1, heartbeat_ms: 20000, ...hello });
  }
  frame(f) {
    this.onmessage?.({ data: JSON.stringify(f) });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  subscribes() {
    return this.sent.filter((f) => f.type === "subscribe");
  }
}

function fakeFetch(status = 200, body = { runs: [] }) {
  const calls = [];
  const f = async (url, init) => {
    calls.push({ url, init });
    const s = typeof status === "function" ? status(url) : status;
    return new Response(JSON.stringify(s === 401 ? { error: { code: "unauthorized", message: "token expired" } } : body), { status: s });
  };
  f.calls = calls;
  return f;
}

// Every client a test made is closed after it, pass or fail, so a failed
// assertion cannot leave timers that keep the runner alive.
const made = [];
afterEach(() => { for (const c of made.splice(0)) c.close(); });

function client(options = {}) {
  FakeSocket.all = [];
  const c = connect("http://gw.test:8080/base", { WebSocket: FakeSocket, fetch: fakeFetch(), backoff: { initialMs: 1, maxMs: 4 }, ...options });
  made.push(c);
  const statuses = [];
  c.on("status", (s) => statuses.push(s));
  return { c, statuses, last: () => FakeSocket.all.at(-1) };
}

const ev = (run, seq, data = { done: seq, total: 10 }, kind = "progress") => ({ type: "event", run, seq, kind, data, ts: 1000 + seq });

test("close codes: resumable and final, as docs/protocol.md lists them", () => {
  for (const code of [1001, 1006, 1011, 1012, 4000, 4001, 4003, 4399]) assert.equal(shouldResume(code), true, String(code));
  for (const code of [1000, 1003, 1007, 1008, 1009, 1010, 4400, 4999]) assert.equal(shouldResume(code), false, String(code));
});

test("backoff: full jitter below a bound that doubles up to the cap", () => {
  const b = { initialMs: 100, maxMs: 5000 };
  assert.equal(backoffDelay(0, b, () => 0.999), 99);
  assert.equal(backoffDelay(3, b, () => 0.5), 400);
  assert.equal(backoffDelay(40, b, () => 0.999), 4995);
  assert.equal(backoffDelay(5, b, () => 0), 0);
});

test("progress() reads both progress forms and clamps", () => {
  assert.deepEqual(progress(null), { done: null, total: null, percent: null, status: "waiting" });
  assert.deepEqual(progress({ status: "running", progress: { done: 3, total: 12 } }), { done: 3, total: 12, percent: 25, status: "running" });
  assert.equal(progress({ status: "running", progress: { percent: 140 } }).percent, 100);
  assert.equal(progress({ status: "running", percent: 30, progress: { done: 1, total: 0 } }).percent, 30);
  assert.equal(progress({ status: "completed", progress: { done: 1, total: 4 } }).percent, 100);
  assert.equal(progress({ status: "running", progress: "text" }).percent, null);
});

test("SSE parser: CRLF, CR split across chunks, multi-line data, comments", () => {
  const p = new SseParser();
  assert.deepEqual(p.push("retry: 2000\r\n\r\nid: 1\r\ndata: {\"a\":"), []);
  assert.deepEqual(p.push("1}\r"), []);
  assert.deepEqual(p.push("\n\r\n: heartbeat\n\ndata:x\ndata: y\r"), ['{"a":1}']);
  assert.deepEqual(p.push("\r"), ["x\ny"]);
  assert.deepEqual(p.push("data\n\n"), [""]);
});

test("SSE parser: a line without end beyond the limit is refused, not buffered", () => {
  const p = new SseParser();
  assert.throws(() => p.push("data: " + "x".repeat(5 * 1024 * 1024)), (e) => e instanceof RuncastError && e.code === "too_large");
});

test("bad run IDs and cursors are refused before anything is sent", () => {
  const { c } = client();
  for (const run of ["a.b", "", "*", "x".repeat(129), "é"]) assert.throws(() => c.subscribe(run), /run IDs/);
  assert.throws(() => c.subscribe("r1", { since: -1 }), (e) => e.code === "invalid_since");
  assert.throws(() => c.subscribe("r1", { since: 1.5 }), (e) => e.code === "invalid_since");
  c.subscribe("r1");
  assert.throws(() => c.subscribe("r1"), (e) => e.code === "already_subscribed");
  c.close();
});

test("one socket carries every subscription; the token goes as a subprotocol", async () => {
  const { c, last } = client({ token: TOKEN });
  c.subscribe("r1");
  c.subscribe("r2", { since: 7 });
  await tick();
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(last().url, "ws://gw.test:8080/base/v1/ws");
  assert.deepEqual(last().protocols, ["runcast.v1", `runcast.bearer.${TOKEN}`]);
  last().open();
  assert.deepEqual(last().subscribes(), [{ type: "subscribe", run: "r1" }, { type: "subscribe", run: "r2", since: 7 }]);
  assert.equal(c.status, "live");
  c.close();
});

test("cursor: state seeds it, duplicates are dropped, gaps advance it, a reconnect resumes from it", async () => {
  const { c, last } = client();
  const events = [], gaps = [], states = [];
  const sub = c.subscribe("r1", { onEvent: (e) => events.push(e.seq), onGap: (g) => gaps.push([g.from, g.to]), onState: (s) => states.push(s && s.seq) });
  await tick();
  last().open();
  last().frame({ type: "state", run: "r1", seq: 4, state: { run: "r1", seq: 4, status: "running", events: 4, percent: 40, progress: { done: 4, total: 10 } } });
  assert.equal(sub.cursor, 4);
  last().frame(ev("r1", 5));
  last().frame(ev("r1", 5)); // a duplicate
  last().frame(ev("r1", 3)); // an old one
  last().frame({ type: "gap", run: "r1", from: 6, to: 9, message: "gone" });
  last().frame(ev("r1", 10));
  assert.deepEqual(events, [5, 10]);
  assert.deepEqual(gaps, [[6, 9]]);
  assert.equal(sub.cursor, 10);
  assert.equal(sub.state.events, 6);
  assert.equal(progress(sub.state).done, 10);
  last().serverClose(1006);
  await tick(20);
  assert.equal(FakeSocket.all.length, 2);
  last().open();
  assert.deepEqual(last().subscribes(), [{ type: "subscribe", run: "r1", since: 10 }]);
  // On a resume the state is the head's: it does not move the cursor, and
  // the replayed events up to it are not folded twice.
  last().frame({ type: "state", run: "r1", seq: 12, state: { run: "r1", seq: 12, status: "running", events: 8, progress: { done: 12, total: 20 } } });
  assert.equal(sub.cursor, 10);
  last().frame(ev("r1", 11));
  last().frame(ev("r1", 12));
  last().frame(ev("r1", 13, { done: 13, total: 20 }));
  assert.deepEqual(events, [5, 10, 11, 12, 13]);
  assert.equal(sub.state.events, 9);
  assert.deepEqual(states, [4, 12]);
  c.close();
});

test("1001 (drain) reconnects at once; a drop backs off", async () => {
  const { c, statuses, last } = client({ backoff: { initialMs: 10000, maxMs: 10000 } });
  c.subscribe("r1");
  await tick();
  last().open();
  last().serverClose(1001, "draining");
  const hint = statuses.at(-1);
  assert.equal(hint.status, "reconnecting");
  assert.equal(hint.delayMs, 0);
  assert.equal(hint.code, 1001);
  await tick(5);
  assert.equal(FakeSocket.all.length, 2);
  last().open();
  last().serverClose(1011);
  assert.equal(statuses.at(-1).status, "reconnecting");
  assert.ok(statuses.at(-1).delayMs >= 0 && statuses.at(-1).delayMs < 10000);
  c.close();
});

test("final close codes stop the client and end subscriptions with the reason", async () => {
  for (const code of [1008, 1009, 4400]) {
    const { c, statuses, last } = client();
    const errors = [];
    const sub = c.subscribe("r1", { onError: (e) => errors.push(e.code) });
    await tick();
    last().open();
    last().serverClose(code, "policy");
    await tick(20);
    assert.equal(FakeSocket.all.length, 1, `no reconnect after ${code}`);
    assert.equal(statuses.at(-1).status, "closed");
    assert.equal(statuses.at(-1).code, code);
    assert.equal(sub.ended, true);
    assert.deepEqual(errors, ["closed"]);
  }
});

test("4003: getToken() is asked and the client resumes with the new token", async () => {
  let calls = 0;
  const { c, last } = client({ getToken: async () => `tok${++calls}.b.c` });
  c.subscribe("r1");
  await tick(5);
  assert.equal(calls, 1);
  last().open();
  last().frame({ type: "state", run: "r1", seq: 3, state: null });
  last().serverClose(4003, "token expired");
  await tick(20);
  assert.equal(calls, 2);
  assert.deepEqual(last().protocols, ["runcast.v1", "runcast.bearer.tok2.b.c"]);
  last().open();
  assert.deepEqual(last().subscribes(), [{ type: "subscribe", run: "r1", since: 3 }]);
  c.close();
});

test("4003 without getToken is unauthorized, and the client stops", async () => {
  const { c, statuses, last } = client({ token: TOKEN });
  c.subscribe("r1");
  await tick();
  last().open();
  last().serverClose(4003);
  await tick(20);
  assert.equal(statuses.at(-1).status, "unauthorized");
  assert.equal(FakeSocket.all.length, 1);
  c.setToken("new.token.x");
  await tick(5);
  assert.equal(FakeSocket.all.length, 2);
  assert.deepEqual(last().protocols, ["runcast.v1", "runcast.bearer.new.token.x"]);
  c.close();
});

test("refresh: the fresh token goes in an auth frame on the same connection", async () => {
  let calls = 0;
  const { c, last } = client({ getToken: () => `t${++calls}.b.c` });
  c.subscribe("r1");
  await tick(5);
  last().open();
  last().frame({ type: "refresh", expires: 123 });
  await tick(5);
  assert.deepEqual(last().sent.at(-1), { type: "auth", token: "t2.b.c" });
  last().frame({ type: "authenticated", expires: 456 });
  assert.equal(FakeSocket.all.length, 1);
  c.close();
});

test("a refused upgrade with a 401 asks getToken() once, then stops: no loop", async () => {
  let calls = 0;
  const fetch = fakeFetch(401);
  const { c, statuses, last } = client({ getToken: () => `t${++calls}.b.c`, fetch });
  c.subscribe("r1");
  await tick(5);
  last().serverClose(1006);
  await tick(30);
  last().serverClose(1006);
  await tick(30);
  assert.equal(statuses.at(-1).status, "unauthorized");
  assert.equal(statuses.at(-1).reason, "token expired");
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(calls, 2);
  await tick(50);
  assert.equal(FakeSocket.all.length, 2, "nothing more after unauthorized");
  c.close();
});

test("auto falls back to SSE when upgrades fail while HTTP works; websocket does not", async () => {
  for (const transport of ["auto", "websocket"]) {
    const streams = [];
    const fetch = async (url, init) => {
      if (url.includes("/stream")) {
        streams.push(url);
        const body = 'retry: 2000\n\nid: 2\ndata: {"type":"state","run":"r1","seq":2,"state":null}\n\nid: 3\ndata: {"type":"event","run":"r1","seq":3,"kind":"log","data":{"line":"x"},"ts":1}\n\n';
        return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
      }
      return new Response('{"runs":[]}', { status: 200 });
    };
    const { c, last } = client({ transport, fetch });
    const seen = [];
    c.subscribe("r1", { onEvent: (e) => seen.push(e.seq) });
    await tick(5);
    last().serverClose(1006);
    await tick(30);
    last().serverClose(1006);
    await tick(30);
    if (transport === "auto") {
      assert.equal(c.transport, "sse");
      assert.ok(streams[0].endsWith("/base/v1/runs/r1/stream"), streams[0]);
      assert.deepEqual(seen.slice(0, 1), [3]);
      // The stream ended; the client resumed from its cursor.
      if (streams.length > 1) assert.ok(streams[1].endsWith("/stream?since=3"), streams[1]);
    } else {
      assert.equal(c.transport, "websocket");
      assert.equal(streams.length, 0);
      assert.ok(FakeSocket.all.length >= 3);
    }
    c.close();
  }
});

test("an upgrade that never opens counts as failed after connectTimeoutMs", async () => {
  const { c, statuses } = client({ connectTimeoutMs: 100 });
  c.subscribe("r1");
  await tick(250);
  assert.ok(FakeSocket.all.length >= 2);
  assert.equal(FakeSocket.all[0].closedWith, 1005);
  assert.ok(statuses.some((s) => s.status === "reconnecting" && /did not open/.test(s.reason)));
  c.close();
});

test("a silent connection is dropped after two heartbeats and resumed", async () => {
  const { c, last } = client({ heartbeatMs: 100 });
  c.subscribe("r1");
  await tick();
  last().open();
  await tick(130);
  assert.deepEqual(last().sent.at(-1), { type: "ping" });
  await tick(250);
  assert.ok(FakeSocket.all.length >= 2, "reconnected");
  assert.equal(FakeSocket.all[0].closedWith, 4001);
  c.close();
});

test("forbidden ends the subscription; other runs go on", async () => {
  const { c, last } = client();
  const errors = [];
  const a = c.subscribe("secret", { onError: (e) => errors.push(e.code) });
  const seen = [];
  c.subscribe("ok", { onEvent: (e) => seen.push(e.seq) });
  await tick();
  last().open();
  last().frame({ type: "error", code: "forbidden", message: "no", run: "secret" });
  last().frame(ev("ok", 1));
  assert.equal(a.ended, true);
  assert.deepEqual(errors, ["forbidden"], "onError once, with the reason");
  assert.deepEqual(seen, [1]);
  last().serverClose(1006);
  await tick(20);
  last().open();
  assert.deepEqual(last().subscribes(), [{ type: "subscribe", run: "ok", since: 1 }]);
  c.close();
});

test("the async iterator yields events and gaps in order, and ends on close", async () => {
  const { c, last } = client();
  const sub = c.subscribe("r1");
  await tick();
  last().open();
  const got = [];
  const done = (async () => { for await (const f of sub) got.push(f.type === "gap" ? `gap${f.from}-${f.to}` : f.seq); })();
  last().frame({ type: "state", run: "r1", seq: 0, state: null });
  last().frame(ev("r1", 1));
  last().frame({ type: "gap", run: "r1", from: 2, to: 3, message: "" });
  last().frame(ev("r1", 4));
  await tick();
  c.close();
  await done;
  assert.deepEqual(got, [1, "gap2-3", 4]);
});

test("a slow iterator ends with slow_consumer instead of dropping events", async () => {
  const { c, last } = client();
  const sub = c.subscribe("r1", { maxBuffered: 3 });
  await tick();
  last().open();
  const it = sub[Symbol.asyncIterator]();
  for (let i = 1; i <= 5; i++) last().frame(ev("r1", i));
  assert.equal(sub.ended, true);
  const got = [];
  await assert.rejects(async () => { for (;;) { const r = await it.next(); if (r.done) break; got.push(r.value.seq); } }, (e) => e.code === "slow_consumer");
  assert.deepEqual(got, [1, 2, 3, 4]);
  assert.equal(sub.cursor, 4);
  c.close();
});

test("unsubscribe sends unsubscribe and stops delivery", async () => {
  const { c, last } = client();
  const seen = [];
  const sub = c.subscribe("r1", { onEvent: (e) => seen.push(e.seq) });
  await tick();
  last().open();
  last().frame(ev("r1", 1));
  sub.unsubscribe();
  last().frame(ev("r1", 2));
  assert.deepEqual(last().sent.at(-1), { type: "unsubscribe", run: "r1" });
  assert.deepEqual(seen, [1]);
  c.close();
});

test("a token that is not a JWT is unauthorized at once, never put in a subprotocol", async () => {
  const { c } = client({ token: "not a token" });
  await tick(5);
  assert.equal(c.status, "unauthorized");
  assert.equal(FakeSocket.all.length, 0);
  c.close();
});

// Findings of an outside tester (each failed before its fix).

test("a resubscribe after unsubscribe ignores the old subscription's frames in flight", async () => {
  const { c, last } = client();
  const first = c.subscribe("r1");
  await tick();
  last().open();
  last().frame({ type: "state", run: "r1", seq: 10, state: null });
  first.unsubscribe();
  const seen = [], states = [];
  const second = c.subscribe("r1", { since: 0, onEvent: (e) => seen.push(e.seq), onState: (s, f) => states.push(f.seq) });
  assert.deepEqual(last().sent.slice(-2), [{ type: "unsubscribe", run: "r1" }, { type: "subscribe", run: "r1", since: 0 }]);
  // Live events of the old subscription, still in flight, then the answer.
  last().frame(ev("r1", 11));
  last().frame(ev("r1", 12));
  last().frame({ type: "unsubscribed", run: "r1" });
  // The new subscription: its state, then the replay from 0.
  last().frame({ type: "state", run: "r1", seq: 12, state: null });
  for (let i = 1; i <= 12; i++) last().frame(ev("r1", i));
  assert.deepEqual(states, [12]);
  assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
  assert.equal(second.ended, false);
});

test("refresh: a token that does not outlive the current one is not sent, and refreshes are paced", async () => {
  const exp = Math.floor(Date.now() / 1000) + 3;
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const cached = `${b64({ alg: "HS256" })}.${b64({ exp })}.sig`;
  let calls = 0;
  const { c, last } = client({ getToken: () => { calls++; return cached; } });
  const errors = [];
  c.on("error", (e) => errors.push(e.code));
  c.subscribe("r1");
  await tick(5);
  last().open();
  for (let i = 0; i < 50; i++) last().frame({ type: "refresh", expires: exp });
  await tick(20);
  assert.equal(calls, 2, "one getToken() for the connection, one for the 50 refresh frames");
  assert.equal(last().sent.filter((f) => f.type === "auth").length, 0);
  assert.deepEqual(errors, ["token_not_renewed"]);
});

test("a WebSocket that opens but never says hello counts as failed", async () => {
  const { c } = client({ connectTimeoutMs: 100 });
  c.subscribe("r1");
  await tick();
  FakeSocket.all[0].readyState = 1;
  FakeSocket.all[0].onopen({});
  await tick(250);
  assert.ok(FakeSocket.all.length >= 2, "retried");
});

test("getToken() that throws (even null) or hangs is retried with backoff, not unauthorized", async () => {
  for (const getToken of [() => { throw null; }, () => Promise.reject(new TypeError("Failed to fetch")), () => new Promise(() => {})]) {
    const { c, statuses } = client({ getToken, connectTimeoutMs: 100, backoff: { initialMs: 100, maxMs: 1000 } });
    const errors = [];
    c.on("error", (e) => errors.push(e.code));
    c.subscribe("r1");
    await tick(400);
    assert.ok(statuses.some((s) => s.status === "reconnecting"), JSON.stringify(statuses));
    assert.ok(!statuses.some((s) => s.status === "unauthorized"));
    assert.ok(errors.includes("token"));
    assert.ok(statuses.filter((s) => s.status === "reconnecting").length < 8, "backed off");
    c.close();
  }
});

test("once a WebSocket has worked, failed upgrades do not switch auto to SSE", async () => {
  const { c, last } = client();
  c.subscribe("r1");
  await tick();
  last().open();
  for (let i = 0; i < 4; i++) {
    last().serverClose(1006);
    await tick(30);
  }
  assert.equal(c.transport, "websocket");
});

test("SSE: a frozen stream is dropped after two heartbeats and resumed from the cursor", async () => {
  const urls = [];
  const fetch = async (url, init) => {
    urls.push(url);
    if (!url.includes("/stream")) return new Response("{}", { status: 200 });
    const body = new ReadableStream({
      start(ctl) {
        ctl.enqueue(new TextEncoder().encode('data: {"type":"state","run":"r1","seq":3,"state":null}\n\n'));
        init.signal.addEventListener("abort", () => ctl.error(new Error("aborted")));
        // then nothing: frozen
      },
    });
    return new Response(body, { status: 200 });
  };
  const { c } = client({ transport: "sse", fetch, heartbeatMs: 100 });
  c.subscribe("r1");
  await tick(600);
  const streams = urls.filter((u) => u.includes("/stream"));
  assert.ok(streams.length >= 2, JSON.stringify(urls));
  assert.ok(streams[1].endsWith("?since=3"), streams[1]);
});

test("SSE: a request the gateway holds without answering is retried after connectTimeoutMs", async () => {
  let n = 0;
  const fetch = (url, init) => {
    n++;
    return new Promise((_, reject) => init.signal.addEventListener("abort", () => reject(new Error("aborted"))));
  };
  const { c, statuses } = client({ transport: "sse", fetch, connectTimeoutMs: 100 });
  c.subscribe("r1");
  await tick(350);
  assert.ok(n >= 2, `${n} requests`);
  assert.ok(statuses.some((s) => s.status === "reconnecting"));
});

test("iterators: one per subscription, frames before the loop wait for it, break leaves nothing behind", async () => {
  const { c, last } = client();
  const sub = c.subscribe("r1");
  await tick();
  last().open();
  last().frame({ type: "state", run: "r1", seq: 0, state: null });
  last().frame(ev("r1", 1));
  last().frame(ev("r1", 2));
  await tick(5); // an await between subscribe and the loop
  const got = [];
  for await (const f of sub) {
    got.push(f.seq);
    if (f.seq === 1) {
      assert.throws(() => sub[Symbol.asyncIterator](), (e) => e.code === "invalid_state");
      last().frame(ev("r1", 3));
    }
    if (f.seq === 2) break;
  }
  assert.deepEqual(got, [1, 2]);
  assert.equal(sub.ended, true);
  assert.equal(sub.queue.length, 0);
});

test("options are checked; the first status can be observed; an empty token is no token", async () => {
  for (const bad of [{ heartbeatMs: 0 }, { heartbeatMs: -1 }, { heartbeatMs: "abc" }, { connectTimeoutMs: NaN }, { backoff: { maxMs: 0 } }])
    assert.throws(() => connect("http://x/", { WebSocket: FakeSocket, ...bad }), (e) => e.code === "invalid_option", JSON.stringify(bad));
  const { statuses, last } = client({ token: "" });
  await tick();
  assert.equal(statuses[0].status, "connecting");
  assert.deepEqual(last().protocols, ["runcast.v1"]);
});
