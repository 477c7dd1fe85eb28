"""Pure decisions about SVIDs: Workload API messages to `X509Material`, JWT-SVID lifetimes,
what a gRPC failure means for the operator, and the retry backoff. No sockets here.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_der_private_key,
)

from outrider.sidecar.identity import X509Material


class SvidFormatError(ValueError):
    """The Workload API sent something that is not a usable SVID (message never holds key material)."""


def der_certs_to_pem(der: bytes) -> tuple[bytes, list[x509.Certificate]]:
    """The Workload API concatenates ASN.1 DER certificates; return them as PEM (and parsed)."""
    try:
        certs = [x509.load_der_x509_certificate(part) for part in split_der(der)]
    except ValueError as exc:
        raise SvidFormatError(f"certificate chain is not DER: {exc}") from None
    if not certs:
        raise SvidFormatError("empty certificate chain")
    return b"".join(cert.public_bytes(Encoding.PEM) for cert in certs), certs


def split_der(data: bytes) -> list[bytes]:
    """Split concatenated ASN.1 DER SEQUENCEs (how the Workload API sends chains and bundles)."""
    parts: list[bytes] = []
    pos = 0
    while pos < len(data):
        if data[pos] != 0x30 or pos + 2 > len(data):
            raise ValueError(f"no DER SEQUENCE at byte {pos}")
        first = data[pos + 1]
        header = 2
        length = first
        if first & 0x80:
            count = first & 0x7F
            if count == 0 or count > 4 or pos + 2 + count > len(data):
                raise ValueError(f"bad DER length at byte {pos}")
            length = int.from_bytes(data[pos + 2 : pos + 2 + count], "big")
            header += count
        end = pos + header + length
        if end > len(data):
            raise ValueError(f"truncated DER element at byte {pos}")
        parts.append(data[pos:end])
        pos = end
    return parts


def spiffe_id_of(cert: x509.Certificate) -> str | None:
    """The one `spiffe://` URI SAN of a certificate, or None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None


def trust_domain_of(spiffe_id: str) -> str:
    return spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


def material_from_response(
    spiffe_id: str,
    cert_chain_der: bytes,
    key_der: bytes,
    bundle_der: bytes,
    federated: Mapping[str, bytes],
) -> X509Material:
    """Build the immutable snapshot the rest of the sidecar reads from one X509SVID message."""
    chain_pem, chain = der_certs_to_pem(cert_chain_der)
    if spiffe_id_of(chain[0]) != spiffe_id:
        raise SvidFormatError(f"leaf certificate does not carry the SPIFFE ID {spiffe_id}")
    try:
        key = load_der_private_key(key_der, password=None)
    except (ValueError, TypeError):
        raise SvidFormatError("private key is not unencrypted PKCS#8 DER") from None
    key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    bundles: dict[str, bytes] = {trust_domain_of(spiffe_id): der_certs_to_pem(bundle_der)[0]}
    for name, der in federated.items():
        # federated_bundles are keyed by the foreign trust domain's SPIFFE ID (spiffe://td) or name
        bundles[trust_domain_of(name)] = der_certs_to_pem(der)[0]
    return X509Material(
        spiffe_id=spiffe_id,
        cert_chain_pem=chain_pem,
        private_key_pem=key_pem,
        bundles_pem=bundles,
        not_after=chain[0].not_valid_after_utc.timestamp(),
    )


def leaf_serial(material: X509Material) -> int:
    return x509.load_pem_x509_certificate(material.cert_chain_pem).serial_number


@dataclass(frozen=True)
class JwtTimes:
    issued_at: float
    expires_at: float


def jwt_times(token: str, *, now: float) -> JwtTimes:
    """Read `iat`/`exp` from a JWT-SVID the agent just gave us (its signature is the agent's business)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        expires = float(claims["exp"])
        issued = claims.get("iat")
        issued_at = float(issued) if isinstance(issued, int | float) else now
    except (IndexError, ValueError, KeyError, TypeError, OverflowError):  # huge ints overflow float()
        raise SvidFormatError("JWT-SVID has no readable exp claim") from None
    return JwtTimes(issued_at=issued_at, expires_at=expires)


def jwt_refresh_at(times: JwtTimes, fraction: float) -> float:
    return times.issued_at + (times.expires_at - times.issued_at) * fraction


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": at least half the step, so retries never hammer."""
    step = min(high, low * float(2 ** min(attempt, 30)))
    jitter: float = (rng or random.Random()).uniform(0, step / 2)
    return step / 2 + jitter


# Health states, in the words the status line and the metrics use.
OK = "ok"
STARTING = "starting"
SOCKET_MISSING = "socket_missing"
NO_ENTRY = "no_registration_entry"
AGENT_UNAVAILABLE = "agent_unavailable"
BAD_RESPONSE = "bad_response"
ERROR = "error"
STATES = (OK, STARTING, SOCKET_MISSING, NO_ENTRY, AGENT_UNAVAILABLE, BAD_RESPONSE, ERROR)


def classify(code_name: str, details: str, *, socket_path: str, socket_exists: bool) -> tuple[str, str]:
    """Turn a failed Workload API call into (state, one line saying what to check)."""
    if not socket_exists:
        return SOCKET_MISSING, (
            f"Workload API socket {socket_path} does not exist: if this persists, check the SPIFFE CSI "
            "driver volume (csi.spiffe.io) is mounted and the SPIRE agent runs on this node (it removes "
            "the socket while restarting)"
        )
    if code_name == "PERMISSION_DENIED":
        return NO_ENTRY, (
            f"the SPIRE agent issued no identity to this workload (PermissionDenied: {details}): "
            "create a registration entry whose selectors match this pod (e.g. k8s:ns/k8s:sa or unix:uid)"
        )
    if code_name in {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN", "STREAM_ENDED"}:
        return AGENT_UNAVAILABLE, (
            f"cannot reach the SPIRE agent at {socket_path} ({code_name}): the agent may be restarting; "
            "retrying with backoff"
        )
    return ERROR, f"Workload API call failed with {code_name}: {details}"
