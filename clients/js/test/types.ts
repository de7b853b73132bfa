// Checked by `tsc --noEmit` (npm run check), never run. Two things:
// the implementation's JSDoc types fit the declarations users compile
// against, and the documented usage compiles against those declarations.
import * as impl from "../runcast-client.js";
import type * as api from "../types.js";

// The implementation satisfies the declarations.
const connectImpl: typeof api.connect = impl.connect;
const progressImpl: typeof api.progress = impl.progress;
const resumeImpl: typeof api.shouldResume = impl.shouldResume;
const delayImpl: typeof api.backoffDelay = impl.backoffDelay;
const clientImpl: api.Client = impl.connect("http://localhost:8080", { transport: "sse" });
const subImpl: api.Subscription = new impl.Client("http://x/", {}).subscribe("r1");
void [connectImpl, progressImpl, resumeImpl, delayImpl, clientImpl, subImpl];

// The README's usage, against the declarations only.
declare const connect: typeof api.connect;
declare const progress: typeof api.progress;
async function usage(): Promise<void> {
  const client = connect("https://gateway.example", { getToken: async () => "a.b.c", backoff: { maxMs: 10_000 } });
  const off = client.on("status", (s) => console.log(s.status, s.transport, s.delayMs));
  const sub = client.subscribe("nightly-42", {
    since: 0,
    onState: (state) => console.log(progress(state).percent),
    onEvent: (e) => console.log(e.seq, e.kind, e.data),
    onGap: (g) => console.warn(g.from, g.to),
    onError: (err) => console.error(err.code, err.message),
  });
  for await (const f of sub) {
    if (f.type === "event") console.log(f.seq);
    else console.warn(`lost ${f.from}..${f.to}`);
  }
  const cursor: number | null = sub.cursor;
  void cursor;
  off();
  client.close();
}
void usage;
