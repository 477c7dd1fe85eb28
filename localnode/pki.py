"""The node's PKI: one ECDSA CA for the apiserver, kubelet and clients, plus the service-account key.

Written once per state directory (keys 0600) and reused by every later `up`; `down` deletes it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from localnode.config import NodeConfig
from localnode.render import node_ips
from outrider.webhook.certs import KeyPair, generate_ca, key_pem, load_keypair


@dataclass(frozen=True)
class CertSpec:
    """One certificate: file stem, subject (CN, O) and what it is for."""

    stem: str
    common_name: str
    organizations: tuple[str, ...] = ()
    sans: tuple[str, ...] = ()
    server: bool = False
    client: bool = True


def cert_specs(cfg: NodeConfig) -> tuple[CertSpec, ...]:
    ips = tuple(node_ips(cfg))
    api_sans = (
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        f"kubernetes.default.svc.{cfg.cluster_domain}",
        "localhost",
        "127.0.0.1",
        cfg.api_service_ip,
        *ips,
    )
    return (
        CertSpec("apiserver", "kube-apiserver", sans=api_sans, server=True, client=False),
        CertSpec("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)),
        CertSpec("admin", "outrider-node-admin", ("system:masters",)),
        CertSpec("controller-manager", "system:kube-controller-manager"),
        CertSpec("scheduler", "system:kube-scheduler"),
        CertSpec("kubelet", f"system:node:{cfg.node_name}", ("system:nodes",)),
        CertSpec("kubelet-serving", f"system:node:{cfg.node_name}", sans=(cfg.node_name, *ips), server=True),
        CertSpec("kube-proxy", "system:kube-proxy"),
        CertSpec("coredns", "outrider-node:coredns"),
        CertSpec("spire-agent", "outrider-node:spire-agent"),
        CertSpec("spire-controller-manager", "outrider-node:spire-controller-manager"),
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue(ca: KeyPair, spec: CertSpec, days: int = 365) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in spec.organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name))
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if spec.server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if spec.client else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if spec.sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(n) for n in dict.fromkeys(spec.sans)]), critical=False
        )
    return KeyPair(key, builder.sign(ca.key, hashes.SHA256()))


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def ensure_pki(cfg: NodeConfig) -> None:
    """Create the CA, every certificate in `cert_specs` and the service-account key pair if missing."""
    pki = cfg.pki
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    ca_crt, ca_key = pki / "ca.crt", pki / "ca.key"
    if ca_crt.exists() and ca_key.exists():
        ca = load_keypair(ca_crt, ca_key)
    else:
        ca = generate_ca("outrider-node CA", days=3650)
        _write(ca_key, ca.key_pem, private=True)
        _write(ca_crt, ca.cert_pem, private=False)
    for spec in cert_specs(cfg):
        crt, key = pki / f"{spec.stem}.crt", pki / f"{spec.stem}.key"
        if crt.exists() and key.exists():
            continue
        pair = issue(ca, spec)
        _write(key, pair.key_pem, private=True)
        _write(crt, pair.cert_pem, private=False)
    if not (pki / "sa.key").exists():
        sa = ec.generate_private_key(ec.SECP256R1())
        _write(pki / "sa.key", key_pem(sa), private=True)
        pub = sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _write(pki / "sa.pub", pub, private=False)
