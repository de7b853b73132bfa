"""Subscriber tokens for the token matrix (docs/security.md), valid and forged."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt as pyjwt

from conftest import AUDIENCE, ISSUER, SECRET

DROP = object()


def b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def claims(**over):
    now = int(time.time())
    c = {"sub": "conformance", "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 600,
         "run_prefixes": [""]}
    for k, v in over.items():
        if v is DROP:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def hs256(secret=SECRET, headers=None, **over) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return pyjwt.encode(claims(**over), key, algorithm="HS256", headers=headers)


def raw_token(header: dict, payload: dict, key: bytes | None, digest=hashlib.sha256) -> str:
    """A hand-made JWS: HMAC with any key bytes (for algorithm confusion), or unsigned."""
    signing_input = b64u(json.dumps(header).encode()) + "." + b64u(json.dumps(payload).encode())
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return signing_input + "." + b64u(sig)


def alg_none(**over) -> str:
    return raw_token({"alg": "none", "typ": "JWT"}, claims(**over), None)


def bad_signature(**over) -> str:
    """A token for our claims whose signature is another secret's (same length, so well-formed)."""
    good = hs256(**over)
    other = hs256(secret="X" * len(SECRET), **over)
    return good.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]


def rs256(private_key, kid, **over) -> str:
    return pyjwt.encode(claims(**over), private_key, algorithm="RS256", headers={"kid": kid})


def es256(private_key, kid, **over) -> str:
    return pyjwt.encode(claims(**over), private_key, algorithm="ES256", headers={"kid": kid})


def bearer(token, scheme="Bearer"):
    return {"Authorization": f"{scheme} {token}"}
