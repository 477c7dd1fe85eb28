"""Shared helpers for the webhook tests: golden fixture loading and the semantic pod checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from outrider.webhook import kubeyaml
from outrider.webhook.config import WebhookConfig, parse_config
from outrider.webhook.offline import TEMPLATE_PATHS

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "testdata" / "inject"
DEFAULT_LABELS = {"outrider.dev/inject": "enabled"}
# Every fixture runs under a realistic operator policy unless its header says otherwise.
BASE_CONFIG: dict[str, Any] = {
    "egress_default_policy": {"allow": ["api.github.com:443", "*.example.com:443"]}
}


def fixture_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in GOLDEN_DIR.glob("*.yaml")
        if not p.name.endswith((".injected.yaml", ".result.yaml"))
    )


def templated_fixture_names() -> list[str]:
    """Fixtures of a kind outrider inject injects (the others only pass through with a warning)."""
    return [n for n in fixture_names() if load_fixture(n)[0]["kind"] in TEMPLATE_PATHS]


def fixture_header(name: str) -> tuple[dict[str, str], dict[str, str], WebhookConfig]:
    """Namespace labels, namespace annotations and config from a fixture's `# key: value` header."""
    text = (GOLDEN_DIR / f"{name}.yaml").read_text()
    labels = dict(DEFAULT_LABELS)
    ns_annotations: dict[str, str] = {}
    config: dict[str, Any] = dict(BASE_CONFIG)
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(": ")
        if key == "namespace-labels":
            labels = dict(part.split("=", 1) for part in value.split(","))
        elif key == "namespace-annotations":
            ns_annotations = dict(part.split("=", 1) for part in value.split(","))
        elif key == "config":
            config = {**BASE_CONFIG, **yaml.safe_load(value)}
    return labels, ns_annotations, parse_config(config)


def load_fixture(name: str) -> tuple[dict[str, Any], dict[str, str], WebhookConfig]:
    """The input object (read as kubectl reads it) plus the namespace labels and config."""
    labels, _, config = fixture_header(name)
    return kubeyaml.load((GOLDEN_DIR / f"{name}.yaml").read_text()), labels, config


def pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    holder: Any = doc
    for key in TEMPLATE_PATHS[doc["kind"]]:
        holder = holder[key]
    return holder  # type: ignore[no-any-return]


def semantic_problems(doc: dict[str, Any]) -> list[str]:
    """What the OpenAPI schema cannot see: duplicate names and mounts of volumes that do not exist."""
    problems: list[str] = []
    pod = pod_template(doc)
    spec = pod.get("spec") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    names = Counter(c["name"] for c in containers)
    problems += [f"container name {n} used {k} times" for n, k in names.items() if k > 1]
    volumes = Counter(v["name"] for v in spec.get("volumes") or [])
    problems += [f"volume name {n} used {k} times" for n, k in volumes.items() if k > 1]
    claim_names = {t["metadata"]["name"] for t in (doc.get("spec") or {}).get("volumeClaimTemplates") or []}
    # Kubernetes only warns when app containers share a port name; a name Outrider adds must be unique.
    status = json.loads(
        ((pod.get("metadata") or {}).get("annotations") or {}).get("outrider.dev/status", "{}")
    )
    ours = {*status.get("initContainers", []), *status.get("containers", [])}
    port_names = Counter(p["name"] for c in containers for p in c.get("ports") or [] if p.get("name"))
    our_port_names = {p.get("name") for c in containers if c["name"] in ours for p in c.get("ports") or []}
    problems += [
        f"port name {n} used {k} times in the pod"
        for n, k in port_names.items()
        if k > 1 and n in our_port_names
    ]
    port_numbers = Counter(
        (p["containerPort"], p.get("protocol", "TCP")) for c in containers for p in c.get("ports") or []
    )
    problems += [f"containerPort {n} declared {k} times" for n, k in port_numbers.items() if k > 1]
    for c in containers:
        envs = Counter(e["name"] for e in c.get("env") or [])
        problems += [f"{c['name']}: env {n} set {k} times" for n, k in envs.items() if k > 1]
        mounts = Counter(m["mountPath"] for m in c.get("volumeMounts") or [])
        problems += [f"{c['name']}: mountPath {n} used {k} times" for n, k in mounts.items() if k > 1]
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes and m["name"] not in claim_names:
                problems.append(f"{c['name']}: volumeMount {m['name']} names no volume")
        for env in c.get("env") or []:
            if env["name"] in ("OUTRIDER_CONFIG", "OUTRIDER_APP_PROBES"):
                json.loads(env["value"])
    return problems


class ThreadedWebhook:
    """The real webhook app over real TLS on 127.0.0.1, served from a background thread's loop.

    Sync tests (and hypothesis) talk to it with `http.client`, exactly like an API server would.
    """

    def __init__(self, cert_dir: Path, namespaces: Any = None, max_body: int | None = None) -> None:
        import asyncio
        import threading

        from outrider.webhook.config import ConfigHolder
        from outrider.webhook.server import DEFAULT_MAX_BODY, build_app
        from outrider.webhook.tls import CertStore

        self.cert_dir = cert_dir
        self.store = CertStore()
        self.store.load_files(cert_dir / "tls.crt", cert_dir / "tls.key")
        self.holder = ConfigHolder(parse_config(BASE_CONFIG))
        self.app = build_app(self.holder, self.store, namespaces, max_body or DEFAULT_MAX_BODY)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()

        async def start() -> None:
            from aiohttp import web

            self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.store.context)
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert started.wait(30), "webhook did not start"

    def client_context(self, ca: Path | None = None) -> Any:
        import ssl

        return ssl.create_default_context(cafile=str(ca or self.cert_dir / "ca.crt"))

    def connection(self, host: str = "localhost") -> Any:
        import http.client

        return http.client.HTTPSConnection(host, self.port, context=self.client_context(), timeout=30)

    def request(
        self, method: str, path: str, body: bytes | None = None, conn: Any = None
    ) -> tuple[int, bytes, dict[str, str]]:
        own = conn is None
        conn = conn or self.connection()
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            return response.status, data, dict(response.getheaders())
        finally:
            if own:
                conn.close()

    def close(self) -> None:
        import asyncio

        if not self.thread.is_alive():  # closed already
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def review(
    obj: Any,
    *,
    uid: str = "uid-1",
    namespace: str = "tools",
    operation: str = "CREATE",
    kind: str = "Pod",
    group: str = "",
    dry_run: bool = False,
) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": kind.lower() + "s"},
            "namespace": namespace,
            "operation": operation,
            "dryRun": dry_run,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
        },
    }
