"""Test doubles for the token-exchange tests: a SPIFFE authority that signs JWT/X.509-SVIDs in
process and a `WorkloadIdentity` over it (the dev Workload API replaces them where it is used).
"""

from __future__ import annotations

import datetime
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

from outrider.sidecar.identity import IdentityUnavailable, X509Material

TRUST_DOMAIN = "example.org"
SIDECAR_ID = "spiffe://example.org/ns/mcp/sa/weather"
DOWNSTREAM = "https://api.example.com"


@dataclass
class SpiffeAuthority:
    """Signs JWT-SVIDs like a SPIRE agent would (ES256, kid in the header, aud as a list)."""

    trust_domain: str = TRUST_DOMAIN
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    signed: list[str] = field(default_factory=list)

    @property
    def jwks(self) -> dict[str, Any]:
        jwk = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "use": "jwt-svid"}]}

    def jwt_svid(self, spiffe_id: str, audience: str | list[str], ttl: float = 300) -> str:
        now = int(time.time())
        aud = [audience] if isinstance(audience, str) else audience
        token = jwt.encode(
            {"sub": spiffe_id, "aud": aud, "iat": now, "exp": int(now + ttl)},
            self.key,
            algorithm="ES256",
            headers={"kid": self.kid, "typ": "JWT"},
        )
        self.signed.append(token)
        return token


class FakeIdentity:
    """A `WorkloadIdentity` over the in-process authority (until the dev Workload API is used)."""

    def __init__(self, authority: SpiffeAuthority, spiffe_id: str = SIDECAR_ID) -> None:
        self.authority = authority
        self._spiffe_id = spiffe_id
        self.available = True
        self.material: X509Material | None = None
        self.jwt_audiences: list[str] = []

    @property
    def spiffe_id(self) -> str | None:
        return self._spiffe_id

    @property
    def ready(self) -> bool:
        return self.available

    @property
    def status(self) -> str:
        return "ok" if self.available else "no SVID: test switched identity off"

    def x509(self) -> X509Material:
        if not self.available or self.material is None:
            raise IdentityUnavailable("no X.509-SVID held")
        return self.material

    async def jwt_svid(self, audience: str) -> str:
        if not self.available:
            raise IdentityUnavailable("Workload API unreachable (test)")
        self.jwt_audiences.append(audience)
        return self.authority.jwt_svid(self._spiffe_id, audience)


# -- X.509 helpers for RFC 8705 mTLS ---------------------------------------------------------


@dataclass
class Pki:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str, *, spiffe_td: str | None = None) -> Pki:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    )
    if spiffe_td:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{spiffe_td}")]),
            critical=False,
        )
    return Pki(key, builder.sign(key, hashes.SHA256()))


def issue_leaf(ca: Pki, *, uri: str | None = None, ip: str | None = None) -> Pki:
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    if uri:
        sans.append(x509.UniformResourceIdentifier(uri))
    if ip:
        sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("leaf"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Pki(key, cert)


def material_for(leaf: Pki, ca: Pki, spiffe_id: str) -> X509Material:
    return X509Material(
        spiffe_id=spiffe_id,
        cert_chain_pem=leaf.pem,
        private_key_pem=leaf.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        bundles_pem={TRUST_DOMAIN: ca.pem},
        not_after=leaf.cert.not_valid_after_utc.timestamp(),
    )


def idp_tls(directory: Path, client_bundle_pem: bytes) -> tuple[ssl.SSLContext, str]:
    """A TLS server context for the dev IdP (web CA server cert, optional SVID client certs verified
    against `client_bundle_pem`) and the path of the web CA file the exchanger should trust."""
    web_ca = make_ca("web-ca")
    server = issue_leaf(web_ca, ip="127.0.0.1")
    (directory / "server.pem").write_bytes(server.pem)
    (directory / "server.key").write_bytes(
        server.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    (directory / "web-ca.pem").write_bytes(web_ca.pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.pem", directory / "server.key")
    context.load_verify_locations(cadata=client_bundle_pem.decode())
    context.verify_mode = ssl.CERT_OPTIONAL  # other clients authenticate with secrets or assertions
    return context, str(directory / "web-ca.pem")
