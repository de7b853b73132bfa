"""https:// gateways (runcast terminating TLS itself): every client path speaks TLS, verifies the
certificate, and reports a TLS failure at once instead of retrying it."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import time

import pytest
from support import Gateway, bounded, runcast_bin, transport_params, uid

import runcast

cryptography = pytest.importorskip("cryptography")


def _self_signed(dirpath: str) -> tuple:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "runcast-python-tests")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(dirpath, "tls.crt")
    key_path = os.path.join(dirpath, "tls.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_gw(procs, workdir):
    cert, key = _self_signed(workdir)
    ctx = ssl.create_default_context(cafile=cert)
    gw = procs.add(Gateway([runcast_bin(), "up", "--tls-cert", cert, "--tls-key", key],
                           workdir, "tls", scheme="https", ssl_context=ctx))
    return gw, ctx


@pytest.mark.parametrize("transport", transport_params())
def test_publish_and_subscribe_over_tls(tls_gw, transport):
    gw, ctx = tls_gw
    run = uid("tls")
    with runcast.Publisher(gw.url, run, ssl_context=ctx) as p:
        first = p.log("sync over tls")

    async def main() -> list:
        async with runcast.AsyncPublisher(gw.url, run, ssl_context=ctx) as ap:
            second = await ap.complete({"tls": True})
        items = [i async for i in runcast.subscribe(gw.url, run, since=0, ssl_context=ctx,
                                                    transport=transport, until_finished=True)]
        assert [i.seq for i in items[1:]] == [first, second]
        return items

    bounded(main(), 20)


def test_untrusted_certificate_fails_at_once(tls_gw):
    gw, _ = tls_gw
    slow = runcast.Backoff(2.0, 2.0)  # any retry would show in the elapsed time
    t0 = time.monotonic()
    with pytest.raises(runcast.TransportError) as e:
        runcast.Publisher(gw.url, uid("tls"), backoff=slow).log("x")
    assert "certificate" in str(e.value).lower() or "tls" in str(e.value).lower()

    async def main() -> None:
        with pytest.raises(runcast.TransportError):
            async with runcast.AsyncPublisher(gw.url, uid("tls"), backoff=slow) as ap:
                await ap.log("x")
        with pytest.raises(runcast.TransportError):
            async for _ in runcast.subscribe(gw.url, uid("tls"), backoff=slow):
                pass

    bounded(main(), 20)
    assert time.monotonic() - t0 < 2.0, "a TLS failure was retried"


def test_tls_to_a_plain_port_fails_at_once(embedded):
    url = embedded.url.replace("http://", "https://")
    t0 = time.monotonic()
    with pytest.raises(runcast.TransportError):
        runcast.Publisher(url, uid("tls"), backoff=runcast.Backoff(2.0, 2.0)).log("x")
    assert time.monotonic() - t0 < 2.0
