"""The commands and snippets of README.md, docs/protocol.md, docs/security.md and docs/publishing.md
that can run on one machine, run against the started servers (localhost:8080 replaced by the
server's address, `nightly-42` by a fresh run ID, `--url` added where the docs rely on the default).

Not run here (see README.md of this suite): cargo/helm/kubectl/scripts, Rust and JS snippets, the
`nats` CLI (its effect is covered by test_nats_contract.py).
"""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import httpc
from conftest import KINDS
from harness import (clean_env, free_port, get_json, log, progress, publish_ok, runcast_bin,
                     subscribe, uid, wait_until, ws)
from tokens import bearer

ROOT = Path(__file__).resolve().parent.parent


def code_blocks(md: str, lang: str):
    text = (ROOT / md).read_text()
    return re.findall(r"```" + lang + r"\n(.*?)```", text, re.S)


def shell_lines(block: str):
    out, cur = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


def doc_commands(md, prefix):
    return [c for b in code_blocks(md, "sh") for c in shell_lines(b) if c.startswith(prefix)]


def sh(cmd, gw, run, timeout=20, extra_env=None):
    cmd = cmd.replace("localhost:8080", gw.addr).replace("nightly-42", run)
    cmd = re.sub(r"\s+#.*$", "", cmd)
    env = clean_env(extra_env)
    env["PATH"] = os.path.dirname(os.path.abspath(runcast_bin())) + os.pathsep + env.get("PATH", "")
    if os.path.basename(runcast_bin()) != "runcast":
        cmd = re.sub(r"^runcast ", runcast_bin() + " ", cmd)
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_readme_publish_commands(dep):
    cmds = doc_commands("README.md", "runcast publish") + doc_commands("README.md", "curl")
    assert len(cmds) == 2, cmds
    run = uid("nightly")
    for cmd in cmds:
        if cmd.startswith("runcast"):
            cmd += f" --url {dep.a.url}"
        out = sh(cmd, dep.a, run)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)
        if cmd.startswith("curl"):
            doc = json.loads(out.stdout)
            assert doc["run"] == run and len(doc["seqs"]) == 1, out.stdout
    h = get_json(dep.b, f"/v1/runs/{run}/events")
    assert [(e["kind"], e["data"]) for e in h["events"]] == [
        ("progress", {"done": 3, "total": 10}), ("log", {"line": "hello"})]


def test_protocol_curl_batch_snippet(dep):
    blocks = [b for b in code_blocks("docs/protocol.md", "sh") if "curl" in b]
    assert len(blocks) == 1
    cmd = shell_lines(blocks[0])[0]
    expected = re.search(r"# (\{.*\})", blocks[0]).group(1)
    run = uid("nightly")
    out = sh(cmd, dep.a, run)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    exp = json.loads(expected.replace("nightly-42", run))
    if dep.kind == "embedded":
        assert got == exp, (got, exp)
    else:  # NATS seqs are stream seqs: strictly increasing, not 1, 2
        assert got["run"] == run and len(got["seqs"]) == 2 and got["seqs"][0] < got["seqs"][1], got


def _tail(dep, run, *args, timeout=15, extra_env=None):
    return subprocess.run([runcast_bin(), "tail", run, "--url", dep.b.url, *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=clean_env(extra_env))


def test_readme_tail_exits_0_on_complete_and_2_on_failure(dep):
    cmds = doc_commands("README.md", "runcast tail nightly-42")
    assert any("--since 0" in c for c in cmds), cmds
    # `--since 0`: the whole retained history, then exits because the run completed.
    run = uid("nightly")
    publish_ok(dep.a, run, [progress(1, 2), log("a line to find"), {"kind": "complete", "data": {"findings": 0}}])
    out = _tail(dep, run, "--since", "0")
    assert out.returncode == 0, (out.returncode, out.stdout[-500:], out.stderr[-500:])
    assert "a line to find" in out.stdout, out.stdout
    # live: tail waits, then exits 2 when the run fails
    run2 = uid("nightly")
    p = subprocess.Popen([runcast_bin(), "tail", run2, "--url", dep.b.url], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        time.sleep(1.0)
        publish_ok(dep.a, run2, [progress(1, 2), {"kind": "error", "data": {"message": "boom"}}])
        rc = p.wait(15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    assert rc == 2, (rc, p.stdout.read()[-500:], p.stderr.read()[-500:])


def test_readme_browser_subscribe_frame(dep):
    run = uid("nightly")
    c = ws(dep.b)
    c.send_text('{"type":"subscribe","run":"%s"}' % run)
    assert c.expect("state")["run"] == run
    c.close()


def server_block(md: str, must_contain: str):
    """A `<!-- test: server -->` sh block: (exports {name: shell value}, runcast args after `up`)."""
    text = (ROOT / md).read_text()
    for m in re.finditer(r"<!-- test: server -->\s*```sh\n(.*?)```", text, re.S):
        block = m.group(1)
        if must_contain not in block:
            continue
        exports, args = {}, None
        for line in shell_lines(block):
            if line.startswith("export "):
                k, _, v = line[len("export "):].partition("=")
                exports[k] = v
            elif " up" in f" {line}":
                args = line.split(" up", 1)[1].split()
        return exports, args
    raise AssertionError(f"{md}: no server block containing {must_contain!r}")


def test_security_token_snippets(launcher, capsys):
    """docs/security.md "Issuing tokens from your backend": the server block (its env and
    `runcast up` flags; "`runcast gateway` takes the same flags") and the PyJWT block, as written."""
    exports, args = server_block("docs/security.md", "RUNCAST_AUTH_HS256_SECRET")
    assert exports.get("RUNCAST_AUTH_HS256_SECRET") == '"$SECRET"', exports
    blocks = [b for b in code_blocks("docs/security.md", "python") if "def runcast_token" in b]
    assert len(blocks) == 1
    secret = "docs-snippet-secret-0123456789-abcdef"
    old = os.environ.get("SECRET")
    os.environ["SECRET"] = secret
    ns = {"__name__": "__doc_snippet__"}
    try:
        exec(blocks[0], ns)  # noqa: S102 - the documentation's own snippet
    finally:
        if old is None:
            os.environ.pop("SECRET", None)
        else:
            os.environ["SECRET"] = old
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed and printed[-1].count(".") == 2, f"the snippet should print a token: {printed}"
    problems = []
    for kind in KINDS:
        gw = launcher.gateway(kind, args, anonymous=False, env={"RUNCAST_AUTH_HS256_SECRET": secret})
        try:
            run = uid("doc")
            for name, token, r in (("printed", printed[-1], "nightly-42"),
                                   ("runcast_token()", ns["runcast_token"]("user-1", [run], secret.encode()), run)):
                try:
                    c = ws(gw, headers=bearer(token))
                    subscribe(c, r)
                    c.close()
                except Exception as e:  # noqa: BLE001
                    problems.append((kind, name, repr(e)[:300]))
        finally:
            gw.stop()
    assert not problems, f"the documented token does not work with `up {' '.join(args)}`: {problems}"


def test_readme_with_tokens(launcher):
    """README "With tokens": the server block (secret from openssl, `up --demo`) and the openssl
    token block; the printed link's token must open the page's API."""
    exports, args = server_block("README.md", "RUNCAST_AUTH_HS256_SECRET")
    out = subprocess.run(["bash", "-c", f"echo {exports['RUNCAST_AUTH_HS256_SECRET']}"],
                         capture_output=True, text=True, timeout=20)
    secret = out.stdout.strip()
    assert len(secret) >= 32, out
    text = (ROOT / "README.md").read_text()
    m = re.search(r"RUNCAST_AUTH_HS256_SECRET[^\n]*\n[^`]*```\n.*?<!-- test -->\s*```sh\n(.*?)```", text, re.S)
    assert m, "README: no token block after the server block"
    block = m.group(1)
    gw = launcher.gateway("embedded", args, anonymous=False, anon_publish=False,
                          env={"RUNCAST_AUTH_HS256_SECRET": secret})
    try:
        out = subprocess.run(["bash", "-c", block.replace("127.0.0.1:8080", gw.addr)],
                             capture_output=True, text=True, timeout=20,
                             env=clean_env({"RUNCAST_AUTH_HS256_SECRET": secret}))
        assert out.returncode == 0, out.stderr
        link = out.stdout.strip().splitlines()[-1]
        assert link.startswith(gw.url + "/#token="), link
        token = link.split("#token=", 1)[1]
        assert httpc.get(gw.url, "/").status == 200
        assert httpc.get(gw.url, "/v1/runs").status == 401
        runs = wait_until(lambda: httpc.get(gw.url, "/v1/runs", headers=bearer(token)).json()["runs"],
                          15, what="demo runs with the token")
        c = ws(gw, subprotocols=["runcast.v1", "runcast.bearer." + token])
        assert c.hello["anonymous"] is False
        subscribe(c, runs[0]["run"])
        c.close()
    finally:
        gw.stop()


def test_tail_with_token_and_stops_at_once_on_401_403(auth_dep):
    import tokens
    run = uid("tt")
    publish_ok(auth_dep.a, run, [log("x"), {"kind": "complete", "data": {}}])
    ok = _tail(auth_dep, run, "--since", "0", "--token", tokens.hs256(runs=[run], run_prefixes=[]))
    assert ok.returncode == 0, (ok.stdout[-300:], ok.stderr[-300:])
    for token in ("garbage", tokens.hs256(runs=["someone-else"], run_prefixes=[])):
        t0 = time.monotonic()
        out = _tail(auth_dep, run, "--token", token, timeout=20)
        dt = time.monotonic() - t0
        assert out.returncode != 0, out
        assert dt < 5, f"tail should stop at once on 401/403, took {dt:.1f}s"


def test_doctor_on_a_healthy_gateway(dep):
    args = [runcast_bin(), "doctor", "--url", dep.a.url]
    if dep.kind == "nats":
        args += ["--nats", dep.nats.url]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=clean_env())
    assert out.returncode == 0, (out.stdout[-1500:], out.stderr[-1500:])


def test_doctor_on_a_protected_gateway(launcher, publish_key):
    """`runcast doctor --token "$TOKEN" --key "$KEY"` with a token for run_prefixes ["doctor-"]."""
    import tokens
    from conftest import AUDIENCE, ISSUER, SECRET
    kind = KINDS[0]
    gw = launcher.gateway(kind, ["--auth-hs256-secret", SECRET, "--auth-audience", AUDIENCE,
                                 "--auth-issuer", ISSUER, "--publish-key",
                                 publish_key["entry"].split(":")[0] + ":" + publish_key["entry"].split(":")[1] + ":doctor-"],
                          anonymous=False, anon_publish=False)
    try:
        token = tokens.hs256(run_prefixes=["doctor-"])
        out = subprocess.run([runcast_bin(), "doctor", "--url", gw.url, "--token", token, "--key",
                              publish_key["key"]], capture_output=True, text=True, timeout=60,
                             env=clean_env())
        assert out.returncode == 0, (out.stdout[-1500:], out.stderr[-1500:])
    finally:
        gw.stop()


def test_up_with_demo(launcher):
    """README quick start, with the built binary instead of `cargo run --release -p runcast-cli --`."""
    if "embedded" not in KINDS:
        pytest.skip("embedded only")
    gw = launcher.gateway("embedded", ["--demo", "--demo-jobs", "2"], anon_publish=False)
    try:
        assert (httpc.get(gw.url, "/").header("content-type") or "").startswith("text/html")
        runs = wait_until(lambda: get_json(gw, "/v1/runs")["runs"], 15, what="demo runs")
        c = ws(gw)
        st = subscribe(c, runs[0]["run"])
        assert st["state"] is not None
        c.close()
    finally:
        gw.stop()


def test_worker_publishes_demo_runs_through_nats(dep):
    if dep.kind != "nats":
        pytest.skip("NATS only")
    port = free_port()
    from harness import Proc
    p = Proc([runcast_bin(), "worker", "--nats", dep.nats.url, "--jobs", "2", "--metrics-listen",
              f"127.0.0.1:{port}"], os.path.join(os.path.dirname(dep.a.proc.log_path), f"worker-{port}.log"),
             env=clean_env())
    try:
        wait_until(lambda: httpc.get(f"http://127.0.0.1:{port}", "/healthz", timeout=1).status == 200,
                   15, what="worker /healthz")
        assert httpc.get(f"http://127.0.0.1:{port}", "/metrics").status == 200
        before = {s["run"] for s in get_json(dep.a, "/v1/runs?limit=1000")["runs"]}

        def new_runs():
            now = {s["run"] for s in get_json(dep.b, "/v1/runs?limit=1000")["runs"]}
            return now - before
        wait_until(new_runs, 20, what="worker runs visible through a gateway")
    finally:
        p.stop()


def test_crdgen_prints_the_crd():
    out = subprocess.run([runcast_bin(), "crdgen"], capture_output=True, text=True, timeout=20,
                         env=clean_env())
    assert out.returncode == 0, out.stderr
    assert "CustomResourceDefinition" in out.stdout and "RuncastCluster" in out.stdout


def test_flags_have_environment_variables(launcher):
    """README: "Every flag also has an environment variable"; a few, checked through hello."""
    kind = KINDS[0]
    gw = launcher.gateway(kind, env={"RUNCAST_MAX_SUBSCRIPTIONS": "7", "RUNCAST_MAX_FRAME": "2KiB",
                                     "RUNCAST_HEARTBEAT_INTERVAL": "3s"})
    try:
        c = ws(gw)
        assert (c.hello["max_subscriptions"], c.hello["max_frame_bytes"], c.hello["heartbeat_ms"]) == (7, 2048, 3000), c.hello
        c.close()
    finally:
        gw.stop()
