"""docs/security.md "TLS": the gateway terminates TLS itself, reloads changed files, refuses a
mismatched pair at startup."""

import datetime
import hashlib
import ipaddress
import os
import ssl
import time

import pytest

import httpc
from conftest import KINDS
from harness import log, open_sse, publish_ok, subscribe, uid, ws, assert_alive


def make_pair(cn="runcast-conformance"):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ctx_for(*cert_pems):
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata="".join(c.decode() for c in cert_pems))
    return ctx


def peer_fingerprint(port, ctx):
    import socket
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    der = t.getpeercert(binary_form=True)
    t.close()
    return hashlib.sha256(der).hexdigest()


@pytest.fixture(params=KINDS)
def tls_env(request, launcher, tmp_path):
    cert1, key1 = make_pair("one")
    cert_path, key_path = str(tmp_path / "tls.crt"), str(tmp_path / "tls.key")
    write_atomic(cert_path, cert1)
    write_atomic(key_path, key1)
    ctx = ctx_for(cert1)
    gw = launcher.gateway(request.param, ["--tls-cert", cert_path, "--tls-key", key_path,
                                          "--tls-reload-interval", "1s"], scheme="https",
                          ssl_context=ctx)
    yield {"gw": gw, "cert1": cert1, "cert_path": cert_path, "key_path": key_path,
           "kind": request.param, "tmp": tmp_path}
    gw.stop()


def test_https_wss_and_sse_over_tls(tls_env):
    gw = tls_env["gw"]
    assert httpc.get(gw.url, "/healthz", ssl_context=gw.ssl_context).status == 200
    run = uid()
    seqs = publish_ok(gw, run, log("over tls"))
    c = ws(gw)
    st = subscribe(c, run)
    assert st["seq"] == seqs[-1]
    c.close()
    s = open_sse(gw, run)
    assert s.status == 200
    assert s.next_frame(5)["type"] == "state"
    s.close()


def test_plain_http_to_the_tls_port_gets_no_http_response(tls_env):
    gw = tls_env["gw"]
    try:
        r = httpc.get(gw.url.replace("https", "http"), "/healthz", timeout=3)
        assert r.status != 200, "plain HTTP served on the TLS port"
    except Exception:  # noqa: BLE001
        pass
    assert httpc.get(gw.url, "/healthz", ssl_context=gw.ssl_context).status == 200


def test_changed_pair_is_served_to_new_connections(tls_env):
    gw = tls_env["gw"]
    cert2, key2 = make_pair("two")
    both = ctx_for(tls_env["cert1"], cert2)
    old = ws(gw)  # an open connection keeps its certificate
    fp1 = peer_fingerprint(gw.port, both)
    write_atomic(tls_env["key_path"], key2)
    write_atomic(tls_env["cert_path"], cert2)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    want = hashlib.sha256(x509.load_pem_x509_certificate(cert2).public_bytes(Encoding.DER)).hexdigest()
    deadline = time.monotonic() + 8
    fp = fp1
    while time.monotonic() < deadline:
        fp = peer_fingerprint(gw.port, both)
        if fp == want:
            break
        time.sleep(0.2)
    assert fp == want, "the new certificate was not served within 8 s (--tls-reload-interval 1s)"
    assert_alive(old)
    old.close()


def test_mismatched_pair_stops_startup_with_reason(launcher, tmp_path):
    kind = KINDS[0]
    cert1, _ = make_pair("a")
    _, key2 = make_pair("b")
    cp, kp = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    write_atomic(cp, cert1)
    write_atomic(kp, key2)
    gw = launcher.gateway(kind, ["--tls-cert", cp, "--tls-key", kp], wait=False, scheme="https")
    try:
        gw.proc.p.wait(15)
    except Exception:  # noqa: BLE001
        pass
    alive = gw.proc.alive()
    log_text = gw.proc.log_tail()
    gw.stop()
    assert not alive, "a gateway with a key that does not match its certificate kept running"
    assert gw.proc.p.returncode != 0
    assert any(w in log_text.lower() for w in ("key", "certificate", "match")), log_text
