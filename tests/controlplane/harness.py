"""A real etcd + kube-apiserver on loopback for tests: generated PKI, admin kubeconfig, log files.

`ControlPlane.start(workdir)` returns once /readyz answers; `stop()` tears both processes down.
Binaries come from `scripts/build-upstream.sh controlplane` (cached; the last output line is the PATH).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from outrider.webhook.certs import generate_ca

REPO = Path(__file__).resolve().parents[2]


class ControlPlaneError(RuntimeError):
    pass


def find_binaries() -> tuple[Path, Path]:
    """Locate kube-apiserver and etcd via the build script (which returns at once when cached)."""
    out = subprocess.run(
        [str(REPO / "scripts" / "build-upstream.sh"), "controlplane"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise ControlPlaneError(f"scripts/build-upstream.sh controlplane failed:\n{out.stderr[-2000:]}")
    dirs = [Path(p) for p in out.stdout.strip().splitlines()[-1].split(":")]

    def pick(name: str) -> Path:
        for d in dirs:
            if (d / name).is_file():
                return d / name
        raise ControlPlaneError(f"{name} not found in {dirs}")

    return pick("kube-apiserver"), pick("etcd")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- PKI -------------------------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


def make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    pair = generate_ca(common_name, days=2)
    return pair.cert, pair.key


def issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    *,
    organizations: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    server: bool = False,
) -> Issued:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(_pem_cert(builder.sign(ca_key, hashes.SHA256())), _pem_key(key))


# --- processes -------------------------------------------------------------------------------------


@dataclass
class ControlPlane:
    workdir: Path
    apiserver_port: int = 0
    etcd_port: int = 0
    kubeconfig: Path = field(default_factory=Path)
    ca_pem: bytes = b""
    etcd_log: Path = field(default_factory=Path)
    apiserver_log: Path = field(default_factory=Path)
    audit_log: Path = field(default_factory=Path)
    startup_seconds: float = 0.0
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    def logs_hint(self) -> str:
        return (
            f"control plane logs: etcd {self.etcd_log}, kube-apiserver {self.apiserver_log}, "
            f"audit {self.audit_log}"
        )

    @classmethod
    def start(cls, workdir: Path, *, timeout: float = 120.0) -> ControlPlane:
        apiserver_bin, etcd_bin = find_binaries()
        workdir.mkdir(parents=True, exist_ok=True)
        cp = cls(workdir=workdir)
        t0 = time.monotonic()
        try:
            cp._write_pki()
            cp._start_etcd(etcd_bin)
            cp._start_apiserver(apiserver_bin)
            cp._wait_ready(timeout)
        except BaseException:
            cp.stop()
            raise
        cp.startup_seconds = time.monotonic() - t0
        return cp

    def _write_pki(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        ca = make_ca("outrider-test-cluster-ca")
        self.ca_pem = _pem_cert(ca[0])
        (pki / "ca.crt").write_bytes(self.ca_pem)
        serving = issue(
            ca,
            "kube-apiserver",
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            ips=("127.0.0.1", "10.0.0.1"),
            server=True,
        )
        (pki / "apiserver.crt").write_bytes(serving.cert_pem)
        (pki / "apiserver.key").write_bytes(serving.key_pem)
        admin = issue(ca, "outrider-test-admin", organizations=("system:masters",))
        (pki / "admin.crt").write_bytes(admin.cert_pem)
        (pki / "admin.key").write_bytes(admin.key_pem)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (pki / "sa.key").write_bytes(_pem_key(sa_key))
        (pki / "sa.pub").write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        for p in pki.glob("*.key"):
            p.chmod(0o600)

    def _spawn(self, argv: list[str], log: Path) -> None:
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append(proc)

    def _start_etcd(self, etcd_bin: Path) -> None:
        self.etcd_port = free_port()
        peer = free_port()
        self.etcd_log = self.workdir / "etcd.log"
        self._spawn(
            [
                str(etcd_bin),
                "--name=outrider-test",
                f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=outrider-test=http://127.0.0.1:{peer}",
                # test data is throw-away: skip fsync so a shared 2-core box stays responsive
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            self.etcd_log,
        )

    def _start_apiserver(self, apiserver_bin: Path) -> None:
        pki = self.workdir / "pki"
        self.apiserver_port = free_port()
        self.apiserver_log = self.workdir / "kube-apiserver.log"
        # Metadata-level audit of service-account callers only: the RBAC test reads which calls the
        # webhook's own identity made and what the apiserver answered
        self.audit_log = self.workdir / "audit.jsonl"
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "audit.k8s.io/v1",
                    "kind": "Policy",
                    "omitStages": ["RequestReceived", "ResponseStarted"],
                    "rules": [
                        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                        {"level": "None"},
                    ],
                }
            )
        )
        self._spawn(
            [
                str(apiserver_bin),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=RBAC",
                "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,MutatingAdmissionWebhook,"
                "ValidatingAdmissionWebhook,ResourceQuota,PodSecurity",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-mode=blocking",
                "--v=1",
            ],
            self.apiserver_log,
        )

    def _ssl(self) -> ssl.SSLContext:
        pki = self.workdir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return ctx

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ctx = self._ssl()
        last = ""
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise ControlPlaneError(
                        f"{proc.args[0]} exited with {proc.returncode}; {self.logs_hint()}"
                    )
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=ctx, timeout=5) as resp:  # noqa: S310
                    if resp.status == 200:
                        self._write_kubeconfig()
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.3)
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout}s ({last}); {self.logs_hint()}")

    def _write_kubeconfig(self) -> None:
        import base64

        pki = self.workdir / "pki"

        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "outrider-test",
                    "cluster": {"server": self.url, "certificate-authority-data": b64(pki / "ca.crt")},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(pki / "admin.crt"),
                        "client-key-data": b64(pki / "admin.key"),
                    },
                }
            ],
            "contexts": [{"name": "outrider-test", "context": {"cluster": "outrider-test", "user": "admin"}}],
            "current-context": "outrider-test",
        }
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(doc))
        self.kubeconfig.chmod(0o600)

    def stop(self) -> None:
        # apiserver first (it holds etcd connections), then etcd, each fully gone before the next
        for proc in reversed(self._procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                # throw-away data: no reason to wait out the apiserver's graceful drain
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._procs.clear()


if __name__ == "__main__":  # manual use: python tests/controlplane/harness.py /tmp/cp
    import sys

    cp = ControlPlane.start(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/outrider-cp"))
    print(f"ready in {cp.startup_seconds:.1f}s: KUBECONFIG={cp.kubeconfig}; {cp.logs_hint()}", flush=True)
    try:
        signal.pause()
    finally:
        cp.stop()
