"""The client side of DPoP for tests: a key pair and RFC 9449 proofs (as an MCP client would make)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class DpopKey:
    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.jwk: dict[str, Any] = ECAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        members = {k: self.jwk[k] for k in ("crv", "kty", "x", "y")}
        self.jkt = _b64(hashlib.sha256(json.dumps(members, separators=(",", ":")).encode()).digest())

    def proof(
        self,
        method: str,
        url: str,
        access_token: str | None,
        *,
        nonce: str | None = None,
        iat: float | None = None,
        jti: str | None = None,
        typ: str = "dpop+jwt",
        jwk: dict[str, Any] | None = None,
        claims_override: dict[str, Any] | None = None,
    ) -> str:
        claims: dict[str, Any] = {
            "jti": jti or uuid.uuid4().hex,
            "htm": method,
            "htu": url,
            "iat": int(time.time() if iat is None else iat),
        }
        if access_token is not None:
            claims["ath"] = _b64(hashlib.sha256(access_token.encode()).digest())
        if nonce is not None:
            claims["nonce"] = nonce
        claims.update(claims_override or {})
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"typ": typ, "jwk": jwk or self.jwk})
