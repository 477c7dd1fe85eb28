"""`outrider demo`: the whole Outrider story on this machine, step by step, with real parts only.

Injection through the real webhook over TLS, a pod's data plane (netns + iptables when root), an MCP
client acting as alice, then what an operator sees. Cleans up everything it starts, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jsonpatch
import jwt
import yaml

from outrider.sidecar.config_merge import deep_merge
from outrider.sidecar.demo import audit, netns, podiff, procs, traces
from outrider.sidecar.demo.console import Console
from outrider.sidecar.egress.config import EgressConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "demo" / "mcp-server-deployment.yaml"
APP_UID = 1000  # the MCP server runs as an ordinary user, like the example's pod securityContext
PROXY_UID = 15337
MCP_PORT = 8080
ALLOWED_HOST = "allowed.demo.test"
DENIED_HOST = "denied.demo.test"
DOWNSTREAM_AUDIENCE = "https://notes-api.demo.test"
TRUST_DOMAIN = "demo.outrider.test"
IDP_SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/dev-idp"
DEMO_CLI = "outrider-demo-cli"
NAMESPACE = "team-notes"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spire",
        action="store_true",
        help="use the real SPIRE server and agent (built into the cache if absent)",
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "capture", "explicit"),
        default="auto",
        help="egress mode: capture (network namespace + iptables, needs root), explicit (HTTP proxy); "
        "auto picks capture when root is available",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the demo's temp dir with every log")
    parser.add_argument("--no-colour", action="store_true", help="plain output")


def run(args: argparse.Namespace) -> int:
    console = Console(colour=False if args.no_colour else None)
    try:
        return asyncio.run(_main(args, console))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        # Ctrl-C (KeyboardInterrupt) or SIGTERM (the main task cancelled): clean-up already ran.
        console.say("interrupted: everything the demo started has been stopped and removed")
        return 130 if isinstance(exc, KeyboardInterrupt) else 143


# --------------------------------------------------------------------------------------------------
# What the demo knows before it starts anything


def piece_missing(modules: list[str]) -> str | None:
    """The first module that is absent or still the skeleton's placeholder, else None."""
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is None or spec.origin is None:
            return name
        head = Path(spec.origin).read_text(errors="replace")[:400]
        if "placeholder until its owner" in head:
            return name
    return None


PIECES: dict[str, list[str]] = {
    "webhook": ["outrider.webhook.engine", "outrider.webhook.server_cli", "outrider.webhook.certs"],
    "identity (dev Workload API)": [
        "outrider.sidecar.dev.workload_api",
        "outrider.sidecar.identity.component",
    ],
    "identity (SPIRE)": ["outrider.sidecar.dev.spire", "outrider.sidecar.identity.component"],
    "inbound proxy": [
        "outrider.sidecar.inbound.component",
        "outrider.sidecar.dev.mcp_server",
        "outrider.sidecar.admin",
    ],
    "token exchange": ["outrider.sidecar.exchange.client", "outrider.sidecar.dev.idp"],
    "egress": ["outrider.sidecar.egress.component", "outrider.sidecar.egress.iptables_cli"],
    "telemetry": ["outrider.sidecar.telemetry.component"],
}


@dataclass
class Demo:
    args: argparse.Namespace
    console: Console
    workdir: Path
    sup: procs.Supervisor
    stack: AsyncExitStack
    mode: str
    topo: netns.Topology | None
    idp_url: str
    otlp_port: int
    client_host: str  # where the MCP client reaches the pod's MCP port
    client_port: int  # capture: the app's port (iptables hands it to 15006); explicit: the sidecar's
    app_port: int  # where the MCP server listens on 127.0.0.1
    admin_port: int
    allowed_url: str
    denied_url: str
    allowed_rules: list[str]  # the operators' egress rules in the webhook config
    missing: dict[str, str] = field(default_factory=dict)
    injected: dict[str, Any] | None = None
    dataplane_up: bool = False
    sidecar: procs.Child | None = None
    receiver: traces.OtlpReceiver | None = None
    otlp_url: str | None = None
    spiffe_id: str | None = None
    alice_token: str | None = None
    tokens: list[str] = field(default_factory=list)  # every token the demo saw, to prove none leaked
    session: aiohttp.ClientSession | None = None

    @property
    def resource(self) -> str:
        return f"http://{self.client_host}:{self.client_port}/mcp"

    @property
    def identity_piece(self) -> str:
        return "identity (SPIRE)" if self.args.spire else "identity (dev Workload API)"

    def available(self, piece: str) -> bool:
        return piece not in self.missing

    def skip(self, piece: str) -> None:
        self.console.skip(piece, f"{self.missing.get(piece, '?')} is missing")


def _make_workdir() -> Path:
    workdir = Path(tempfile.mkdtemp(prefix="outrider-demo-"))
    workdir.chmod(0o755)  # the app (uid 1000) and the sidecar (uid 15337) read their files here
    return workdir


async def _main(args: argparse.Namespace, console: Console) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM behaves like Ctrl-C: cancel, then every `finally` below cleans up.
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    started = time.monotonic()
    mode = args.mode
    if mode == "auto":
        mode = "capture" if netns.root_available() else "explicit"
    if mode == "capture" and not netns.root_available():
        print(
            "outrider demo: --mode capture needs root, `ip`, `iptables` and permission to create network "
            "namespaces (`make sysdeps` installs the tools); run without --mode for explicit-proxy mode",
            file=sys.stderr,
        )
        return 2
    workdir = _make_workdir()
    async with AsyncExitStack() as stack:
        if args.keep_logs:
            console.say(f"logs are kept in {workdir}")
        else:
            stack.callback(shutil.rmtree, workdir, True)
        sup = procs.Supervisor(workdir)
        stack.push_async_callback(sup.stop_all)
        topo = None
        if mode == "capture":
            octet = netns.free_octet(netns.used_addresses(), preferred=200 + os.getpid() % 50)
            topo = netns.plan(f"{os.getpid() % 100000}", [ALLOWED_HOST, DENIED_HOST], octet)
        idp_host = topo.host_ip if topo else "127.0.0.1"
        if topo is not None:
            ports = {"client": MCP_PORT, "app": MCP_PORT, "admin": 15020}
            allowed_url, denied_url = f"http://{ALLOWED_HOST}/", f"http://{DENIED_HOST}/"
            allowed_rules = [f"{ALLOWED_HOST}:80"]
        else:
            # No namespace of its own: every port is a free one on this host's loopback.
            ports = {"client": procs.free_port(), "app": procs.free_port(), "admin": procs.free_port()}
            internet = socket.gethostname()
            allowed_port, denied_port = procs.free_port(), procs.free_port()
            allowed_url, denied_url = (
                f"http://{internet}:{allowed_port}/",
                f"http://{internet}:{denied_port}/",
            )
            # This host's name resolves to loopback, which a name alone may never reach (the pod itself,
            # the sidecar's ports): the operators must allow that address explicitly with a CIDR rule.
            loopback = socket.gethostbyname(internet)
            allowed_rules = [f"{internet}:{allowed_port}", f"{loopback}/32:{allowed_port}"]
        demo = Demo(
            args=args,
            console=console,
            workdir=workdir,
            sup=sup,
            stack=stack,
            mode=mode,
            topo=topo,
            idp_url=f"http://{idp_host}:{procs.free_port('127.0.0.1')}",
            otlp_port=procs.free_port("127.0.0.1"),
            client_host=topo.pod_ip if topo else "127.0.0.1",
            client_port=ports["client"],
            app_port=ports["app"],
            admin_port=ports["admin"],
            allowed_url=allowed_url,
            denied_url=denied_url,
            allowed_rules=allowed_rules,
        )
        for piece, modules in PIECES.items():
            missing = piece_missing(modules)
            if missing:
                demo.missing[piece] = missing
        demo.session = await stack.enter_async_context(aiohttp.ClientSession())
        console.say(f"Outrider demo; working directory {workdir}")
        await _guarded(
            demo, 1, "Injection: the webhook adds the sidecar to an unchanged MCP server", step_injection
        )
        await _guarded(demo, 2, "A pod's data plane on this machine", step_dataplane)
        await _guarded(demo, 3, "An MCP client acting as user alice", step_client)
        await _guarded(demo, 4, "What an operator sees: audit events and a trace", step_operator)
        console.step(5, "Clean-up")
        console.say("stopping every process, removing network namespaces and the temp dir")
    console.check(_nothing_left(demo), "nothing left behind (processes, namespaces, temp dir)")
    console.say(f"demo took {time.monotonic() - started:.1f}s")
    console.summary()
    return 0 if console.passed else 1


def _nothing_left(demo: Demo) -> bool:
    if demo.topo is not None:
        existing = Path("/run/netns")
        for ns in (demo.topo.pod_ns, demo.topo.inet_ns):
            if (existing / ns).exists():
                return False
    if not demo.args.keep_logs and demo.workdir.exists():
        return False
    return all(c.proc.returncode is not None for c in demo.sup.children)


async def _guarded(demo: Demo, number: int, title: str, step: Any) -> None:
    demo.console.step(number, title)
    try:
        await step(demo)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # one broken step must not hide the others, nor skip clean-up
        demo.console.check(False, f"step {number} stopped: {type(exc).__name__}: {exc}")
        for child in demo.sup.children:
            if not child.running or isinstance(exc, RuntimeError):
                tail = child.tail(12)
                if tail:
                    demo.console.dim(f"--- last lines of {child.name} ({child.log.name}) ---")
                    for line in tail.splitlines():
                        demo.console.dim(line)


# --------------------------------------------------------------------------------------------------
# Step 1: injection through the real webhook


def pod_from_deployment(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The Pod the ReplicaSet controller would create from a Deployment's template."""
    template = doc["spec"]["template"]
    name = doc["metadata"]["name"]
    metadata = dict(template.get("metadata") or {})
    metadata.update(
        {"generateName": f"{name}-7d9f8c6b5-", "namespace": doc["metadata"].get("namespace", "default")}
    )
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": dict(template["spec"])}


def admission_review(pod: Mapping[str, Any], uid: str) -> dict[str, Any]:
    namespace = pod["metadata"]["namespace"]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


DEMO_POLICY = """@id("everyone-lists")
permit(principal, action in [Action::"list_tools", Action::"list_prompts", Action::"list_resources"],
       resource);

@id("everyone-safe-tools")
permit(principal, action == Action::"call_tool", resource)
when { resource == Tool::"whoami" || resource == Tool::"echo" || resource == Tool::"fetch" };

@id("admins-everything")
permit(principal in Group::"admins", action, resource);
"""
DEMO_RATE_LIMITS = {"per_tool": {"echo": "2/minute"}}


def webhook_config(demo: Demo) -> dict[str, Any]:
    """The operator's webhook config for this demo: the sidecar block the webhook writes into each pod."""
    return {
        "trust_domain": TRUST_DOMAIN,
        "token_audiences": [DOWNSTREAM_AUDIENCE],
        "default_audience": DOWNSTREAM_AUDIENCE,
        "egress_default_policy": {"allow": demo.allowed_rules},
        # The operators' Cedar ceiling: everyone may list and call the harmless tools, only the
        # admins group may call the rest (delete); echo is limited to 2 calls a minute per user.
        "mcp_policy": {"default": {"cedar": DEMO_POLICY, "rate_limits": DEMO_RATE_LIMITS}},
        "sidecar": {
            "inbound": {"issuer": demo.idp_url, "resource": demo.resource},
            "exchange": {
                "token_endpoint": f"{demo.idp_url}/token",
                "issuer": demo.idp_url,
                "actor_token": True,
            },
            "telemetry": {"service_name": "outrider-proxy"},
        },
    }


async def step_injection(demo: Demo) -> None:
    c = demo.console
    if not demo.available("webhook"):
        demo.skip("webhook")
        return
    certs = demo.workdir / "certs"
    c.say("writing a dev CA and the webhook's serving certificate (outrider certs)")
    result = await asyncio.create_subprocess_exec(
        *procs.outrider_cmd(),
        "certs",
        "--out",
        str(certs),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await result.communicate()
    if result.returncode != 0:
        raise RuntimeError(f"outrider certs failed: {out.decode(errors='replace').strip()[-400:]}")
    config_file = demo.workdir / "webhook-config.yaml"
    config = webhook_config(demo)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    c.say(
        f"the operators' webhook config: trust domain {config['trust_domain']}, token audiences "
        f"{config['token_audiences']}, egress allow {config['egress_default_policy']['allow']}, "
        f"IdP {demo.idp_url}"
    )
    port = procs.free_port()
    c.say(
        f"starting the real webhook: outrider webhook --port {port} --tls-cert tls.crt --tls-key tls.key "
        "--config webhook-config.yaml"
    )
    child = await demo.sup.start(
        "webhook",
        [
            *procs.outrider_cmd(),
            "webhook",
            "--port",
            str(port),
            "--tls-cert",
            str(certs / "tls.crt"),
            "--tls-key",
            str(certs / "tls.key"),
            "--config",
            str(config_file),
        ],
    )
    tls = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    base = f"https://localhost:{port}"
    assert demo.session is not None
    session = demo.session
    await procs.wait_until(
        "the webhook's /healthz over TLS",
        lambda: procs.http_ok(session, f"{base}/healthz", ssl=tls),
        child=child,
    )
    c.check(True, "webhook is serving HTTPS; the client verifies it against the generated CA")

    deployment = yaml.safe_load(EXAMPLE.read_text())
    pod = pod_from_deployment(deployment)
    c.say(
        f"POST /mutate: an AdmissionReview for a Pod of Deployment {deployment['metadata']['name']} "
        f"({EXAMPLE.relative_to(REPO)}) in namespace {NAMESPACE} (opted in)"
    )
    review = admission_review(pod, uid="demo-0001")
    async with session.post(f"{base}/mutate", json=review, ssl=tls) as r:
        status = r.status
        answer = await r.json(content_type=None)
    response = answer.get("response") or {}
    c.check(
        status == 200 and response.get("uid") == "demo-0001",
        "the webhook answered the AdmissionReview",
        f"HTTP {status}",
    )
    c.check(response.get("allowed") is True, "the pod is allowed")
    patch_b64 = response.get("patch")
    if not c.check(
        response.get("patchType") == "JSONPatch" and bool(patch_b64), "the answer carries a JSONPatch"
    ):
        return
    import base64

    ops = json.loads(base64.b64decode(str(patch_b64)))
    injected = jsonpatch.JsonPatch(ops).apply(pod)
    c.check(True, f"the {len(ops)} JSON Patch operations apply cleanly to the original pod (jsonpatch)")
    for warning in response.get("warnings") or []:
        c.show(f"warning from the webhook: {warning}")
    c.say("what the webhook changed (before -> after):")
    for line in podiff.summarize(pod, injected):
        c.show(line)
    proxy = podiff.find_container(injected, "outrider-proxy")
    c.check(proxy is not None, "outrider-proxy was added")
    if demo.mode == "capture":
        c.check(
            podiff.find_container(injected, "outrider-init") is not None, "outrider-init (iptables) was added"
        )
    raw = podiff.container_env(injected, "outrider-proxy", "OUTRIDER_CONFIG")
    if c.check(raw is not None, "the per-pod sidecar config is in env OUTRIDER_CONFIG"):
        cfg = json.loads(raw or "{}")
        c.show("OUTRIDER_CONFIG sections: " + ", ".join(sorted(cfg)), indent=4)
        audience = (cfg.get("exchange") or {}).get("audience")
        c.check(
            audience == DOWNSTREAM_AUDIENCE,
            "exchange.audience comes from outrider.dev/token-audience",
            str(audience),
        )
    demo.injected = injected


# --------------------------------------------------------------------------------------------------
# Step 2: the data plane


def _env_of(pod: Mapping[str, Any], container: str) -> dict[str, str]:
    c = podiff.find_container(pod, container) or {}
    return {str(e["name"]): str(e["value"]) for e in c.get("env") or [] if "value" in e}


def _init_argv(pod: Mapping[str, Any]) -> list[str]:
    """outrider-init's command line, run with this interpreter instead of the image's `outrider`."""
    init = podiff.find_container(pod, "outrider-init") or {}
    argv = [str(a) for a in [*(init.get("command") or []), *(init.get("args") or [])]]
    if argv and Path(argv[0]).name == "outrider":
        argv = argv[1:]
    return [*procs.outrider_cmd(), *argv]


async def step_dataplane(demo: Demo) -> None:
    c = demo.console
    needed = ["inbound proxy", "token exchange", demo.identity_piece]
    missing = [p for p in needed if not demo.available(p)]
    for piece in missing:
        demo.skip(piece)
    if demo.topo is not None and not demo.available("egress"):
        demo.skip("egress")
    if missing:
        return
    if demo.injected is None:
        c.check(False, "the data plane needs the injected pod from step 1")
        return
    if demo.topo is not None:
        t = demo.topo
        c.say(
            f"mode: CAPTURE (root available): pod network namespace {t.pod_ns}, "
            "real `outrider iptables` rules,"
        )
        c.say(
            f"      app as uid {APP_UID}, sidecar as uid {PROXY_UID}, "
            f"'internet' namespace {t.inet_ns} at {t.inet_ip}"
        )
        demo.stack.enter_context(netns.topology(t))
        c.check(
            True,
            f"network namespaces up: client -> {t.pod_ip}:{demo.client_port} (pod) -> {t.inet_ip} (internet)",
        )
        dns = [arg for name in t.host_names for arg in ("--dns-name", f"{name}={t.inet_ip}")]
        web = await demo.sup.start(
            "internet",
            [
                procs.python(),
                "-m",
                "outrider.sidecar.demo.internet",
                "--host",
                t.inet_ip,
                "--port",
                "80",
                *dns,
            ],
            netns=t.inet_ns,
        )
        await procs.wait_until(
            "the internet namespace's HTTP server", lambda: _ns_tcp(t.inet_ns, t.inet_ip, 80), child=web
        )
        c.say(f"'internet' serves http://{ALLOWED_HOST}/ and http://{DENIED_HOST}/ from {t.inet_ip}, and is")
        c.say("      the pod's DNS server (its resolv.conf) for those names, as a cluster's DNS would be")
    else:
        c.say(
            "mode: EXPLICIT PROXY ("
            + (
                "--mode explicit"
                if demo.args.mode == "explicit"
                else "not root, or no permission for network namespaces"
            )
            + "; no iptables): the app gets HTTP_PROXY/HTTPS_PROXY"
        )
        c.say(
            "      as in namespaces whose Pod Security forbids NET_ADMIN; an app that ignores those "
            "variables is NOT stopped in this mode"
        )
        allowed, denied = urlsplit(demo.allowed_url), urlsplit(demo.denied_url)
        host = socket.gethostbyname(allowed.hostname or "localhost")
        web = await demo.sup.start(
            "internet",
            [
                procs.python(),
                "-m",
                "outrider.sidecar.demo.internet",
                "--host",
                host,
                "--port",
                str(allowed.port),
                "--port",
                str(denied.port),
            ],
        )
        await procs.wait_until(
            "the stand-in internet's HTTP server", lambda: procs.tcp_open(host, denied.port or 80), child=web
        )
        c.say(f"stand-in 'internet' serves {demo.allowed_url} and {demo.denied_url} ({host})")

    # Telemetry: a local OTLP/HTTP receiver the sidecar exports to.
    demo.receiver = traces.OtlpReceiver()
    otlp_host = demo.topo.host_ip if demo.topo else "127.0.0.1"
    otlp_url = await demo.stack.enter_async_context(demo.receiver.serve(otlp_host, demo.otlp_port))
    demo.otlp_url = otlp_url
    c.say(f"local OTLP/HTTP receiver for traces at {otlp_url}")

    socket_path = await start_identity(demo)
    await start_idp(demo, socket_path)
    if demo.topo is not None:
        await apply_iptables(demo)
    await start_mcp_server(demo)
    await start_sidecar(demo, socket_path, otlp_url)
    demo.dataplane_up = True


async def _ns_tcp(ns: str, host: str, port: int) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        "-c",
        f"import socket; socket.create_connection(({host!r}, {port}), 2).close()",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait() == 0


async def start_identity(demo: Demo) -> str:
    """Start a SPIFFE Workload API (dev issuer, or real SPIRE); return its unix socket path."""
    c = demo.console
    sock_dir = demo.workdir / "spiffe-workload-api"
    sock_dir.mkdir(mode=0o755)
    socket_path = str(sock_dir / "agent.sock")
    assert demo.injected is not None
    status = json.loads(demo.injected["metadata"]["annotations"].get("outrider.dev/status", "{}"))
    demo.spiffe_id = str(status.get("spiffeId") or f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/default")
    c.say(f"the webhook recorded the pod's expected SPIFFE ID: {demo.spiffe_id}")
    uid = PROXY_UID if demo.topo is not None else os.getuid()
    if demo.args.spire:
        from outrider.sidecar.demo import spire_glue

        socket_path = await spire_glue.start(demo, uid, os.getuid())
    else:
        c.say("SPIFFE Workload API: the DEV STAND-IN issuer (sidecar/dev/workload_api.py, in-memory CA),")
        c.say("      not SPIRE; `make demo SPIRE=1` uses the real SPIRE server and agent")
        # Like SPIRE's unix attestor: the identity follows the caller's uid (the sidecar's, the IdP's).
        argv = [
            procs.python(),
            "-m",
            "outrider.sidecar.dev.workload_api",
            "--socket",
            socket_path,
            "--trust-domain",
            TRUST_DOMAIN,
            "--uid-map",
            f"{uid}={demo.spiffe_id}",
        ]
        if uid != os.getuid():
            argv += ["--uid-map", f"{os.getuid()}={IDP_SPIFFE_ID}"]
        child = await demo.sup.start("workload-api", argv)
        await procs.wait_until("the Workload API socket", lambda: _exists(socket_path), child=child)
        _open_socket(socket_path)
    c.check(
        True,
        f"Workload API on unix://{socket_path}",
    )
    return socket_path


def _log_has_any(path: Path, needles: list[str]) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return any(n in text for n in needles)


def _open_socket(path: str) -> None:
    Path(path).chmod(0o777)


def _path_exists(path: str) -> bool:
    return Path(path).exists()


async def _exists(path: str) -> bool:
    return _path_exists(path)


async def start_idp(demo: Demo, socket_path: str) -> None:
    c = demo.console
    host_port = demo.idp_url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    c.say(
        f"starting the dev IdP (sidecar/dev/idp.py) at {demo.idp_url}: users alice and bob, and an RFC 8693"
    )
    c.say("      endpoint that verifies the sidecar's JWT-SVID client assertion against the SPIFFE bundle")
    clients = [
        # The sidecar is a confidential client that authenticates with its JWT-SVID (jwt-spiffe).
        f"outrider-proxy={demo.spiffe_id};audiences={DOWNSTREAM_AUDIENCE}",
        f"{DEMO_CLI}=;public=yes",  # the MCP client alice signs in with (password grant)
    ]
    argv = [
        procs.python(),
        "-m",
        "outrider.sidecar.dev.idp",
        "--host",
        host,
        "--port",
        port,
        "--issuer",
        demo.idp_url,
        "--workload-api",
        f"unix://{socket_path}",
    ]
    for client in clients:
        argv += ["--client", client]
    child = await demo.sup.start("idp", argv)
    assert demo.session is not None
    session = demo.session
    await procs.wait_until(
        "the IdP's OIDC discovery",
        lambda: procs.http_ok(session, f"{demo.idp_url}/.well-known/openid-configuration"),
        child=child,
    )
    c.check(True, "IdP serves OIDC discovery and JWKS")


async def apply_iptables(demo: Demo) -> None:
    c = demo.console
    assert demo.topo is not None and demo.injected is not None
    if not demo.available("egress"):
        c.say("no capture rules: the egress piece is not available yet")
        return
    # The demo's pod namespace has two interfaces (one to this host, one to the "internet"), which
    # the host-namespace guard would take for a host: --force says this really is the pod.
    argv = [*_init_argv(demo.injected), "--force"]
    c.say("running outrider-init's exact command in the pod namespace: outrider " + " ".join(argv[3:]))
    child = await demo.sup.start("outrider-init", argv, netns=demo.topo.pod_ns)
    code = await child.proc.wait()
    if not c.check(code == 0, "outrider iptables applied the capture rules", f"exit {code}"):
        c.show(child.tail(20))
        return
    save = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        demo.topo.pod_ns,
        "iptables-save",
        "-t",
        "nat",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await save.communicate()
    rules = [line for line in out.decode().splitlines() if line.startswith("-A")]
    c.say(f"the {len(rules)} nat rules now in the pod namespace (iptables-save, comments moved to the end):")
    for line in rules:
        c.show(compact_rule(line))
    save = await asyncio.create_subprocess_exec(
        *("ip", "netns", "exec", demo.topo.pod_ns, "iptables-save", "-t", "filter"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await save.communicate()
    udp = [compact_rule(x) for x in out.decode().splitlines() if x.startswith("-A") and "outrider" in x]
    if udp:
        c.say(
            f"and {len(udp)} filter rules (outbound UDP is dropped except DNS to the pod's resolvers), e.g.:"
        )
        c.show(udp[-1])


def compact_rule(line: str) -> str:
    """Pure: an iptables-save line with its `-m comment --comment "..."` moved to a trailing `# ...`."""
    match = re.search(r' -m comment --comment (?:"([^"]*)"|(\S+))', line)
    if not match:
        return line
    comment = match.group(1) or match.group(2)
    rule = (line[: match.start()] + line[match.end() :]).replace(" -m tcp", "")
    return f"{rule:<62} # {comment}"


async def start_mcp_server(demo: Demo) -> None:
    c = demo.console
    assert demo.injected is not None
    env = _env_of(demo.injected, "mcp")
    if demo.topo is None:
        env.update(explicit_app_env(demo))
        c.say(
            "app env (what the webhook writes in explicit mode): "
            + " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.endswith("_PROXY"))
        )
    ns = demo.topo.pod_ns if demo.topo else None
    c.say(
        f"starting the unchanged MCP server (mcp SDK, sidecar/dev/mcp_server.py) on 127.0.0.1:{demo.app_port}"
        + (f" as uid {APP_UID}" if ns else "")
    )
    child = await demo.sup.start(
        "mcp-server",
        [procs.python(), "-m", "outrider.sidecar.dev.mcp_server", "--port", str(demo.app_port)],
        env=env,
        netns=ns,
        uid=APP_UID if ns else None,
        cwd="/",
    )
    if ns:
        await procs.wait_until(
            "the MCP server's port", lambda: _ns_tcp(ns, "127.0.0.1", demo.app_port), child=child
        )
    else:
        await procs.wait_until(
            "the MCP server's port", lambda: procs.tcp_open("127.0.0.1", demo.app_port), child=child
        )
    c.check(True, "MCP server is listening (it knows nothing about Outrider)")


async def start_sidecar(demo: Demo, socket_path: str, otlp_url: str) -> None:
    c = demo.console
    assert demo.injected is not None
    env = _env_of(demo.injected, "outrider-proxy")
    env.update(
        {
            "SPIFFE_ENDPOINT_SOCKET": f"unix://{socket_path}",  # in a cluster: the CSI driver's mount
            "OUTRIDER_POD_NAME": "notes-mcp-7d9f8c6b5-demo1",
            "OUTRIDER_POD_NAMESPACE": NAMESPACE,
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_SERVICE_NAME": "outrider-proxy",
        }
    )
    if demo.topo is None:
        overrides = explicit_sidecar_overrides(demo)
        merged = deep_merge(json.loads(env.get("OUTRIDER_CONFIG", "{}")), overrides)
        env["OUTRIDER_CONFIG"] = json.dumps(merged)
        c.say(
            "no pod network namespace, so the demo moves the sidecar's ports to free ones: "
            + json.dumps(overrides, sort_keys=True)
        )
    ns = demo.topo.pod_ns if demo.topo else None
    c.say(
        "starting `outrider sidecar` with the env the webhook wrote "
        "(OUTRIDER_CONFIG, OUTRIDER_APP_PROBES, ...)" + (f" as uid {PROXY_UID}" if ns else "")
    )
    demo.sidecar = await demo.sup.start(
        "outrider-proxy",
        [*procs.outrider_cmd(), "sidecar"],
        env=env,
        netns=ns,
        uid=PROXY_UID if ns else None,
        cwd="/",
    )
    admin = f"http://{demo.client_host}:{demo.admin_port}"
    assert demo.session is not None
    session = demo.session

    async def ready() -> bool:
        async with session.get(f"{admin}/readyz", timeout=aiohttp.ClientTimeout(total=3)) as r:
            return r.status == 200

    await procs.wait_until("the sidecar's /readyz", ready, child=demo.sidecar, limit=60)
    c.check(True, f"outrider-proxy is ready ({admin}/readyz: SVID held, all components up)")


EGRESS_PORT_EXPLICIT: dict[int, int] = {}


def _egress_port(demo: Demo) -> int:
    # One free port per demo run for the explicit proxy (15001 may be taken on a shared host).
    return EGRESS_PORT_EXPLICIT.setdefault(id(demo), procs.free_port())


def explicit_app_env(demo: Demo) -> dict[str, str]:
    """The HTTP(S)_PROXY/NO_PROXY env the webhook gives app containers in explicit mode, on our port."""
    from outrider.webhook.egress import EGRESS_MODE_LABEL, plan_egress

    assert demo.injected is not None
    plan = plan_egress(demo.injected, {EGRESS_MODE_LABEL: "explicit"}, None, {"allow": demo.allowed_rules})
    port = _egress_port(demo)
    return {k: v.replace(":15001", f":{port}") for k, v in plan.app_env}


def explicit_sidecar_overrides(demo: Demo) -> dict[str, Any]:
    egress: dict[str, Any] = {"mode": "explicit", "port": _egress_port(demo), "listen": ["127.0.0.1"]}
    if "resolver" in {f.name for f in dataclasses.fields(EgressConfig)}:
        # Without a namespace there is no DNS server of our own for this host's name: use getaddrinfo.
        egress["resolver"] = "system"
    return {
        "admin": {"host": "127.0.0.1", "port": demo.admin_port},
        "inbound": {"host": "127.0.0.1", "port": demo.client_port, "mcp_port": demo.app_port},
        "egress": egress,
    }


# --------------------------------------------------------------------------------------------------
# Step 3: the MCP client as alice


async def get_user_token(demo: Demo, user: str) -> str:
    """alice signs in at the dev IdP (password grant) for this MCP server's resource URI."""
    assert demo.session is not None
    form = {
        "grant_type": "password",
        "username": user,
        "password": f"{user}-password",
        "client_id": DEMO_CLI,
        "resource": demo.resource,
    }
    async with demo.session.post(f"{demo.idp_url}/token", data=form) as r:
        body = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"the IdP refused a token for {user}: HTTP {r.status} {body.get('error')}")
        return str(body["access_token"])


async def expired_token(demo: Demo, user: str) -> str:
    """A correctly signed token for `user` that expired two minutes ago (the dev IdP's /dev/mint)."""
    assert demo.session is not None
    body = {"sub": user, "aud": demo.resource, "expires_in": -120, "client_id": DEMO_CLI}
    async with demo.session.post(f"{demo.idp_url}/dev/mint", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"the IdP could not mint an expired token: HTTP {r.status}")
        return str((await r.json(content_type=None))["access_token"])


def fingerprint(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def claims(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def step_client(demo: Demo) -> None:
    from outrider.sidecar.demo import client as mcp_client

    c = demo.console
    if not demo.dataplane_up:
        c.check(False, "the client needs the data plane from step 2")
        return
    token = await get_user_token(demo, "alice")
    demo.alice_token = token
    demo.tokens.append(token)
    alice = claims(token)
    c.say(
        f"alice signed in at the dev IdP: token {fingerprint(token)} "
        f"sub={alice.get('sub')} aud={alice.get('aud')}"
    )
    await mcp_client.run_calls(demo, token)


# --------------------------------------------------------------------------------------------------
# Step 4: the operator's view


def metric_lines(text: str, limit: int = 16) -> list[str]:
    """Pure: the non-zero Outrider `*_total` counters of a Prometheus text page, empty labels dropped."""
    picked: list[str] = []
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        if not name.startswith("outrider_") or not name.endswith("_total"):
            continue
        try:
            if float(value) == 0:
                continue
        except ValueError:
            continue
        kept = [pair for pair in labels.rstrip("}").split(",") if pair and not pair.endswith('=""')]
        shown = f"{name}{{{','.join(kept)}}}" if kept else name
        picked.append(f"{shown} {float(value):g}")
    return picked[:limit]


async def show_metrics(demo: Demo) -> None:
    c = demo.console
    assert demo.session is not None
    url = f"http://{demo.client_host}:{demo.admin_port}/metrics"
    async with demo.session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        text = await r.text()
    lines = metric_lines(text)
    c.say(f"Prometheus metrics on the admin port ({url}),")
    c.say("the non-zero Outrider counters (empty labels left out):")
    for line in lines:
        c.show(line)
    counted = r.status == 200 and any(line.startswith("outrider_mcp_requests_total") for line in lines)
    c.check(counted, "the sidecar's /metrics counts the calls by method, tool and outcome")


async def step_operator(demo: Demo) -> None:
    c = demo.console
    if not demo.available("telemetry"):
        demo.skip("telemetry")
        return
    if not demo.dataplane_up or demo.sidecar is None:
        c.check(False, "the operator view needs the data plane from step 2")
        return
    c.say("audit events (the sidecar writes one JSON line per MCP call, token exchange and egress decision;")
    c.say("schema sidecar/telemetry/audit-event.schema.json), compacted to one line each:")
    await asyncio.sleep(0.5)
    events = audit.parse_lines(demo.sidecar.log.read_text(errors="replace").splitlines())
    workloads = sorted({str(audit.workload_of(e)) for e in events if audit.workload_of(e)})
    if workloads:
        c.show("every event names the workload: " + ", ".join(workloads))
    for event in events[-20:]:
        c.show(audit.format_event(event))
    c.check(len(events) > 0, "the calls left audit events", f"{len(events)} events")
    text = json.dumps(events)
    if demo.tokens:
        c.check(not any(t in text for t in demo.tokens), "no token appears in any audit event")
        leaked = [ch.name for ch in demo.sup.children if _log_has_any(ch.log, demo.tokens)]
        c.check(
            not leaked,
            "no token appears in any process's log (sidecar, IdP, MCP server, webhook)",
            f"found in {leaked}" if leaked else f"{len(demo.tokens)} tokens checked",
        )
    c.check(any("alice" in json.dumps(e) for e in events), "audit events name alice")
    c.check(
        any(
            (e.get("policy") or {}).get("decision") == "deny" and (e.get("mcp") or {}).get("tool") == "delete"
            for e in events
        ),
        "the audit log records alice's denied call with the policy decision",
    )
    c.check(
        any((e.get("policy") or {}).get("decision") == "rate_limited" for e in events),
        "the audit log records the rate-limited call",
    )
    assert demo.receiver is not None
    receiver = demo.receiver
    await show_metrics(demo)
    c.say("waiting for the whoami call's trace at the OTLP receiver")
    ok = await receiver.wait_for(lambda spans: traces.find_trace(spans, tool="whoami") is not None, 10)
    trace_id = traces.find_trace(receiver.spans, tool="whoami")
    if not c.check(
        ok and trace_id is not None,
        "the whoami call's trace arrived over OTLP/HTTP",
        f"{len(receiver.spans)} spans in {receiver.requests} exports",
    ):
        return
    assert trace_id is not None
    c.say(f"trace {trace_id}: the client's tools/call whoami, continued by the sidecar (its token exchange")
    c.say("was served from the sidecar's cache: a child span with cache_hit=true and no IdP round trip):")
    tree = traces.span_tree(receiver.spans, trace_id)
    for line in tree:
        c.show(line)
    server = traces.server_span(receiver.spans, trace_id, "outrider-proxy")
    attrs = server.attributes if server else {}
    c.check(
        attrs.get("enduser.id") == "alice" and attrs.get("mcp.method.name") == "tools/call",
        "the server span names the MCP method, the tool and the user",
    )
    client_root = traces.root_span(receiver.spans, trace_id)
    c.check(
        server is not None
        and client_root is not None
        and client_root.service == traces.DEMO_CLIENT_SERVICE
        and server.parent_span_id == client_root.span_id,
        "the sidecar continued the trace the client started (traceparent in params._meta)",
    )
    first = traces.first_exchange_trace(receiver.spans)
    if first is not None and first != trace_id:
        c.say(f"trace {first} (the session's first call: the sidecar went to the IdP for the exchange):")
        for line in traces.span_tree(receiver.spans, first):
            c.show(line)
    c.check(first is not None, "a token exchange with the IdP shows as a child span with its duration")
