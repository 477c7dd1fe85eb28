"""Dev certificates for the webhook: an ECDSA P-256 CA and a serving certificate it signs.

Reusable pieces (`generate_ca`, `issue_serving_cert`, PEM helpers) plus `outrider certs --out DIR`,
which writes ca.crt, ca.key, tls.crt and tls.key (keys 0600) and reuses an existing CA in DIR.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DNS_NAMES = ("outrider-webhook.outrider-system.svc", "localhost", "127.0.0.1")


@dataclass(frozen=True)
class KeyPair:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def generate_ca(
    common_name: str = "Outrider dev CA",
    days: int = 3650,
    *,
    now: datetime.datetime | None = None,
    validity: datetime.timedelta | None = None,
    organization: str | None = None,
) -> KeyPair:
    """A self-signed ECDSA P-256 CA; `now`/`validity` override the clock and `days` (for rotation)."""
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)] if organization else []
    name = x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = now or _now()
    validity = validity or datetime.timedelta(days=days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(key, cert)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_serving_cert(
    ca: KeyPair,
    names: tuple[str, ...] | list[str],
    days: int = 365,
    *,
    now: datetime.datetime | None = None,
    validity: datetime.timedelta | None = None,
) -> KeyPair:
    """A TLS server certificate for `names` (DNS names or IP addresses), signed by `ca`.

    It never outlives its CA; `now`/`validity` override the clock and `days` (for rotation).
    """
    if not names:
        raise ValueError("a serving certificate needs at least one DNS name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or _now()
    not_after = min(now + (validity or datetime.timedelta(days=days)), ca.cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in dict.fromkeys(names)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return KeyPair(key, cert)


def load_keypair(cert_path: Path, key_path: Path) -> KeyPair:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} does not hold an ECDSA private key")
    return KeyPair(key, cert)


def _write(path: Path, data: bytes, private: bool) -> None:
    # Create keys with 0600 from the start, so there is no moment where they are world-readable.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    if private:
        path.chmod(0o600)


def write_certs(out: Path, names: tuple[str, ...] | list[str], days: int = 365) -> KeyPair:
    """Write DIR/ca.crt, ca.key, tls.crt, tls.key; an existing CA in DIR is reused."""
    out.mkdir(parents=True, exist_ok=True)
    ca_crt, ca_key = out / "ca.crt", out / "ca.key"
    ca = load_keypair(ca_crt, ca_key) if ca_crt.exists() and ca_key.exists() else generate_ca()
    serving = issue_serving_cert(ca, names, days)
    _write(ca_crt, ca.cert_pem, private=False)
    _write(ca_key, ca.key_pem, private=True)
    _write(out / "tls.crt", serving.cert_pem, private=False)
    _write(out / "tls.key", serving.key_pem, private=True)
    return serving


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for ca.crt, ca.key, tls.crt, tls.key")
    parser.add_argument(
        "--dns-name",
        action="append",
        default=[],
        metavar="NAME",
        help=f"extra DNS name or IP for the serving cert (always included: {', '.join(DEFAULT_DNS_NAMES)})",
    )
    parser.add_argument("--days", type=int, default=365, help="serving certificate lifetime (default: 365)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    names = [*DEFAULT_DNS_NAMES, *args.dns_name]
    try:
        write_certs(out, names, args.days)
    except (OSError, ValueError) as exc:
        print(f"error: cannot write certificates to {out}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}/ca.crt, {out}/tls.crt and {out}/tls.key (keys 0600) for {', '.join(names)}")
    return 0
