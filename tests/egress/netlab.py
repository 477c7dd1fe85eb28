"""A pod network namespace wired by veth to an "internet" namespace, for egress tests and the benchmark.

The pod runs the real `outrider iptables` rules, the egress sidecar as UID 15337 and app processes as
UID 1000; the internet runs DNS, TLS (certs from a throw-away CA), HTTP, TCP echo and UDP echo on
addresses that exist only inside these namespaces. Everything is removed on exit, even on failure.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from outrider.sidecar.demo.uid_access import UidAccessError, check_runnable_as, require_runnable_as

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
HERE = Path(__file__).resolve().parent
APP_UID = 1000
SIDECAR_UID = 15337

POD_V4, GW_V4 = "10.200.0.2", "10.200.0.1"
POD_V6, GW_V6 = "fd00:200::2", "fd00:200::1"
DNS_LISTED, DNS_UNLISTED = "10.200.1.1", "10.200.1.2"
ALLOWED_V4, DENIED_V4 = "10.200.1.10", "10.200.1.20"
ALLOWED_V6, DENIED_V6 = "fd00:201::10", "fd00:201::20"
CIDR_HOST_V4, CIDR_HOST_V6 = "10.200.2.5", "fd00:202::5"
SINK_V4 = "10.200.3.1"
META_V4 = "169.254.169.254"  # a cloud metadata service, reachable through the pod's default route
MCP_PORT = 18080
KEEPALIVE_PORT = 8088  # the internet's keep-alive, virtual-host HTTP server

ZONE = {
    "allowed.test": {"A": [ALLOWED_V4], "AAAA": [ALLOWED_V6]},
    "denied.test": {"A": [DENIED_V4], "AAAA": [DENIED_V6]},
    "a.wild.test": {"A": [ALLOWED_V4]},
    "wild.test": {"A": [ALLOWED_V4]},
    "sink.test": {"A": [SINK_V4]},
    # Hostile DNS for allowed names: metadata, the pod's own loopback, a mapped-IPv6 spelling, rebinding.
    "meta.test": {"A": [META_V4]},
    "loop.test": {"A": ["127.0.0.1"]},
    "mapped.test": {"AAAA": [f"::ffff:{META_V4}"]},
    "rebind.test": {"A": [ALLOWED_V4], "rebind": [META_V4, ALLOWED_V4]},
    "aliased.test": {"A": [ALLOWED_V4]},  # the attack lab's /etc/hosts (hostAliases) says DENIED_V4
    # A name the policy does not allow, served by the same server (virtual hosts) as allowed.test.
    "shared.test": {"A": [ALLOWED_V4], "AAAA": [ALLOWED_V6]},
}

POLICY = {
    "allow": [
        "allowed.test",
        "*.wild.test:443",
        "sink.test:9000",
        {"cidr": "10.200.2.0/24", "ports": [7000]},
        "[fd00:202::/64]:7000",
        "10.200.3.0/24:9000",
    ]
}

_counter = itertools.count()

# The third-party MCP server of the tests (PyPI `mcp-server-fetch`), in its own venv so its pins never
# meet the project's, outside /root so the app UID can run it.
MCP_SERVER_FETCH = "mcp-server-fetch==2026.10.24"
FETCH_VENV = Path(os.environ.get("OUTRIDER_MCP_FETCH_VENV", "/var/cache/outrider/mcp-server-fetch-venv"))


def _base_interpreters() -> list[str]:
    """Interpreters to make the fetch venv from: this venv's base first, then the system's."""
    names = [getattr(sys, "_base_executable", sys.executable), sys.executable]
    names += [shutil.which(n) or "" for n in ("python3.11", "python3")]
    names += ["/usr/bin/python3.11", "/usr/bin/python3"]
    seen: list[str] = []
    for name in names:
        if name and Path(name).exists() and os.path.realpath(name) not in seen:
            seen.append(os.path.realpath(name))
    return seen


def ensure_mcp_server_fetch() -> str:
    """The venv's python once `mcp-server-fetch` is installed there for the app UID (installs once).

    The venv is made from an interpreter the app UID can run (whatever PATH offers first), and is
    made again when an earlier one was made from another base or cannot be run by the app UID.
    Raises UidAccessError or RuntimeError with the reason when that cannot be done.
    """
    python = FETCH_VENV / "bin" / "python"
    stamp = FETCH_VENV / ".installed"
    reasons: list[str] = []
    base = None
    for candidate in _base_interpreters():
        reason = check_runnable_as(APP_UID, candidate)
        if reason is None:
            base = candidate
            break
        reasons.append(reason)
    if base is None:
        raise UidAccessError(
            f"no Python here can be run by the app UID {APP_UID} to make {FETCH_VENV}: "
            + ("; ".join(reasons) or "none found")
            + ". Install Debian's python3 and python3-venv (scripts/pick-python.sh does as root)"
        )
    wanted = f"{MCP_SERVER_FETCH} {base}"
    if stamp.exists() and stamp.read_text() == wanted and check_runnable_as(APP_UID, str(python)) is None:
        return str(python)
    shutil.rmtree(FETCH_VENV, ignore_errors=True)
    FETCH_VENV.parent.mkdir(parents=True, exist_ok=True)
    FETCH_VENV.parent.chmod(0o755)
    steps = (
        [base, "-m", "venv", str(FETCH_VENV)],
        [str(python), "-m", "pip", "install", "-q", MCP_SERVER_FETCH],
    )
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"`{' '.join(argv)}` failed: {tail}")
    require_runnable_as([APP_UID], str(python))
    stamp.write_text(wanted)
    return str(python)


@functools.cache
def require_lab_python() -> None:
    """Fail early, in one sentence, when the app or sidecar UID cannot run this venv's python."""
    require_runnable_as([APP_UID, SIDECAR_UID], PYTHON, [str(HERE / "app_client.py")])


def have_netns() -> str | None:
    """None when network-namespace tests can run here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for network namespaces and iptables"
    for tool in ("ip", "iptables", "ip6tables", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    return None


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outrider egress test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = ["allowed.test", "denied.test", "*.wild.test", "wild.test", "sink.test"]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "allowed.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server-key.pem",
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_path, cert_path, key_path


def _run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@dataclass
class Lab:
    tag: str
    workdir: Path
    ca: Path
    log: Path
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    decision_lines: list[dict[str, Any]] = field(default_factory=list)
    sidecar: subprocess.Popen[str] | None = None
    mcp_server: subprocess.Popen[str] | None = None
    app_env: dict[str, str] = field(default_factory=dict)  # proxy variables in explicit mode

    @property
    def pod(self) -> str:
        return f"{self.tag}p"

    @property
    def net(self) -> str:
        return f"{self.tag}i"

    def in_pod(
        self,
        *argv: str,
        uid: int | None = None,
        env: Mapping[str, str] | None = None,
        gid: int | None = None,
        groups: tuple[int, ...] = (),
    ) -> list[str]:
        prefix = ["ip", "netns", "exec", self.pod]
        if env:
            prefix += ["env", *(f"{k}={v}" for k, v in env.items())]
        if uid is not None:
            # setpriv last: it must exec the interpreter itself (the venv's python lives under /root).
            group_args = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid if gid is None else gid}", *group_args]
        return [*prefix, *argv]

    def app(
        self,
        action: str,
        *,
        uid: int = APP_UID,
        gid: int | None = None,
        groups: tuple[int, ...] = (),
        **options: Any,
    ) -> dict[str, Any]:
        """One outbound attempt from the pod as `uid` (and `gid`, supplementary `groups`): its JSON result."""
        argv = [PYTHON, str(HERE / "app_client.py"), action, "--ca", str(self.ca)]
        for key, value in options.items():
            if value is not None:
                argv += [f"--{key}", str(value)]
        env = {"PYTHONDONTWRITEBYTECODE": "1"}
        result = _run(*self.in_pod(*argv, uid=uid, env=env, gid=gid, groups=groups), timeout=60)
        parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return parsed

    def hits(self, **match: Any) -> list[dict[str, Any]]:
        """Connections the internet servers accepted, filtered by field values."""
        out = []
        for line in self.log.read_text().splitlines():
            entry = json.loads(line)
            if all(entry.get(k) == v for k, v in match.items()):
                out.append(entry)
        return out

    def decisions(self, **match: Any) -> list[dict[str, Any]]:
        return [d for d in list(self.decision_lines) if all(d.get(k) == v for k, v in match.items())]

    def wait_decision(self, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.decisions(**match)
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no egress decision matching {match}; got {self.decision_lines[-5:]}")

    def iptables(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(*self.in_pod(PYTHON, "-m", "outrider.webhook.cli", "iptables", *args))

    def iptables_save(self) -> str:
        v4 = _run(*self.in_pod("iptables-save")).stdout
        v6 = _run(*self.in_pod("ip6tables-save")).stdout
        # Rules and non-built-in chains only: table headers and counters are not ours to compare.
        return "\n".join(line for line in (v4 + v6).splitlines() if line.startswith(("-A", ":OUTRIDER")))

    def start_sidecar(self, config: Mapping[str, Any]) -> None:
        env = {"OUTRIDER_CONFIG": json.dumps(config), "PYTHONDONTWRITEBYTECODE": "1"}
        argv = self.in_pod(
            PYTHON, "-m", "outrider.sidecar.egress", "--log-level", "WARNING", uid=SIDECAR_UID, env=env
        )
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
        self.processes.append(process)
        self.sidecar = process
        assert process.stdout is not None
        first = process.stdout.readline()
        if '"ready"' not in first:
            raise RuntimeError(f"egress sidecar did not start: {first!r} (exit {process.poll()})")

        def pump() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                try:
                    self.decision_lines.append(json.loads(line))
                except ValueError:
                    continue

        threading.Thread(target=pump, daemon=True).start()

    def mcp_fetch(self, url: str) -> dict[str, Any]:
        """Have the dev MCP server (an unchanged `mcp` SDK server, UID 1000) fetch `url` via its tool."""
        if self.mcp_server is None:
            env = {"PYTHONDONTWRITEBYTECODE": "1", **self.app_env}
            self.mcp_server = self.popen_in_pod(
                PYTHON, "-m", "outrider.sidecar.dev.mcp_server", "--port", str(MCP_PORT), env=env
            )
            assert self.mcp_server.stdout is not None
            if "dev MCP server" not in self.mcp_server.stdout.readline():
                raise RuntimeError(f"dev MCP server did not start (exit {self.mcp_server.poll()})")
        argv = [PYTHON, str(HERE / "mcp_call.py"), f"http://127.0.0.1:{MCP_PORT}/mcp", "fetch"]
        result = _run(*self.in_pod(*argv, json.dumps({"url": url})), timeout=60)
        called = json.loads(result.stdout.strip().splitlines()[-1])
        structured: dict[str, Any] = called.get("structuredContent") or json.loads(
            called["content"][0]["text"]
        )
        return structured

    def mcp_server_fetch(self, server_python: str, url: str) -> dict[str, Any]:
        """PyPI `mcp-server-fetch` (stdio, UID 1000, this lab's proxy variables) fetches `url`."""
        env = {"HOME": str(self.workdir), "SSL_CERT_FILE": str(self.ca), **self.app_env}
        argv = [PYTHON, str(HERE / "mcp_stdio_fetch.py"), server_python, url]
        result = _run(*self.in_pod(*argv, env=env, uid=APP_UID), timeout=120)
        called: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        text = "".join(part.get("text", "") for part in called.get("content", []))
        return {"is_error": bool(called.get("isError")), "text": text}

    def popen_in_pod(
        self, *argv: str, uid: int = APP_UID, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[str]:
        with (self.workdir / f"process-{len(self.processes)}.err").open("w") as errors:
            process = subprocess.Popen(
                self.in_pod(*argv, uid=uid, env=env), stdout=subprocess.PIPE, stderr=errors, text=True
            )
        self.processes.append(process)
        return process


def _internet_config(lab_dir: Path, cert: Path, key: Path, log: Path) -> dict[str, Any]:
    tcp: list[list[Any]] = []
    for address in (ALLOWED_V4, DENIED_V4, ALLOWED_V6, DENIED_V6):
        tcp += [
            [address, 443, "https"],
            [address, 80, "http"],
            [address, 8443, "https"],
            [address, 7000, "echo"],
            [address, KEEPALIVE_PORT, "http-keepalive"],
        ]
    tcp += [[CIDR_HOST_V4, 7000, "echo"], [CIDR_HOST_V6, 7000, "echo"], [SINK_V4, 9000, "sink"]]
    tcp += [[META_V4, 80, "http"]]
    return {
        "log": str(log),
        "cert": str(cert),
        "key": str(key),
        "zone": ZONE,
        "dns": [DNS_LISTED, DNS_UNLISTED],
        "udp_echo": [[ALLOWED_V4, 9999], [ALLOWED_V6, 9999]],
        "tcp": tcp,
    }


@contextmanager
def lab(
    *, capture: bool = True, sidecar_config: Mapping[str, Any] | None = None, app_env: Mapping[str, str] = {}
) -> Iterator[Lab]:
    """Build the namespaces, start the internet and (unless None) the sidecar; tear all down after."""
    require_lab_python()
    tag = f"eg{os.getpid() % 100000}{next(_counter)}"
    workdir = Path(tempfile.mkdtemp(prefix="outrider-egress-"))
    workdir.chmod(0o755)
    ca, cert, key = make_certs(workdir)
    for path in (ca, cert, key):
        path.chmod(0o644)
    log = workdir / "hits.jsonl"
    log.touch()
    log.chmod(0o644)
    current = Lab(tag=tag, workdir=workdir, ca=ca, log=log, app_env=dict(app_env))
    pod, net = current.pod, current.net
    etc = Path("/etc/netns") / pod
    try:
        _run("ip", "netns", "add", pod)
        _run("ip", "netns", "add", net)
        _run(
            "ip", "-n", pod, "link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b", "netns", net
        )
        for ns, dev, v4, v6 in ((pod, f"{tag}a", POD_V4, POD_V6), (net, f"{tag}b", GW_V4, GW_V6)):
            _run("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            _run("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # Let every group open unprivileged ping sockets, as many clusters do: ICMP must be contained too.
        _run("ip", "netns", "exec", pod, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
        _run("ip", "-n", pod, "route", "add", "default", "via", GW_V4)
        _run("ip", "-n", pod, "-6", "route", "add", "default", "via", GW_V6)
        for address in (DNS_LISTED, DNS_UNLISTED, ALLOWED_V4, DENIED_V4, CIDR_HOST_V4, SINK_V4, META_V4):
            _run("ip", "-n", net, "addr", "add", f"{address}/32", "dev", "lo")
        for address in (ALLOWED_V6, DENIED_V6, CIDR_HOST_V6):
            _run("ip", "-n", net, "addr", "add", f"{address}/128", "dev", "lo", "nodad")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {DNS_LISTED}\noptions timeout:1 attempts:2\n")
        config_path = workdir / "internet.json"
        config_path.write_text(json.dumps(_internet_config(workdir, cert, key, log)))
        internet = subprocess.Popen(
            ["ip", "netns", "exec", net, PYTHON, str(HERE / "internet.py"), str(config_path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        current.processes.append(internet)
        assert internet.stdout is not None
        if '"ready"' not in internet.stdout.readline():
            raise RuntimeError(f"internet servers did not start (exit {internet.poll()})")
        if capture:
            current.iptables("--inbound-ports", "8080")
        if sidecar_config is not None:
            current.start_sidecar(sidecar_config)
        yield current
    finally:
        for process in reversed(current.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        for ns in (pod, net):
            _run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(etc, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
