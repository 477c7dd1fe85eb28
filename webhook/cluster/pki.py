"""Certificate material for self-managed mode: a CA and a serving certificate it signs (ECDSA P-256).

Pure functions over PEM bytes; the clock is an argument so rotation decisions are testable.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from outrider.webhook import certs


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _pem_pair(pair: certs.KeyPair) -> KeyPair:
    return KeyPair(pair.cert_pem, pair.key_pem)


def _load(pair: KeyPair) -> certs.KeyPair:
    ca_key = serialization.load_pem_private_key(pair.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the webhook CA key must be an EC key")
    return certs.KeyPair(ca_key, x509.load_pem_x509_certificate(pair.cert_pem))


def new_ca(now: datetime.datetime, validity: datetime.timedelta) -> KeyPair:
    # a unique subject per CA: two CAs in one bundle must not be confused by name
    return _pem_pair(
        certs.generate_ca(
            f"outrider-webhook-ca-{int(now.timestamp())}", now=now, validity=validity, organization="outrider"
        )
    )


def service_names(service: str, namespace: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return (f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local", *extra)


def issue_serving(
    ca: KeyPair, names: tuple[str, ...], now: datetime.datetime, validity: datetime.timedelta
) -> KeyPair:
    return _pem_pair(certs.issue_serving_cert(_load(ca), names, now=now, validity=validity))


def not_after(cert_pem: bytes) -> datetime.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def fingerprint(cert_pem: bytes) -> str:
    """sha256 of the DER certificate, hex; what replicas publish about the CA they serve under."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def issuer_matches(cert_pem: bytes, ca_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # any failure means "not this CA"
        return False
    return True
