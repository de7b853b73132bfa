#!/usr/bin/env bash
# Every check of @runcast/client, run by the repository's test command
# (scripts/test.sh): the types, the unit tests, the package as npm packs
# it (installed offline into a fresh project, imported and type-checked
# there), and the end-to-end tests in real Chromium against real gateways.
#
#   RUNCAST_BIN=target/debug/runcast bash clients/js/check.sh
set -euo pipefail
cd "$(dirname "$0")"
here=$PWD

# The dev tools (typescript, playwright-core, ws) from the lockfile.
npm ci --no-audit --no-fund --loglevel=error

echo "-- types: JSDoc of runcast-client.js against types.d.ts"
npx tsc --noEmit -p .

echo "-- unit tests"
node --test test/unit.test.js

echo "-- npm pack, installed offline into a fresh project"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
npm pack --offline --pack-destination "$tmp" --loglevel=error >/dev/null
tarball=$(ls "$tmp"/*.tgz)
tar -tzf "$tarball" | sort > "$tmp/contents"
printf 'package/README.md\npackage/package.json\npackage/runcast-client.js\npackage/types.d.ts\n' | diff -u - "$tmp/contents"
mkdir "$tmp/app"
cd "$tmp/app"
printf '{"name":"app","version":"1.0.0","type":"module","private":true}\n' > package.json
npm install --offline --no-audit --no-fund --loglevel=error "$tarball"
# Plain Node (no `ws` installed here): the module loads, and says clearly
# that a WebSocket needs the optional peer.
node --input-type=module -e '
import { connect, progress, VERSION } from "@runcast/client";
import assert from "node:assert/strict";
assert.equal(typeof connect, "function");
assert.equal(progress({ status: "running", progress: { done: 1, total: 4 } }).percent, 25);
const c = connect("http://127.0.0.1:9", { transport: "websocket" });
const err = await new Promise((resolve) => c.on("error", resolve));
assert.equal(err.code, "client");
assert.match(err.message, /install the optional peer `ws`/);
c.close();
console.log(`@runcast/client ${VERSION} from the packed tarball`);
'
# A TypeScript user compiles against the shipped types.
cat > app.ts <<'TS'
import { connect, progress, type EventFrame } from "@runcast/client";
const client = connect("http://localhost:8080", { transport: "sse" });
const sub = client.subscribe("r1", { onEvent: (e: EventFrame) => console.log(e.seq) });
const p: number | null = progress(sub.state).percent;
void p;
client.close();
TS
node "$here/node_modules/typescript/bin/tsc" --noEmit --strict --module nodenext --moduleResolution nodenext --target es2022 --lib es2022,dom app.ts
cd "$here"

echo "-- end-to-end: Chromium and Node against real gateways"
node --test --test-concurrency=1 test/e2e.test.js

echo "-- the README's and docs' JavaScript snippets, as written"
node --test test/docs.test.js
