// Small proxies for the end-to-end tests.
//
// TcpProxy: a load balancer reduced to its essence. Each new connection
// goes to the first upstream, in order, that accepts it; with a health check,
// upstreams whose /readyz fails (a draining gateway) are skipped while a
// healthy one remains. When either side closes, so does the other, as with a
// gateway that dies behind a real balancer.
//
// StripUpgradeProxy: an HTTP proxy that forwards each request without its
// `Upgrade` / `Connection: upgrade` headers (so the gateway answers 426 on
// /v1/ws) and streams responses through (so SSE works), like the corporate
// proxies that make clients fall back to SSE.

import http from "node:http";
import net from "node:net";

const HOP_BY_HOP = new Set(["connection", "upgrade", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "proxy-authenticate", "proxy-authorization"]);

export class TcpProxy {
  /**
   * @param {{ host: string, port: number, name: string }[]} upstreams
   * @param {{ healthCheckMs?: number }} [opts]
   */
  constructor(upstreams, opts = {}) {
    this.upstreams = upstreams;
    /** name -> healthy, as last checked */
    this.healthy = new Map(upstreams.map((u) => [u.name, true]));
    /** Every connection accepted: { upstream, t, path? } */
    this.log = [];
    /** Connections per upstream name. */
    this.counts = new Map();
    this.sockets = new Set();
    this.healthCheckMs = opts.healthCheckMs ?? 0;
    this.server = net.createServer((c) => this.accept(c));
    this.server.on("error", () => {});
  }

  async listen() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = this.server.address().port;
    this.url = `http://127.0.0.1:${this.port}`;
    if (this.healthCheckMs > 0) this.checkTimer = setInterval(() => this.check(), this.healthCheckMs);
    return this;
  }

  async check() {
    await Promise.all(
      this.upstreams.map(async (u) => {
        try {
          const r = await fetch(`http://${u.host}:${u.port}/readyz`, { signal: AbortSignal.timeout(Math.max(200, this.healthCheckMs)) });
          await r.arrayBuffer();
          this.healthy.set(u.name, r.status === 200);
        } catch {
          this.healthy.set(u.name, false);
        }
      }),
    );
  }

  /** The upstreams to try for a new connection, in order. */
  candidates() {
    if (!this.healthCheckMs) return this.upstreams;
    const ok = this.upstreams.filter((u) => this.healthy.get(u.name));
    return ok.length ? [...ok, ...this.upstreams.filter((u) => !this.healthy.get(u.name))] : this.upstreams;
  }

  /** @param {net.Socket} client */
  accept(client) {
    this.sockets.add(client);
    client.on("close", () => this.sockets.delete(client));
    client.on("error", () => {});
    client.pause();
    const tries = [...this.candidates()];
    const next = () => {
      const u = tries.shift();
      if (!u) {
        client.destroy();
        return;
      }
      const up = net.connect({ host: u.host, port: u.port });
      let connected = false;
      up.on("error", () => {
        if (!connected) next();
        else client.destroy();
      });
      up.on("connect", () => {
        connected = true;
        this.sockets.add(up);
        up.on("close", () => {
          this.sockets.delete(up);
          client.destroy();
        });
        client.on("close", () => up.destroy());
        this.counts.set(u.name, (this.counts.get(u.name) || 0) + 1);
        const entry = { upstream: u.name, t: Date.now(), firstLine: "" };
        this.log.push(entry);
        client.once("data", (d) => {
          entry.firstLine = d.toString("latin1").split("\r\n", 1)[0];
        });
        client.pipe(up);
        up.pipe(client);
        client.resume();
      });
    };
    next();
  }

  /** Connections whose first request line matches `re`, per upstream. */
  requests(re) {
    return this.log.filter((e) => re.test(e.firstLine));
  }

  async close() {
    if (this.checkTimer) clearInterval(this.checkTimer);
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(() => resolve()));
  }
}

export class StripUpgradeProxy {
  /** @param {{ host: string, port: number }} target */
  constructor(target) {
    this.target = target;
    /** Every request: { method, url, status, upgradeStripped } */
    this.log = [];
    /** Responses being streamed (SSE), to cut them on demand. */
    this.active = new Set();
    this.sockets = new Set();
    // No 'upgrade' listener: Node hands upgrade requests to 'request' like
    // any other, and the proxy forwards them as plain requests.
    this.server = http.createServer((req, res) => this.forward(req, res));
    this.server.on("connection", (s) => {
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
    });
    this.server.on("error", () => {});
  }

  async listen() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = this.server.address().port;
    this.url = `http://127.0.0.1:${this.port}`;
    return this;
  }

  /**
   * @param {http.IncomingMessage} req
   * @param {http.ServerResponse} res
   */
  forward(req, res) {
    const headers = {};
    const connectionTokens = String(req.headers.connection || "")
      .split(",")
      .map((s) => s.trim().toLowerCase());
    for (const [k, v] of Object.entries(req.headers)) {
      if (HOP_BY_HOP.has(k) || connectionTokens.includes(k)) continue;
      headers[k] = v;
    }
    const entry = { method: req.method, url: req.url, status: 0, upgradeStripped: "upgrade" in req.headers, t: Date.now() };
    this.log.push(entry);
    const up = http.request({ host: this.target.host, port: this.target.port, method: req.method, path: req.url, headers }, (ures) => {
      entry.status = ures.statusCode;
      const out = {};
      for (const [k, v] of Object.entries(ures.headers)) if (!HOP_BY_HOP.has(k)) out[k] = v;
      res.writeHead(ures.statusCode || 502, out);
      res.flushHeaders();
      const pair = { req, res, ures };
      this.active.add(pair);
      const done = () => this.active.delete(pair);
      res.on("close", () => {
        done();
        ures.destroy();
      });
      ures.on("error", () => res.destroy());
      ures.on("end", done);
      ures.pipe(res);
    });
    up.on("error", () => {
      if (!res.headersSent) {
        res.writeHead(502);
        res.end();
      } else res.destroy();
    });
    req.pipe(up);
  }

  /** Cuts every response being streamed (the SSE streams): clients must resume. */
  cutStreams() {
    let n = 0;
    for (const p of [...this.active]) {
      if (!/\/stream/.test(p.req.url || "")) continue;
      p.ures.destroy();
      p.res.destroy();
      n++;
    }
    return n;
  }

  async close() {
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(() => resolve()));
  }
}
