"""Fixtures: runcast deployments (embedded bus, and NATS JetStream with two gateways).

Every deployment fixture is parametrized over CONF_KINDS (default "embedded,nats"), so each test
runs against both buses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from harness import Launcher  # noqa: E402

KINDS = [k.strip() for k in os.environ.get("CONF_KINDS", "embedded,nats").split(",") if k.strip()]


def pytest_report_header(config):
    try:
        b = harness.runcast_bin()
        v = subprocess.run([b, "--version"], capture_output=True, text=True, timeout=10).stdout
    except Exception as e:  # noqa: BLE001
        b, v = "?", str(e)
    return [f"runcast: {b} ({v.strip()})", f"nats-server: {harness.nats_server_bin()}",
            f"deployments: {', '.join(KINDS)}"]


@pytest.fixture(scope="session")
def launcher(tmp_path_factory):
    lc = Launcher(str(tmp_path_factory.mktemp("runcast")))
    yield lc
    lc.stop_all()


def _dep_fixture(args=(), n=2, own_nats=False, **kw):
    @pytest.fixture(scope="session", params=KINDS)
    def fx(request, launcher):
        d = launcher.deploy(request.param, list(args), n=n, own_nats=own_nats, **kw)
        yield d
        d.stop()
    return fx


# The main deployments: default limits (so the documented defaults are checked).
dep = _dep_fixture()

# Short timeouts and small limits.
LIMITS = ["--heartbeat-interval", "1s", "--heartbeat-timeout", "1s", "--max-frame", "1KiB",
          "--max-subscriptions", "4", "--max-publish", "8KiB", "--max-batch", "5",
          "--request-timeout", "1s", "--header-read-timeout", "1s", "--handshake-timeout", "1s"]
limits_dep = _dep_fixture(LIMITS, n=1)

# Small live queues, for the slow-consumer close (default heartbeats so 4001 cannot race 4000).
slow_dep = _dep_fixture(["--queue-messages", "32", "--queue-bytes", "64KiB"], n=1)

# Per-address session caps / rates and the connection cap.
caps_dep = _dep_fixture(["--max-sessions-per-ip", "3"], n=1)
rate_dep = _dep_fixture(["--session-rate-per-ip", "2"], n=1)
conn_dep = _dep_fixture(["--max-connections", "3"], n=1)

# Browser origins.
ORIGIN = "https://app.example.com"
origin_dep = _dep_fixture(["--allowed-origin", ORIGIN], n=1)


# Retention: 5 events per run (embedded) / per run and kind (NATS), on a private NATS server so
# the shared stream's limits are not changed.
@pytest.fixture(scope="session", params=KINDS)
def gap_dep(request, launcher):
    d = launcher.deploy(request.param, ["--history-events", "5"], n=2, own_nats=True)
    yield d
    d.stop()


# ------------------------------------------------------------------------------ auth material

SECRET = "conformance-secret-0123456789-abcdefghijklmnop"  # 46 bytes
AUDIENCE = "runcast"
ISSUER = "https://issuer.example"


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    d = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pub_pem(k):
        return k.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)

    (d / "rs1.pem").write_bytes(pub_pem(rsa_key))
    (d / "es1.pem").write_bytes(pub_pem(ec_key))

    import jwt as pyjwt
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm
    jwk_rsa = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwk_rsa.update({"kid": "jwks-rs", "alg": "RS256", "use": "sig"})
    jwk_ec = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    jwk_ec.update({"kid": "jwks-es", "alg": "ES256", "use": "sig"})
    (d / "jwks.json").write_text(json.dumps({"keys": [jwk_rsa, jwk_ec]}))
    del pyjwt
    return {
        "dir": str(d), "rsa": rsa_key, "ec": ec_key, "other_rsa": other_rsa,
        "rs_pem": str(d / "rs1.pem"), "es_pem": str(d / "es1.pem"),
        "rs_pub_pem": pub_pem(rsa_key), "jwks": str(d / "jwks.json"),
    }


@pytest.fixture(scope="session", params=KINDS)
def auth_dep(request, launcher):
    """HS256 tokens required, with audience and issuer; HTTP publishing open."""
    d = launcher.deploy(request.param, ["--auth-hs256-secret", SECRET, "--auth-audience", AUDIENCE,
                                        "--auth-issuer", ISSUER],
                        n=2, anonymous=False, anon_publish=True)
    yield d
    d.stop()


@pytest.fixture(scope="session", params=KINDS)
def auth_anon_dep(request, launcher):
    """HS256 tokens and anonymous access both on: a bad token must not fall back to anonymous."""
    d = launcher.deploy(request.param, ["--auth-hs256-secret", SECRET, "--allow-anonymous"], n=1,
                        anonymous=False, anon_publish=True)
    yield d
    d.stop()


@pytest.fixture(scope="session", params=KINDS)
def pem_dep(request, launcher, keys):
    """RS256 and ES256 public keys with explicit kids (rotation: several keys at once)."""
    d = launcher.deploy(request.param, ["--auth-key", f"rs1={keys['rs_pem']}",
                                        "--auth-key", f"es1={keys['es_pem']}"],
                        n=1, anonymous=False, anon_publish=True)
    yield d
    d.stop()


@pytest.fixture(scope="session", params=KINDS)
def jwks_dep(request, launcher, keys):
    d = launcher.deploy(request.param, ["--auth-jwks", keys["jwks"]], n=1, anonymous=False,
                        anon_publish=True)
    yield d
    d.stop()


@pytest.fixture(scope="session")
def publish_key():
    """A key minted with `runcast publish-key ci build- test-` (the docs' example)."""
    b = harness.runcast_bin()
    out = subprocess.run([b, "publish-key", "ci", "build-", "test-"], capture_output=True,
                         text=True, timeout=20, env=harness.clean_env())
    assert out.returncode == 0, out.stderr
    return parse_publish_key_output(out.stdout + "\n" + out.stderr)


def parse_publish_key_output(text):
    """Finds the key and the `ci:<sha256>:build-|test-` entry in publish-key's output."""
    import re
    entry = None
    for tok in re.findall(r"[A-Za-z0-9_.-]+:[0-9a-f]{64}(?::[^\s'\"]*)?", text):
        entry = tok
        break
    key = None
    for tok in text.split():
        if entry and (tok == entry or tok in entry):
            continue
        if re.fullmatch(r"[A-Za-z0-9_\-+/=.~]{16,}", tok):
            key = tok
            break
    return {"key": key, "entry": entry, "output": text}


@pytest.fixture(scope="session", params=KINDS)
def pubkey_dep(request, launcher, publish_key):
    assert publish_key["entry"], publish_key["output"]
    d = launcher.deploy(request.param, ["--publish-key", publish_key["entry"],
                                        "--max-publish", "4KiB"],
                        n=1, anon_publish=False)
    yield d
    d.stop()
