// The JavaScript snippets of the README and docs/, run as written against a
// real gateway: the blocks after a `<!-- test: js-client -->` line.
// - `html` blocks are written into a page of the gateway's origin in
//   Chromium, so `/v1/client.js` is the gateway's own copy;
// - `js` blocks run in Node, importing "@runcast/client" (this package, by
//   its own name).
// `127.0.0.1:8080` in a block means the test's gateway, and the run
// `nightly-42` gets progress events and a completion from the test.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync, writeFileSync, rmSync } from "node:fs";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import path from "node:path";

import { Gateway, launchChromium, waitFor, sleep } from "./harness.js";

const repo = fileURLToPath(new URL("../../../", import.meta.url));
const here = fileURLToPath(new URL(".", import.meta.url));

function blocks() {
  const files = [path.join(repo, "README.md"), path.join(repo, "clients/js/README.md"), ...readdirSync(path.join(repo, "docs")).filter((f) => f.endsWith(".md")).sort().map((f) => path.join(repo, "docs", f))];
  const out = [];
  for (const file of files) {
    const lines = readFileSync(file, "utf8").split("\n");
    for (let i = 0; i < lines.length; i++) {
      if (lines[i].trim() !== "<!-- test: js-client -->") continue;
      const fence = lines[i + 1].match(/^```(\w+)$/);
      assert.ok(fence, `${file}:${i + 2}: a fenced block follows the marker`);
      const end = lines.indexOf("```", i + 2);
      out.push({ where: `${path.relative(repo, file)}:${i + 2}`, lang: fence[1], body: lines.slice(i + 2, end).join("\n") });
    }
  }
  return out;
}

/** @type {Gateway} */
let gw;
let browser;
before(async () => {
  gw = await Gateway.start(["up", "--log", "warn"], { name: "docs" });
  browser = await launchChromium();
});
after(async () => {
  await browser?.close();
  await gw?.stop();
});

const publishRun = async (run) => {
  for (let done = 1; done <= 10; done++) await gw.publish(run, [{ kind: "progress", data: { done, total: 10 } }]);
  await gw.publish(run, [{ kind: "complete", data: { ok: true } }]);
};

test("the docs have client snippets in both languages' files", () => {
  const all = blocks();
  assert.ok(all.some((b) => b.lang === "html"), JSON.stringify(all.map((b) => b.where)));
  assert.ok(all.some((b) => b.lang === "js" && b.where.startsWith("README.md")), "the README's browser snippet");
  assert.ok(all.some((b) => b.where.startsWith("clients/js/README.md")), "the package's quick start");
  assert.ok(all.length >= 4);
});

for (const b of blocks()) {
  test(`${b.where} (${b.lang}) runs as written`, { timeout: 60000 }, async () => {
    const body = b.body.replaceAll("127.0.0.1:8080", gw.addr).replaceAll("localhost:8080", gw.addr);
    // A fresh run per block, so each one sees a run from its start.
    const run = `nightly-42`;
    if (b.lang === "html") {
      const page = await browser.newPage();
      const logs = [];
      page.on("console", (m) => logs.push(m.text()));
      page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
      // The snippet becomes a page of the gateway's origin (as a page of
      // the user's site would be), written into a document the gateway
      // served: "/v1/client.js" and the WebSocket go to that gateway.
      await page.goto(`${gw.url}/healthz`);
      await page.setContent(body);
      // Published once the page follows the run, as a job that starts
      // after its watchers would be (otherwise the state alone has it).
      await waitFor(async () => (await page.evaluate(() => document.getElementById("status")?.textContent)) === "live", { timeoutMs: 15000, what: `the page live (${logs.join(" | ")})` });
      await sleep(300);
      await publishRun(run);
      await waitFor(async () => (await page.evaluate(() => document.getElementById("bar")?.value)) === 100, { timeoutMs: 15000, what: `the progress bar at 100 (${logs.join(" | ")})` });
      assert.equal(await page.evaluate(() => document.getElementById("status")?.textContent), "live");
      assert.deepEqual(logs.filter((l) => l.startsWith("pageerror")), []);
      await page.close();
    } else if (b.lang === "js") {
      const file = path.join(here, `.snippet-${process.pid}.mjs`);
      writeFileSync(file, body);
      try {
        const child = spawn(process.execPath, [file], { stdio: ["ignore", "pipe", "pipe"] });
        // Listened for at once: a snippet that replays history may be done
        // before the publishing below is.
        const exited = new Promise((r) => child.on("exit", r));
        let out = "", err = "";
        child.stdout.on("data", (d) => (out += d));
        child.stderr.on("data", (d) => (err += d));
        // The snippet subscribes first; the run's events come after.
        await sleep(1000);
        await publishRun(run);
        const code = await Promise.race([exited, sleep(20000).then(() => "timeout")]);
        if (code === "timeout") child.kill("SIGKILL");
        assert.equal(code, 0, `exit ${code}\n${out}\n${err}`);
        // Every event of the run, in order, exactly once, ending with the completion.
        const lines = out.trim().split("\n").filter((l) => /^\d+ /.test(l));
        const seqs = lines.map((l) => Number(l.split(" ")[0]));
        assert.ok(seqs.length >= 11, out);
        assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y));
        assert.equal(new Set(seqs).size, seqs.length, out);
        assert.match(lines.at(-1), / complete /);
      } finally {
        rmSync(file, { force: true });
      }
    } else {
      assert.fail(`${b.where}: no runner for ${b.lang}`);
    }
  });
}
