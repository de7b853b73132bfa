// End-to-end tests of @runcast/client: real Chromium (playwright-core) and
// Node against real runcast gateways (embedded bus and NATS), through
// proxies that die, strip upgrades and drain.
//
//   RUNCAST_BIN=/path/to/runcast node --test test/e2e.test.js
//
// The page always imports the client from the gateway it talks to
// (`/v1/client.js`), and one test checks that those bytes are this
// worktree's runcast-client.js, so a stale binary cannot pass silently.
// Measured figures are printed with `# e2e:` so they show in the output.

import { test, before, after, describe } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";

import {
  Gateway,
  NatsServer,
  SteadyPublisher,
  httpFetch,
  launchChromium,
  mintJwt,
  openPage,
  pageCount,
  pageRecord,
  pageSubscribe,
  sleep,
  uid,
  waitFor,
} from "./harness.js";
import { StripUpgradeProxy, TcpProxy } from "./proxy.js";

const CLIENT_PATH = fileURLToPath(new URL("../runcast-client.js", import.meta.url));

/** @type {import('playwright-core').Browser} */
let browser;
/** @type {NatsServer | null} */
let nats = null;
/** Things to stop at the end of the file, newest first. */
const atEnd = [];

function report(...args) {
  console.log("# e2e:", ...args);
}

/** Stops, in reverse order, everything a test started (also when it failed). */
function scope() {
  const items = [];
  return {
    add(x) {
      items.push(x);
      return x;
    },
    async close() {
      for (const x of items.reverse()) {
        try {
          if (typeof x === "function") await x();
          else if (typeof x.close === "function") await x.close();
          else if (typeof x.stop === "function") await x.stop();
        } catch {
          /* keep stopping the rest */
        }
      }
    },
  };
}

async function sharedNats() {
  if (!nats) {
    nats = await NatsServer.start();
    atEnd.push(() => nats?.stop());
  }
  return nats;
}

function natsGatewayArgs(n, extra = []) {
  return ["gateway", "--nats", n.url, "--allow-anonymous", "--allow-anonymous-publish", "--drain-timeout", "2s", ...extra];
}

/**
 * The core check: `got` is exactly `expected` (every published seq once, in
 * order), with a readable message about what went wrong.
 */
function assertExactlyOnce(got, expected, label) {
  const dups = got.filter((s, i) => got.indexOf(s) !== i);
  const missing = expected.filter((s) => !got.includes(s));
  const extra = got.filter((s) => !expected.includes(s));
  const disorder = got.findIndex((s, i) => i > 0 && s <= got[i - 1]);
  assert.ok(
    dups.length === 0 && missing.length === 0 && extra.length === 0 && disorder === -1,
    `${label}: got ${got.length} events for ${expected.length} published; duplicates ${JSON.stringify(dups.slice(0, 20))}, missing ${JSON.stringify(missing.slice(0, 20))}, unexpected ${JSON.stringify(extra.slice(0, 20))}, first out of order at index ${disorder}`,
  );
  assert.deepEqual(got, expected, `${label}: the events differ from those published`);
}

/** Status transitions (and their times) after `t`. */
function statusesAfter(rec, t) {
  return rec.statuses.filter((s) => s.t >= t);
}

function printStatuses(label, statuses, t0) {
  report(`${label} statuses:`, statuses.map((s) => `${s.status}${s.code ? `(${s.code})` : ""}${s.delayMs !== undefined ? `[delay ${s.delayMs}]` : ""}@+${s.t - t0}ms`).join(" → "));
}

before(async () => {
  browser = await launchChromium();
});

after(async () => {
  await browser?.close().catch(() => {});
  for (const x of atEnd.reverse()) await Promise.resolve(x()).catch(() => {});
});

// ----------------------------------------------------------------------------

test("the gateway serves this worktree's runcast-client.js at /v1/client.js", async () => {
  const s = scope();
  try {
    const gw = s.add(await Gateway.start(["up"], { name: "bytes" }));
    const r = await httpFetch(`${gw.url}/v1/client.js`);
    assert.equal(r.status, 200);
    assert.match(r.headers.get("content-type") || "", /^text\/javascript/, "a module script needs a JavaScript MIME type");
    const served = Buffer.from(await r.arrayBuffer());
    const disk = readFileSync(CLIENT_PATH);
    assert.ok(
      served.equals(disk),
      `the binary serves a different client.js (${served.length} bytes) than ${CLIENT_PATH} (${disk.length} bytes): rebuild RUNCAST_BIN after editing the client`,
    );
    report(`/v1/client.js = runcast-client.js on disk (${disk.length} bytes)`);
  } finally {
    await s.close();
  }
});

// (a) ------------------------------------------------------------------------

test("(a) embedded bus: 1,000 events at full speed reach the page exactly once, in order, after the state", async () => {
  const s = scope();
  const logs = [];
  try {
    const gw = s.add(await Gateway.start(["up"], { name: "embedded" }));
    const { context, page } = await openPage(browser, gw.url, logs);
    s.add(() => context.close());
    const run = uid("a");
    // A relative URL: resolved against the page, i.e. the gateway it came from.
    await pageSubscribe(page, { url: "/", run, name: "a" });
    await waitFor(() => page.evaluate(() => window.rc.a.client.status === "live" && window.rc.a.states.length === 1), { what: "page live with its state" });

    const N = 1000;
    const t0 = Date.now();
    const seqs = [];
    for (let i = 0; i < N; i++) {
      const [seq] = await gw.publish(run, { kind: "progress", data: { i, done: i + 1, total: N } });
      seqs.push(seq);
    }
    const tPublished = Date.now();
    await waitFor(async () => (await pageCount(page, "a")) >= N, { timeoutMs: 20000, what: `${N} events in the page` });
    const tAll = Date.now();
    await sleep(300); // anything extra (a duplicate) would arrive now
    const rec = await pageRecord(page, "a");

    assert.deepEqual(seqs, Array.from({ length: N }, (_, i) => i + 1), "the embedded bus numbers a run 1, 2, 3, …");
    assertExactlyOnce(rec.seqs, seqs, "(a)");
    assert.deepEqual(rec.is, Array.from({ length: N }, (_, i) => i), "the per-event counter in data");
    assert.equal(rec.firstLog[0], "state", "the state comes first");
    assert.equal(rec.states.length, 1);
    assert.equal(rec.states[0].seq, 0, "a run with no events yet: state seq 0");
    assert.deepEqual(rec.gaps, []);
    assert.deepEqual(rec.errors, []);
    assert.equal(rec.cursor, N);
    assert.deepEqual(rec.progress, { done: N, total: N, percent: 100, status: "running" });
    assert.equal(rec.state.events, N, "the folded state counts every event");
    assert.equal(rec.state.seq, N);
    assert.equal(rec.connections, 1);
    assert.equal(rec.reconnects, 0);

    // A late joiner and a full replay: the gateway's state, then (since: 0) every event again.
    await pageSubscribe(page, { url: "/", run, name: "late" });
    await pageSubscribe(page, { url: "/", run, name: "replay", since: 0 });
    await waitFor(async () => (await pageCount(page, "replay")) >= N && (await page.evaluate(() => window.rc.late.states.length === 1)), { timeoutMs: 20000, what: "late joiner and replay" });
    await sleep(200);
    const late = await pageRecord(page, "late");
    assert.equal(late.states[0].seq, N);
    assert.deepEqual(late.seqs, []);
    assert.deepEqual(late.progress, { done: N, total: N, percent: 100, status: "running" });
    assert.equal(late.state.events, N);
    const replay = await pageRecord(page, "replay");
    assert.equal(replay.firstLog[0], "state");
    assertExactlyOnce(replay.seqs, seqs, "(a) replay since 0");
    assert.deepEqual(replay.is, Array.from({ length: N }, (_, i) => i));
    assert.deepEqual(replay.progress, { done: N, total: N, percent: 100, status: "running" });

    report(`(a) ${rec.seqs.length}/${N} events in order, 0 missing, 0 duplicated; published in ${tPublished - t0} ms, all in the page ${tAll - t0} ms after the first publish; progress ${JSON.stringify(rec.progress)}; replay since 0: ${replay.seqs.length}/${N}`);
  } catch (e) {
    if (logs.length) console.log(logs.slice(-30).join("\n"));
    throw e;
  } finally {
    await s.close();
  }
});

// (b) ------------------------------------------------------------------------

test("(b) NATS, two gateways behind a TCP proxy: kill -9 the page's gateway; it resumes on the other exactly once", async () => {
  const s = scope();
  const logs = [];
  try {
    const n = await sharedNats();
    const a = s.add(await Gateway.start(natsGatewayArgs(n), { name: "killA" }));
    const b = s.add(await Gateway.start(natsGatewayArgs(n), { name: "killB" }));
    const proxy = s.add(await new TcpProxy([{ host: "127.0.0.1", port: a.port, name: "A" }, { host: "127.0.0.1", port: b.port, name: "B" }]).listen());
    const { context, page } = await openPage(browser, proxy.url, logs);
    s.add(() => context.close());
    const run = uid("b");
    await pageSubscribe(page, { url: "/", run, name: "b" });
    await waitFor(() => page.evaluate(() => window.rc.b.client.status === "live" && window.rc.b.states.length === 1), { what: "page live" });
    const wsA = proxy.requests(/^GET \/v1\/ws/);
    assert.deepEqual(wsA.map((e) => e.upstream), ["A"], "the page's WebSocket goes to gateway A");

    const pub = new SteadyPublisher(b, run, { everyMs: 10 });
    s.add(() => pub.stop().catch(() => {}));
    await waitFor(async () => (await pageCount(page, "b")) >= 50, { timeoutMs: 10000, what: "50 events before the kill" });
    const beforeKill = await pageCount(page, "b");
    const tKill = Date.now();
    await a.kill9();
    await waitFor(() => page.evaluate((t) => window.rc.b.statuses.some((x) => x.t >= t && x.status === "live"), tKill), { timeoutMs: 15000, what: "live again after the kill" });
    await sleep(1000); // events keep flowing on B
    const published = await pub.stop();
    await waitFor(async () => (await pageCount(page, "b")) >= published.length, { timeoutMs: 10000, what: `all ${published.length} events` });
    await sleep(300);
    const rec = await pageRecord(page, "b");

    assertExactlyOnce(rec.seqs, published, "(b)");
    assert.deepEqual(rec.is, published.map((_, i) => i));
    assert.deepEqual(rec.gaps, []);
    assert.equal(rec.connections, 2, "one WebSocket on A, one on B");
    const wsAll = proxy.requests(/^GET \/v1\/ws/);
    assert.equal(wsAll.at(-1).upstream, "B", "the page's new WebSocket goes to gateway B");
    const since = statusesAfter(rec, tKill);
    const reconnecting = since.find((x) => x.status === "reconnecting");
    const live = since.find((x) => x.status === "live");
    assert.ok(reconnecting && live && live.t >= reconnecting.t, "reconnecting, then live");
    printStatuses("(b)", since, tKill);
    report(`(b) kill -9 of gateway A with ${beforeKill} events in the page; reconnecting → live ${live.t - reconnecting.t} ms (kill → live ${live.t - tKill} ms); ${rec.seqs.length}/${published.length} events exactly once, in order, ${rec.eventTimes.filter((t) => t > tKill).length} after the kill; WebSocket upgrades through the proxy: ${wsAll.map((e) => e.upstream).join(",")}`);
  } catch (e) {
    if (logs.length) console.log(logs.slice(-30).join("\n"));
    throw e;
  } finally {
    await s.close();
  }
});

// (c) ------------------------------------------------------------------------

test("(c) a proxy that strips Upgrade: transport 'auto' falls back to SSE in Chromium and loses nothing, across a cut stream", async () => {
  const s = scope();
  const logs = [];
  try {
    const gw = s.add(await Gateway.start(["up"], { name: "sse" }));
    const proxy = s.add(await new StripUpgradeProxy({ host: "127.0.0.1", port: gw.port }).listen());
    const { context, page } = await openPage(browser, proxy.url, logs);
    s.add(() => context.close());
    const run = uid("c");
    const t0 = Date.now();
    await pageSubscribe(page, { url: "/", run, name: "c", options: { transport: "auto" } });
    await waitFor(() => page.evaluate(() => window.rc.c.client.transport === "sse" && window.rc.c.client.status === "live" && window.rc.c.states.length === 1), { timeoutMs: 15000, what: "SSE fallback, live with a state" });
    const tSse = Date.now();
    const wsTries = proxy.log.filter((e) => e.url === "/v1/ws");
    assert.ok(wsTries.length >= 1, "the client tried a WebSocket first");
    assert.ok(wsTries.every((e) => e.upgradeStripped && e.status === 426), `every upgrade reached the gateway without Upgrade and got 426: ${JSON.stringify(wsTries)}`);

    const seqs = [];
    for (let i = 0; i < 150; i++) seqs.push(...(await gw.publish(run, { kind: "progress", data: { i, done: i + 1, total: 300 } })));
    await waitFor(async () => (await pageCount(page, "c")) >= 100, { timeoutMs: 10000, what: "100 events over SSE" });
    const cut = proxy.cutStreams(); // the client must resume from its cursor
    for (let i = 150; i < 300; i++) seqs.push(...(await gw.publish(run, { kind: "progress", data: { i, done: i + 1, total: 300 } })));
    await waitFor(async () => (await pageCount(page, "c")) >= 300, { timeoutMs: 15000, what: "300 events over SSE" });
    await sleep(300);
    const rec = await pageRecord(page, "c");

    assert.equal(rec.transport, "sse");
    assert.ok(rec.clientErrors.some((e) => e.code === "fallback"), "the fallback is reported as an error event");
    assertExactlyOnce(rec.seqs, seqs, "(c)");
    assert.deepEqual(rec.is, Array.from({ length: 300 }, (_, i) => i));
    assert.deepEqual(rec.progress, { done: 300, total: 300, percent: 100, status: "running" });
    assert.equal(cut, 1, "one SSE stream was open");
    assert.ok(rec.connections >= 2, "the cut stream was resumed");
    const wsAfter = proxy.log.filter((e) => e.url === "/v1/ws").length;
    assert.equal(wsAfter, wsTries.length, "no more WebSocket attempts once on SSE");
    const streams = proxy.log.filter((e) => /\/stream/.test(e.url));
    report(`(c) SSE after ${wsTries.length} stripped upgrades (426), ${tSse - t0} ms from connect; ${rec.seqs.length}/300 events exactly once across ${cut} cut stream(s); streams opened: ${streams.map((e) => e.url.replace(/^.*\/stream/, "stream")).join(", ")}`);
  } catch (e) {
    if (logs.length) console.log(logs.slice(-30).join("\n"));
    throw e;
  } finally {
    await s.close();
  }
});

// (d) ------------------------------------------------------------------------

describe("(d) tokens", () => {
  const secret = randomBytes(32).toString("hex");
  /** @type {Gateway} */
  let gw;
  const s = scope();

  before(async () => {
    gw = s.add(await Gateway.start(["up", "--auth-hs256-secret", secret, "--allow-anonymous-publish"], { name: "auth" }));
  });
  after(() => s.close());

  test("short-lived tokens expire mid-stream: getToken is asked, nothing is lost (WebSocket and SSE, Chromium)", async () => {
    const t = scope();
    const logs = [];
    try {
      // Anonymous access is off: no token, no stream.
      const r = await httpFetch(`${gw.url}/v1/runs/x/stream`);
      assert.equal(r.status, 401);
      await r.body?.cancel();

      const { context, page } = await openPage(browser, gw.url, logs);
      t.add(() => context.close());
      const run = uid("d");
      const LIFE = 8;
      const calls = { ws: [], sse: [] };
      const mint = (who) => () => {
        const now = Math.floor(Date.now() / 1000);
        calls[who].push(Date.now());
        return mintJwt(secret, { sub: `e2e-${who}`, runs: [run], iat: now, exp: now + LIFE });
      };
      await page.exposeFunction("mintWs", mint("ws"));
      await page.exposeFunction("mintSse", mint("sse"));
      await pageSubscribe(page, { url: "/", run, name: "ws", getToken: "mintWs", options: { transport: "websocket" } });
      await pageSubscribe(page, { url: "/", run, name: "sse", getToken: "mintSse", options: { transport: "sse" } });
      await waitFor(() => page.evaluate(() => ["ws", "sse"].every((n) => window.rc[n].client.status === "live" && window.rc[n].states.length >= 1)), { what: "both clients live" });

      // A run the token does not cover: forbidden ends that subscription
      // only, and the client's own unsubscribe of it is no error.
      const other = uid("d-other");
      await page.evaluate((other) => {
        const r = window.rc.ws;
        r.forbidden = [];
        r.forbiddenSub = r.client.subscribe(other, { onError: (e) => r.forbidden.push(e.code) });
      }, other);
      await waitFor(() => page.evaluate(() => window.rc.ws.forbiddenSub.ended), { timeoutMs: 5000, what: "forbidden subscription ended" });
      await sleep(300);
      const forbidden = await page.evaluate(() => ({ codes: window.rc.ws.forbidden, clientErrors: window.rc.ws.clientErrors.map((e) => e.code), status: window.rc.ws.client.status }));
      assert.ok(forbidden.codes.length >= 1 && forbidden.codes.every((c) => c === "forbidden"), JSON.stringify(forbidden));
      assert.deepEqual(forbidden.clientErrors, [], "no client-level error (e.g. not_subscribed for the client's own unsubscribe)");
      assert.equal(forbidden.status, "live");

      const t0 = Date.now();
      const pub = new SteadyPublisher(gw, run, { everyMs: 50 });
      t.add(() => pub.stop().catch(() => {}));
      await sleep(18000);
      const published = await pub.stop();
      await waitFor(async () => (await pageCount(page, "ws")) >= published.length && (await pageCount(page, "sse")) >= published.length, { timeoutMs: 10000, what: "every event on both" });
      await sleep(300);
      const ws = await pageRecord(page, "ws");
      const sse = await pageRecord(page, "sse");

      assertExactlyOnce(ws.seqs, published, "(d) WebSocket");
      assertExactlyOnce(sse.seqs, published, "(d) SSE");
      assert.equal(ws.transport, "websocket");
      assert.equal(sse.transport, "sse");
      // 18 s with 8 s tokens: the first token expired mid-stream, the WebSocket
      // renewed in place (refresh → auth) without reconnecting.
      assert.ok(calls.ws.length >= 3, `getToken (WebSocket) asked ${calls.ws.length} times in 18 s of 8 s tokens`);
      assert.equal(ws.connections, 1, "the WebSocket renewed its token in place");
      assert.equal(ws.reconnects, 0, "no 4003 close");
      assert.ok(calls.sse.length >= 3, `getToken (SSE) asked ${calls.sse.length} times`);
      assert.ok(sse.connections >= 3, "SSE streams end at exp and are reopened with a fresh token");
      assert.ok(!ws.statuses.some((x) => x.status === "unauthorized") && !sse.statuses.some((x) => x.status === "unauthorized"));
      const gapsWs = calls.ws.slice(1).map((x, i) => x - calls.ws[i]);
      report(`(d) expiry over ${Date.now() - t0} ms, ${LIFE} s tokens: WebSocket getToken ×${calls.ws.length} (every ~${gapsWs.length ? Math.round(gapsWs.reduce((a, b) => a + b, 0) / gapsWs.length) : "-"} ms), 1 connection, ${ws.seqs.length}/${published.length} events exactly once; SSE getToken ×${calls.sse.length}, ${sse.connections} streams, ${sse.seqs.length}/${published.length} events exactly once`);
    } catch (e) {
      if (logs.length) console.log(logs.slice(-30).join("\n"));
      throw e;
    } finally {
      await t.close();
    }
  });

  test("a refused token: status unauthorized, and no reconnect loop (WebSocket, getToken, SSE; Chromium)", async () => {
    const t = scope();
    const logs = [];
    try {
      const { context, page } = await openPage(browser, gw.url, logs);
      t.add(() => context.close());
      const run = uid("d");
      const wrong = randomBytes(32).toString("hex");
      const bad = () => mintJwt(wrong, { sub: "e2e-bad", runs: [run], exp: Math.floor(Date.now() / 1000) + 600 });
      let badCalls = 0;
      await page.exposeFunction("mintBad", () => {
        badCalls++;
        return bad();
      });
      const key = 'runcast_auth_failures_total{reason="bad_signature"}';
      const key401 = 'runcast_protocol_errors_total{code="unauthorized"}';
      const m0 = await gw.metrics();
      const t0 = Date.now();
      await pageSubscribe(page, { url: "/", run, name: "static", options: { token: bad(), transport: "websocket" } });
      await pageSubscribe(page, { url: "/", run, name: "dyn", getToken: "mintBad", options: { transport: "websocket" } });
      await pageSubscribe(page, { url: "/", run, name: "sse", options: { token: bad(), transport: "sse" } });
      await waitFor(() => page.evaluate(() => ["static", "dyn", "sse"].every((n) => window.rc[n].client.status === "unauthorized")), { timeoutMs: 10000, what: "all three unauthorized" }).catch(async (e) => {
        const st = await page.evaluate(() => Object.fromEntries(["static", "dyn", "sse"].map((n) => [n, window.rc[n].statuses.map((x) => x.status).join("→")])));
        throw new Error(`${e.message}; getToken ×${badCalls}; statuses ${JSON.stringify(st).slice(0, 1500)}`);
      });
      const tRefused = Date.now();
      const m1 = await gw.metrics();
      await sleep(4000);
      const m2 = await gw.metrics();
      const recs = {};
      for (const n of ["static", "dyn", "sse"]) recs[n] = await pageRecord(page, n);

      for (const [n, r] of Object.entries(recs)) {
        assert.equal(r.status, "unauthorized", `${n} stays unauthorized`);
        assert.equal(r.statuses.at(-1).status, "unauthorized", `${n}: nothing after unauthorized`);
        assert.equal(r.connections, 0);
        assert.deepEqual(r.seqs, []);
      }
      assert.ok(badCalls >= 1 && badCalls <= 2, `getToken asked ${badCalls} times for refused tokens (once more after the first 401, then stop)`);
      const refusedAll = (m2[key] ?? 0) - (m0[key] ?? 0);
      const refusedLate = (m2[key] ?? 0) - (m1[key] ?? 0);
      const http401 = (m2[key401] ?? 0) - (m0[key401] ?? 0);
      assert.equal(refusedLate, 0, "no attempt after the status became unauthorized");
      assert.ok(refusedAll >= 3 && refusedAll <= 8, `bounded attempts with a refused token: ${refusedAll}`);
      report(`(d) refused tokens: unauthorized after ${tRefused - t0} ms; bad-signature refusals in total ${refusedAll} (static WebSocket token, getToken ×${badCalls}, SSE), 401 responses ${http401}, and ${refusedLate} in the 4 s after`);
      report(`(d) refused statuses: ${Object.entries(recs).map(([n, r]) => `${n}: ${r.statuses.map((x) => x.status).join("→")}`).join("; ")}`);
    } catch (e) {
      if (logs.length) console.log(logs.slice(-30).join("\n"));
      throw e;
    } finally {
      await t.close();
    }
  });
});

// (e) ------------------------------------------------------------------------

test("(e) a drained gateway: the page moves to the other gateway within the drain's pacing, without a backoff, losing nothing", async () => {
  const s = scope();
  const logs = [];
  try {
    const n = await sharedNats();
    const ADMIN = randomBytes(16).toString("hex");
    const DELAY_MS = 500;
    const JITTER_MS = 1000;
    const extra = ["--admin-token", ADMIN, "--drain-delay", `${DELAY_MS}ms`];
    const a = s.add(await Gateway.start(natsGatewayArgs(n, extra), { name: "drainA" }));
    const b = s.add(await Gateway.start(natsGatewayArgs(n, extra), { name: "drainB" }));
    // The balancer checks /readyz every 100 ms, as a load balancer would: a
    // draining gateway fails readiness for --drain-delay before its clients
    // are told to leave.
    const proxy = s.add(await new TcpProxy([{ host: "127.0.0.1", port: a.port, name: "A" }, { host: "127.0.0.1", port: b.port, name: "B" }], { healthCheckMs: 100 }).listen());
    await proxy.check();
    const { context, page } = await openPage(browser, proxy.url, logs);
    s.add(() => context.close());
    const run = uid("e");
    // A long backoff: if the client waited for one, the test would see it.
    await pageSubscribe(page, { url: "/", run, name: "e", options: { backoff: { initialMs: 3000, maxMs: 5000 } } });
    await waitFor(() => page.evaluate(() => window.rc.e.client.status === "live" && window.rc.e.states.length === 1), { what: "page live" });
    assert.deepEqual(proxy.requests(/^GET \/v1\/ws/).map((e) => e.upstream), ["A"]);

    // Refused without the admin token.
    const noAuth = await httpFetch(`${a.url}/v1/admin/drain`, { method: "POST", body: "{}", headers: { "content-type": "application/json" } });
    assert.equal(noAuth.status, 401);
    await noAuth.body?.cancel();

    const pub = new SteadyPublisher(b, run, { everyMs: 10 });
    s.add(() => pub.stop().catch(() => {}));
    await waitFor(async () => (await pageCount(page, "e")) >= 30, { timeoutMs: 10000, what: "events before the drain" });
    const tDrain = Date.now();
    const r = await httpFetch(`${a.url}/v1/admin/drain`, {
      method: "POST",
      headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
      body: JSON.stringify({ rate: 100, jitter_ms: JITTER_MS, grace_ms: 3000 }),
    });
    const body = await r.json();
    assert.equal(r.status, 202, JSON.stringify(body));
    assert.equal(body.clients, 1, "one client on A");
    await waitFor(() => page.evaluate((t) => window.rc.e.statuses.some((x) => x.t >= t && x.status === "live"), tDrain), { timeoutMs: 10000, what: "live again after the drain" });
    await sleep(800);
    const published = await pub.stop();
    await waitFor(async () => (await pageCount(page, "e")) >= published.length, { timeoutMs: 10000, what: `all ${published.length} events` });
    await sleep(300);
    const rec = await pageRecord(page, "e");

    assertExactlyOnce(rec.seqs, published, "(e)");
    const since = statusesAfter(rec, tDrain);
    printStatuses("(e)", since, tDrain);
    const reconnecting = since.find((x) => x.status === "reconnecting");
    const live = since.find((x) => x.status === "live");
    assert.ok(reconnecting, "the drain closed the page's WebSocket");
    assert.equal(reconnecting.code, 1001, "a reconnect hint is close 1001");
    assert.equal(reconnecting.delayMs, 0, "1001 reconnects at once, without a backoff");
    assert.ok(live && live.t >= reconnecting.t);
    const closeToLive = live.t - reconnecting.t;
    const drainToLive = live.t - tDrain;
    assert.ok(closeToLive < 1000, `from the 1001 close to live: ${closeToLive} ms`);
    assert.ok(drainToLive < DELAY_MS + JITTER_MS + 1000, `from the drain request to live: ${drainToLive} ms (drain delay ${DELAY_MS} + jitter ${JITTER_MS} + margin)`);
    const ws = proxy.requests(/^GET \/v1\/ws/).map((e) => e.upstream);
    assert.deepEqual(ws, ["A", "B"], "one WebSocket on A, then one on B");
    assert.equal(rec.connections, 2);
    report(`(e) drain: request → 1001 close ${reconnecting.t - tDrain} ms (drain delay ${DELAY_MS} ms, jitter up to ${JITTER_MS} ms), close → live on B ${closeToLive} ms, request → live ${drainToLive} ms; ${rec.seqs.length}/${published.length} events exactly once`);
  } catch (e) {
    if (logs.length) console.log(logs.slice(-30).join("\n"));
    throw e;
  } finally {
    await s.close();
  }
});

test("(e) a drain behind a balancer that notices late (no --drain-delay): 'auto' stays on WebSocket and reaches the other gateway", async () => {
  const s = scope();
  const logs = [];
  try {
    const n = await sharedNats();
    const ADMIN = randomBytes(16).toString("hex");
    const a = s.add(await Gateway.start(natsGatewayArgs(n, ["--admin-token", ADMIN]), { name: "lagA" }));
    const b = s.add(await Gateway.start(natsGatewayArgs(n, ["--admin-token", ADMIN]), { name: "lagB" }));
    // No health check: the balancer keeps sending new connections to A
    // (which answers 503 draining) until the test takes A out, 1.5 s later.
    const proxy = s.add(await new TcpProxy([{ host: "127.0.0.1", port: a.port, name: "A" }, { host: "127.0.0.1", port: b.port, name: "B" }]).listen());
    const { context, page } = await openPage(browser, proxy.url, logs);
    s.add(() => context.close());
    const run = uid("e2");
    await pageSubscribe(page, { url: "/", run, name: "e2", options: { transport: "auto" } });
    await waitFor(() => page.evaluate(() => window.rc.e2.client.status === "live" && window.rc.e2.states.length === 1), { what: "page live" });
    const pub = new SteadyPublisher(b, run, { everyMs: 10 });
    s.add(() => pub.stop().catch(() => {}));
    await waitFor(async () => (await pageCount(page, "e2")) >= 20, { timeoutMs: 10000, what: "events before the drain" });
    const tDrain = Date.now();
    const r = await httpFetch(`${a.url}/v1/admin/drain`, {
      method: "POST",
      headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
      body: JSON.stringify({ rate: 100, jitter_ms: 0 }),
    });
    assert.equal(r.status, 202, await r.text());
    await sleep(1500);
    const LAG_MS = Date.now() - tDrain;
    proxy.upstreams = proxy.upstreams.filter((u) => u.name !== "A");
    await waitFor(() => page.evaluate((t) => window.rc.e2.statuses.some((x) => x.t >= t && x.status === "live"), tDrain), { timeoutMs: 10000, what: "live again after the drain" }).catch(async (e) => {
      const rec = await pageRecord(page, "e2");
      throw new Error(`${e.message}; transport ${rec.transport}, statuses ${statusesAfter(rec, tDrain).map((x) => `${x.status}${x.code ? `(${x.code})` : ""}/${x.transport}`).join("→")}, errors ${JSON.stringify(rec.clientErrors)}`);
    });
    await sleep(500);
    const published = await pub.stop();
    await waitFor(async () => (await pageCount(page, "e2")) >= published.length, { timeoutMs: 10000, what: `all ${published.length} events` });
    await sleep(300);
    const rec = await pageRecord(page, "e2");
    const since = statusesAfter(rec, tDrain);
    printStatuses("(e, late balancer)", since, tDrain);
    assert.equal(rec.transport, "websocket", `a 503 from a draining gateway is not a blocked upgrade: ${JSON.stringify(rec.clientErrors)}`);
    assertExactlyOnce(rec.seqs, published, "(e, late balancer)");
    const live = since.find((x) => x.status === "live");
    const tries = proxy.requests(/^GET \/v1\/ws/).map((e) => e.upstream);
    assert.equal(tries.at(-1), "B");
    report(`(e) drain with a balancer ${LAG_MS} ms late: ${tries.filter((u) => u === "A").length - 1} upgrade(s) refused by draining A, live on B over ${rec.transport} ${live.t - tDrain} ms after the drain (${live.t - tDrain - LAG_MS} ms after the balancer dropped A); ${rec.seqs.length}/${published.length} events exactly once`);
  } catch (e) {
    if (logs.length) console.log(logs.slice(-10).join("\n"));
    throw e;
  } finally {
    await s.close();
  }
});

// (f) ------------------------------------------------------------------------

test("(f) Node 20 with the `ws` peer: events exactly once, a gateway restart resumed, unsubscribe, the iterator ends on close()", async () => {
  const s = scope();
  try {
    const n = await sharedNats();
    const a = s.add(await Gateway.start(natsGatewayArgs(n), { name: "nodeA" }));
    const b = s.add(await Gateway.start(natsGatewayArgs(n), { name: "nodeB" }));
    const { connect } = await import("../runcast-client.js");
    const { WebSocket: WsClass } = await import("ws");
    report(`(f) Node ${process.version}: global WebSocket ${typeof globalThis.WebSocket}`);

    const client = connect(a.url, { backoff: { initialMs: 100, maxMs: 1000 } });
    s.add(() => client.close());
    const statuses = [];
    client.on("status", (x) => statuses.push({ ...x, t: Date.now() }));
    const run1 = uid("f1");
    const run2 = uid("f2");
    const got1 = [];
    const states1 = [];
    const sub1 = client.subscribe(run1, { onEvent: (e) => got1.push(e.seq), onState: (st, f) => states1.push(f.seq) });
    await waitFor(() => client.status === "live" && states1.length === 1, { what: "Node client live" });
    assert.ok(client.ws instanceof WsClass, "on Node without options.WebSocket the client uses the `ws` package");
    assert.equal(client.transport, "websocket");

    const published = [];
    for (let k = 0; k < 4; k++) published.push(...(await a.publish(run1, Array.from({ length: 50 }, (_, i) => ({ kind: "progress", data: { i: k * 50 + i } })))));
    await waitFor(() => got1.length >= 200, { what: "200 events" });

    // A resumable close: gateway A stops (SIGTERM: close 1001) and comes back
    // on the same port; meanwhile events go in through B (same NATS).
    const tStop = Date.now();
    await a.stop();
    await waitFor(() => statuses.some((x) => x.t >= tStop && x.status === "reconnecting"), { timeoutMs: 10000, what: "reconnecting" });
    for (let k = 0; k < 2; k++) published.push(...(await b.publish(run1, Array.from({ length: 50 }, (_, i) => ({ kind: "progress", data: { i: 200 + k * 50 + i } })))));
    await sleep(500); // the client keeps trying a closed port
    const tStart = Date.now();
    await a.launch();
    await waitFor(() => statuses.some((x) => x.t >= tStop && x.status === "live"), { timeoutMs: 15000, what: "live again on the restarted gateway" });
    published.push(...(await a.publish(run1, Array.from({ length: 50 }, (_, i) => ({ kind: "progress", data: { i: 300 + i } })))));
    await waitFor(() => got1.length >= published.length, { timeoutMs: 10000, what: `${published.length} events` }).catch((e) => {
      throw new Error(`${e.message}: got ${got1.length}, transport ${client.transport}, status ${client.status}, statuses ${statuses.map((x) => `${x.status}${x.code ? `(${x.code})` : ""}/${x.transport}`).join("→")}`);
    });
    await sleep(200);
    assertExactlyOnce(got1, published, "(f) across the restart");
    const since = statuses.filter((x) => x.t >= tStop);
    printStatuses("(f)", since, tStop);
    const firstClose = since.find((x) => x.status === "reconnecting");
    const live = since.find((x) => x.status === "live");

    // unsubscribe stops delivery, and subscribing again at once from the
    // cursor on the same connection (as the README says to after a
    // slow_consumer error) gets what comes next: the gateway's `unsubscribed`
    // answer to the old subscription must not end the new one.
    sub1.unsubscribe();
    assert.equal(sub1.ended, true);
    const beforeUnsub = got1.length;
    const again = [];
    const againErrors = [];
    const sub1b = client.subscribe(run1, { since: sub1.cursor, onEvent: (e) => again.push(e.seq), onError: (e) => againErrors.push(`${e.code}: ${e.message}`) });
    const missed = await a.publish(run1, Array.from({ length: 20 }, (_, i) => ({ kind: "log", data: { line: `after ${i}` } })));
    await waitFor(() => again.length >= missed.length || sub1b.ended, { timeoutMs: 3000, what: "events on the new subscription" }).catch(() => {});
    await sleep(300);
    assert.equal(got1.length, beforeUnsub, "no event for the unsubscribed handler");
    assert.deepEqual(againErrors, [], "no error on the new subscription");
    assert.equal(sub1b.ended, false, "the new subscription is still on");
    assertExactlyOnce(again, missed, "(f) resubscribed with since: cursor");
    sub1b.unsubscribe();

    // The async iterator gets the events, and ends when the client closes.
    const sub2 = client.subscribe(run2);
    const got2 = [];
    let ended = false;
    let iterError = null;
    const loop = (async () => {
      try {
        for await (const f of sub2) got2.push(f.seq);
      } catch (e) {
        iterError = e;
      }
      ended = true;
    })();
    await waitFor(() => sub2.state !== null || sub2.cursor !== null, { what: "sub2 state" });
    const seqs2 = await a.publish(run2, Array.from({ length: 30 }, (_, i) => ({ kind: "progress", data: { done: i + 1, total: 30 } })));
    await waitFor(() => got2.length >= 30, { what: "30 events through the iterator" });
    assert.deepEqual(got2, seqs2);
    assert.equal(ended, false);
    client.close();
    await Promise.race([loop, sleep(3000)]);
    assert.equal(ended, true, "the for-await loop ended on close()");
    assert.equal(iterError, null, "and without an error");
    assert.equal(client.status, "closed");
    report(`(f) Node/ws: ${got1.length}/${published.length} events exactly once across a restart of the gateway (close ${firstClose?.code ?? "-"}, stop → live ${live.t - tStop} ms, restarted → live ${live.t - tStart} ms, ${client.reconnects} reconnect attempts, transport ${client.transport}); unsubscribe: 0 of 20 later events, resubscribed at once from the cursor: ${again.length}/20; iterator: ${got2.length}/30, ended on close()`);
  } finally {
    await s.close();
  }
});
