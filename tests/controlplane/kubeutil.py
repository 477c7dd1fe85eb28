"""Test helpers over the real apiserver: namespaces, pods, webhook registration, `outrider webhook` runs.

Each test registers its own MutatingWebhookConfiguration (from `manifests/`, clientConfig swapped to
a loopback URL) and removes it afterwards: failurePolicy Fail would break every later test otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from .harness import ControlPlane, Issued, free_port, issue, make_ca
from .kustomize import render

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def make_namespace(api: client.ApiClient, name: str, labels: Mapping[str, str] | None = None) -> str:
    """A namespace plus its `default` ServiceAccount (no controller-manager runs to create it, and the
    ServiceAccount admission plugin refuses pods whose service account does not exist)."""
    v1 = client.CoreV1Api(api)
    await v1.create_namespace({"metadata": {"name": name, "labels": dict(labels or {})}})
    with contextlib.suppress(ApiException):
        await v1.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
    return name


def pod_body(
    name: str, labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels or {}), "annotations": dict(annotations or {})},
        "spec": {
            "containers": [
                {
                    "name": "mcp",
                    "image": "ghcr.io/example/mcp-server:1.0",
                    "ports": [{"name": "mcp", "containerPort": 8080}],
                }
            ]
        },
    }


async def create_pod(
    api: client.ApiClient, namespace: str, body: dict[str, Any], **kwargs: Any
) -> dict[str, Any]:
    pod = await client.CoreV1Api(api).create_namespaced_pod(namespace, body, **kwargs)
    return api.sanitize_for_serialization(pod)  # type: ignore[no-any-return]


def container_names(pod: Mapping[str, Any]) -> list[str]:
    spec = pod["spec"]
    return [c["name"] for c in spec.get("initContainers", [])] + [c["name"] for c in spec["containers"]]


def is_injected(pod: Mapping[str, Any]) -> bool:
    return "outrider-proxy" in container_names(pod)


def manifest_webhook_configuration() -> dict[str, Any]:
    for obj in render(MANIFESTS / "base"):
        if obj["kind"] == "MutatingWebhookConfiguration":
            return obj
    raise AssertionError("manifests/base has no MutatingWebhookConfiguration")


async def register_webhook(
    api: client.ApiClient, name: str, url: str, ca_pem: bytes | None
) -> dict[str, Any]:
    """The manifest's MutatingWebhookConfiguration under `name`, pointing at `url`."""
    mwc = copy.deepcopy(manifest_webhook_configuration())
    mwc["metadata"]["name"] = name
    for hook in mwc["webhooks"]:
        hook["clientConfig"] = {"url": url}
        if ca_pem is not None:
            hook["clientConfig"]["caBundle"] = base64.b64encode(ca_pem).decode()
    await client.AdmissionregistrationV1Api(api).create_mutating_webhook_configuration(mwc)
    return mwc


async def unregister_webhook(api: client.ApiClient, name: str) -> None:
    with contextlib.suppress(ApiException):
        await client.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration(name)


@dataclass
class ServingCerts:
    ca_pem: bytes
    cert_file: Path
    key_file: Path


def serving_certs(directory: Path) -> ServingCerts:
    ca = make_ca("outrider-e2e-webhook-ca")
    from cryptography.hazmat.primitives import serialization

    leaf: Issued = issue(ca, "outrider-webhook", dns=("localhost",), ips=("127.0.0.1",), server=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(leaf.cert_pem)
    (directory / "tls.key").write_bytes(leaf.key_pem)
    (directory / "tls.key").chmod(0o600)
    return ServingCerts(
        ca[0].public_bytes(serialization.Encoding.PEM), directory / "tls.crt", directory / "tls.key"
    )


@dataclass
class WebhookProcess:
    """`outrider webhook` as a subprocess, the way an operator runs it outside the cluster."""

    args: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/mutate"

    def start(self) -> None:
        env = {**os.environ, **self.env}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "outrider.webhook.cli",
                    "webhook",
                    "--port",
                    str(self.port),
                    *self.args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )

    async def wait_serving(self, within: float = 60.0) -> None:
        """Until the HTTPS port completes a TLS handshake (any HTTP answer will do)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"outrider webhook exited with {self.proc.returncode}; log: {self.log}\n{self.tail()}"
                )
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port, ssl=ctx), 2
                )
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                return
            except (OSError, TimeoutError, ssl.SSLError):
                await asyncio.sleep(0.2)
        raise AssertionError(
            f"outrider webhook did not serve within {within}s; log: {self.log}\n{self.tail()}"
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.asynccontextmanager
async def running_webhook(
    control_plane: ControlPlane,
    workdir: Path,
    extra: list[str],
    *,
    env: Mapping[str, str] | None = None,
    port: int = 0,
) -> AsyncIterator[WebhookProcess]:
    proc = WebhookProcess(
        args=["--kubeconfig", str(control_plane.kubeconfig), *extra],
        port=port or free_port(),
        log=workdir / f"webhook-{uuid.uuid4().hex[:6]}.log",
        env=dict(env or {}),
    )
    proc.start()
    try:
        await proc.wait_serving()
        yield proc
    finally:
        proc.stop()


async def server_side_apply(
    api: client.ApiClient, obj: Mapping[str, Any], *, manager: str = "outrider-tests", dry_run: bool = False
) -> dict[str, Any]:
    """PATCH application/apply-patch+yaml to the object's own URL, found through API discovery."""
    path = await resource_path(api, obj)
    query = [("fieldManager", manager), ("force", "true")]
    if dry_run:
        query.append(("dryRun", "All"))
    resp = await api.call_api(
        path,
        "PATCH",
        query_params=query,
        header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
        body=dict(obj),
        auth_settings=["BearerToken"],
        _preload_content=False,
    )
    raw = resp[0] if isinstance(resp, tuple) else resp
    return json.loads(await raw.read())  # type: ignore[no-any-return]


_DISCOVERY: dict[str, dict[str, tuple[str, bool]]] = {}


async def resource_path(api: client.ApiClient, obj: Mapping[str, Any]) -> str:
    api_version = obj["apiVersion"]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if obj["kind"] not in _DISCOVERY.get(api_version, {}):  # new CRDs appear after the first look
        resp = await api.call_api(
            base,
            "GET",
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
        )
        raw = resp[0] if isinstance(resp, tuple) else resp
        doc = json.loads(await raw.read())
        _DISCOVERY[api_version] = {
            r["kind"]: (r["name"], bool(r["namespaced"])) for r in doc["resources"] if "/" not in r["name"]
        }
    plural, namespaced = _DISCOVERY[api_version][obj["kind"]]
    meta = obj["metadata"]
    if namespaced:
        return f"{base}/namespaces/{meta['namespace']}/{plural}/{meta['name']}"
    return f"{base}/{plural}/{meta['name']}"


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


async def eventually(check: Callable[[], Awaitable[Any]], what: str, within: float = 30.0) -> Any:
    """Poll `check` every 0.1 s until it returns something truthy (returned); fail after `within` s."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
