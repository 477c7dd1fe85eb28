"""The real kube-apiserver calls a real `outrider webhook` (items 1-6 of the control-plane issue).

The webhook runs as a subprocess with real TLS and `--kubeconfig` (namespace labels come from the
API); it is registered with the MutatingWebhookConfiguration from `manifests/`, clientConfig swapped
for a loopback URL + caBundle.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from .harness import ControlPlane, free_port, issue, make_ca
from .kubeutil import (
    MANIFESTS,
    ServingCerts,
    WebhookProcess,
    container_names,
    create_pod,
    is_injected,
    make_namespace,
    pod_body,
    register_webhook,
    serving_certs,
    unique,
    unregister_webhook,
)
from .kustomize import render

pytestmark = pytest.mark.controlplane

MCP = {"outrider.dev/mcp-port": "8080"}


class Webhook:
    """One `outrider webhook` process + its registration, shared by the tests of this module."""

    def __init__(self, cp: ControlPlane, workdir: Path) -> None:
        self.cp = cp
        self.certs: ServingCerts = serving_certs(workdir / "tls")
        self.name = unique("outrider-e2e")
        # the kind overlay's webhook config: what `make kind-e2e` runs the example with
        (kind_cm,) = [o for o in render(MANIFESTS / "overlays" / "kind") if o["kind"] == "ConfigMap"]
        config_file = workdir / "webhook-config.yaml"
        config_file.write_text(kind_cm["data"]["config.yaml"])
        self.proc = WebhookProcess(
            args=[
                "--kubeconfig",
                str(cp.kubeconfig),
                "--cert-mode",
                "files",
                "--tls-cert",
                str(self.certs.cert_file),
                "--tls-key",
                str(self.certs.key_file),
                "--host",
                "127.0.0.1",
                "--webhook-config-name",
                self.name,
                "--config",
                str(config_file),
            ],
            port=free_port(),
            log=workdir / "webhook.log",
        )

    async def start(self) -> None:
        self.proc.start()
        await self.proc.wait_serving()


@pytest.fixture(scope="module")
def webhook(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    hook = Webhook(control_plane, tmp_path_factory.mktemp("webhook-e2e"))

    async def setup() -> None:
        await hook.start()
        api = await _admin(control_plane)
        try:
            await register_webhook(api, hook.name, hook.proc.url, hook.certs.ca_pem)
        finally:
            await api.close()

    async def teardown() -> None:
        api = await _admin(control_plane)
        try:
            await unregister_webhook(api, hook.name)
        finally:
            await api.close()

    asyncio.run(setup())
    try:
        yield hook
    finally:
        hook.proc.stop()
        asyncio.run(teardown())
        print(f"\n[webhook] log: {hook.proc.log}")


async def _admin(cp: ControlPlane) -> client.ApiClient:
    from kubernetes_asyncio import config

    return await config.new_client_from_config(config_file=str(cp.kubeconfig))


def _message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body)["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc.body)


async def _ready(api: client.ApiClient, webhook: Webhook, namespace: str) -> None:
    """The apiserver picks up a new webhook configuration through an informer: wait until it calls us."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pod = await create_pod(api, namespace, pod_body("probe", annotations=MCP), dry_run="All")
        if is_injected(pod):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"the apiserver never called the webhook; log {webhook.proc.log}\n{webhook.proc.tail()}"
    )


# 1 -------------------------------------------------------------------------------------------------


async def test_labelled_namespace_gets_sidecar_unlabelled_untouched(
    api: client.ApiClient, webhook: Webhook
) -> None:
    enabled = await make_namespace(api, unique("e2e-enabled"), {"outrider.dev/inject": "enabled"})
    plain = await make_namespace(api, unique("e2e-plain"))
    await _ready(api, webhook, enabled)

    await create_pod(api, enabled, pod_body("mcp", annotations=MCP))
    stored = api.sanitize_for_serialization(await client.CoreV1Api(api).read_namespaced_pod("mcp", enabled))
    names = container_names(stored)
    assert names.count("outrider-proxy") == 1 and "outrider-init" in names, names
    volumes = stored["spec"]["volumes"]
    spiffe = [v for v in volumes if v.get("csi", {}).get("driver") == "csi.spiffe.io"]
    assert len(spiffe) == 1 and spiffe[0]["csi"].get("readOnly") is True
    assert "outrider.dev/status" in stored["metadata"]["annotations"]

    body = pod_body("mcp", annotations=MCP)
    await create_pod(api, plain, body)
    untouched = api.sanitize_for_serialization(await client.CoreV1Api(api).read_namespaced_pod("mcp", plain))
    assert container_names(untouched) == ["mcp"]
    assert "outrider.dev/status" not in (untouched["metadata"].get("annotations") or {})


# 2 -------------------------------------------------------------------------------------------------


async def test_opt_out_honoured_when_enabled_refused_when_strict(
    api: client.ApiClient, webhook: Webhook
) -> None:
    enabled = await make_namespace(api, unique("e2e-optout"), {"outrider.dev/inject": "enabled"})
    strict = await make_namespace(api, unique("e2e-strict"), {"outrider.dev/inject": "strict"})
    await _ready(api, webhook, enabled)

    opted_out = pod_body("app", labels={"outrider.dev/inject": "false"}, annotations=MCP)
    pod = await create_pod(api, enabled, opted_out)
    assert container_names(pod) == ["mcp"]

    with pytest.raises(ApiException) as refused:
        await create_pod(api, strict, pod_body("app", annotations={**MCP, "outrider.dev/inject": "false"}))
    message = _message(refused.value)
    assert refused.value.status in (400, 403), message
    assert 'admission webhook "inject.outrider.dev" denied the request' in message
    assert "strict" in message and "outrider.dev/inject" in message
    # and a plain pod in the strict namespace is injected
    ok = pod_body("ok", annotations=MCP)
    # strict also wants proof the app cannot become the proxy's UID (the image's USER is invisible)
    ok["spec"]["containers"][0]["securityContext"] = {"runAsUser": 1000, "allowPrivilegeEscalation": False}
    assert is_injected(await create_pod(api, strict, ok))


# 3 -------------------------------------------------------------------------------------------------


async def test_webhook_down_fails_closed_only_where_opted_in(api: client.ApiClient, webhook: Webhook) -> None:
    enabled = await make_namespace(api, unique("e2e-down"), {"outrider.dev/inject": "enabled"})
    plain = await make_namespace(api, unique("e2e-up"))
    await _ready(api, webhook, enabled)
    webhook.proc.stop()
    try:
        with pytest.raises(ApiException) as failed:
            await create_pod(api, enabled, pod_body("while-down", annotations=MCP))
        message = _message(failed.value)
        assert failed.value.status == 500, message
        assert 'failed calling webhook "inject.outrider.dev"' in message
        assert "connection refused" in message
        assert container_names(await create_pod(api, plain, pod_body("unaffected"))) == ["mcp"]
    finally:
        await webhook.start()  # same port, same certificate
    await _ready(api, webhook, enabled)
    assert is_injected(await create_pod(api, enabled, pod_body("after", annotations=MCP)))


# 4 -------------------------------------------------------------------------------------------------


async def test_server_side_dry_run(api: client.ApiClient, webhook: Webhook) -> None:
    enabled = await make_namespace(api, unique("e2e-dry"), {"outrider.dev/inject": "enabled"})
    await _ready(api, webhook, enabled)
    pod = await create_pod(api, enabled, pod_body("dry", annotations=MCP), dry_run="All")
    assert is_injected(pod)
    with pytest.raises(ApiException) as missing:
        await client.CoreV1Api(api).read_namespaced_pod("dry", enabled)
    assert missing.value.status == 404


# 5 -------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _container_adder(workdir: Path) -> AsyncIterator[tuple[str, bytes]]:
    """A second mutating webhook (a plain aiohttp server) that appends a container `late-sidecar`."""
    ca = make_ca("adder-ca")
    leaf = issue(ca, "adder", ips=("127.0.0.1",), server=True)
    (workdir / "adder.crt").write_bytes(leaf.cert_pem)
    (workdir / "adder.key").write_bytes(leaf.key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(workdir / "adder.crt", workdir / "adder.key")

    async def mutate(request: web.Request) -> web.Response:
        review = await request.json()
        req = review["request"]
        names = [c["name"] for c in req["object"]["spec"]["containers"]]
        patch: list[dict[str, Any]] = []
        if "late-sidecar" not in names:
            patch = [
                {
                    "op": "add",
                    "path": "/spec/containers/-",
                    "value": {"name": "late-sidecar", "image": "registry.example/late:1"},
                }
            ]
        response: dict[str, Any] = {"uid": req["uid"], "allowed": True}
        if patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        return web.json_response(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        )

    app = web.Application()
    app.router.add_post("/mutate", mutate)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    from cryptography.hazmat.primitives import serialization

    try:
        yield f"https://127.0.0.1:{port}/mutate", ca[0].public_bytes(serialization.Encoding.PEM)
    finally:
        await runner.cleanup()


async def test_reinvocation_with_a_later_webhook_keeps_one_sidecar(
    api: client.ApiClient, webhook: Webhook, tmp_path: Path
) -> None:
    enabled = await make_namespace(api, unique("e2e-reinvoke"), {"outrider.dev/inject": "enabled"})
    await _ready(api, webhook, enabled)
    # "zz-" sorts after ours, so it runs after Outrider; ours is then re-invoked (IfNeeded)
    other = unique("zz-container-adder")
    async with _container_adder(tmp_path) as (url, ca_pem):
        mwc = await register_webhook(api, other, url, ca_pem)
        try:
            del mwc  # same selectors as ours: only opted-in namespaces
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                pod = await create_pod(api, enabled, pod_body("probe", annotations=MCP), dry_run="All")
                if "late-sidecar" in container_names(pod):
                    break
                await asyncio.sleep(0.1)
            pod = await create_pod(api, enabled, pod_body("both", annotations=MCP))
        finally:
            await unregister_webhook(api, other)
    names = container_names(pod)
    assert names.count("outrider-proxy") == 1, names
    assert names.count("late-sidecar") == 1, names
    assert names.count("outrider-init") == 1, names
    stored = await client.CoreV1Api(api).read_namespaced_pod(
        "both", enabled
    )  # valid: the apiserver stored it
    assert stored.metadata.name == "both"


# 6 -------------------------------------------------------------------------------------------------


async def test_system_namespaces_never_touched(api: client.ApiClient, webhook: Webhook) -> None:
    v1 = client.CoreV1Api(api)
    enabled = await make_namespace(api, unique("e2e-sys"), {"outrider.dev/inject": "enabled"})
    await _ready(api, webhook, enabled)
    with contextlib.suppress(ApiException):
        await make_namespace(api, "outrider-system")
    label = {"metadata": {"labels": {"outrider.dev/inject": "enabled"}}}
    unlabel = {"metadata": {"labels": {"outrider.dev/inject": None}}}
    try:
        for ns in ("kube-system", "outrider-system"):
            await v1.patch_namespace(ns, label)  # even a mistaken label must not pull them in
            with contextlib.suppress(ApiException):
                await v1.create_namespaced_service_account(ns, {"metadata": {"name": "default"}})
            pod = await create_pod(api, ns, pod_body(unique("sys"), annotations=MCP), dry_run="All")
            assert container_names(pod) == ["mcp"], ns
    finally:
        for ns in ("kube-system", "outrider-system"):
            await v1.patch_namespace(ns, unlabel)
    # a label an app can set on itself is no way around injection (no objectSelector)
    own = pod_body("outrider-thing", labels={"app.kubernetes.io/part-of": "outrider"}, annotations=MCP)
    assert "outrider-proxy" in container_names(await create_pod(api, enabled, own, dry_run="All"))


# other meshes ------------------------------------------------------------------------------------


async def _namespace(
    api: client.ApiClient, prefix: str, labels: dict[str, str], annotations: dict[str, str] | None = None
) -> str:
    """A namespace with labels and annotations (the webhook reads both through its watch cache)."""
    name = unique(prefix)
    v1 = client.CoreV1Api(api)
    await v1.create_namespace(
        {"metadata": {"name": name, "labels": labels, "annotations": annotations or {}}}
    )
    with contextlib.suppress(ApiException):
        await v1.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
    return name


async def _create_with_warnings(
    api: client.ApiClient, namespace: str, body: dict[str, Any]
) -> tuple[Any, str]:
    """Create a pod; return it and the Warning headers the API server relayed from admission."""
    pod, _, headers = await client.CoreV1Api(api).create_namespaced_pod_with_http_info(namespace, body)
    return api.sanitize_for_serialization(pod), " ".join(headers.getall("Warning", []))


async def test_other_meshes_warned_when_enabled_refused_when_strict(
    api: client.ApiClient, webhook: Webhook
) -> None:
    strict_sc = {"runAsUser": 1000, "allowPrivilegeEscalation": False}
    plain = await make_namespace(api, unique("e2e-mesh-ready"), {"outrider.dev/inject": "enabled"})
    await _ready(api, webhook, plain)
    # enabled: a pod asking for Istio gets the sidecar of neither Outrider nor (here) Istio, and a warning
    enabled = await _namespace(api, "e2e-mesh-enabled", {"outrider.dev/inject": "enabled"})
    asks = pod_body("asks", labels={"sidecar.istio.io/inject": "true"}, annotations=MCP)
    pod, warnings = await _create_with_warnings(api, enabled, asks)
    assert container_names(pod) == ["mcp"]
    assert "pod label sidecar.istio.io/inject" in warnings and "two traffic-capturing proxies" in warnings
    # the namespace's labels and annotations come from the API (watch cache or a direct read)
    linkerd = await _namespace(
        api, "e2e-mesh-linkerd", {"outrider.dev/inject": "enabled"}, {"linkerd.io/inject": "enabled"}
    )
    pod, warnings = await _create_with_warnings(api, linkerd, pod_body("in-linkerd-ns", annotations=MCP))
    assert container_names(pod) == ["mcp"]
    assert "namespace annotation linkerd.io/inject: enabled" in warnings
    # strict: refused, naming the label, the annotation or the container
    cases = [
        ({"istio-injection": "enabled"}, {}, pod_body("p"), "namespace label istio-injection=enabled"),
        ({"istio.io/rev": "canary"}, {}, pod_body("p"), "namespace label istio.io/rev=canary"),
        ({}, {"linkerd.io/inject": "enabled"}, pod_body("p"), "namespace annotation linkerd.io/inject"),
        (
            {},
            {},
            pod_body("p", annotations={"linkerd.io/inject": "enabled"}),
            "pod annotation linkerd.io/inject",
        ),
        (
            {},
            {},
            pod_body("p", labels={"sidecar.istio.io/inject": "true"}),
            "pod label sidecar.istio.io/inject",
        ),
    ]
    for ns_labels, ns_annotations, body, named in cases:
        strict = await _namespace(
            api, "e2e-mesh-strict", {"outrider.dev/inject": "strict", **ns_labels}, ns_annotations
        )
        body["metadata"]["annotations"].update(MCP)
        body["spec"]["containers"][0]["securityContext"] = strict_sc
        with pytest.raises(ApiException) as refused:
            await create_pod(api, strict, body)
        message = _message(refused.value)
        assert 'admission webhook "inject.outrider.dev" denied the request' in message, message
        assert named in message and "strict" in message, message
    # Istio's init container without its proxy is refused too
    strict = await _namespace(api, "e2e-mesh-init", {"outrider.dev/inject": "strict"})
    leftover = pod_body("leftover", annotations=MCP)
    leftover["spec"]["containers"][0]["securityContext"] = strict_sc
    leftover["spec"]["initContainers"] = [{"name": "istio-init", "image": "docker.io/istio/proxyv2:1.27.0"}]
    with pytest.raises(ApiException) as refused:
        await create_pod(api, strict, leftover)
    assert "spec.initContainers has istio-init" in _message(refused.value)
    # an annotation added to a namespace later reaches the webhook through its watch
    later = await _namespace(api, "e2e-mesh-later", {"outrider.dev/inject": "strict"})
    plain_pod = pod_body("later", annotations=MCP)
    plain_pod["spec"]["containers"][0]["securityContext"] = strict_sc
    assert is_injected(await create_pod(api, later, plain_pod, dry_run="All"))
    await client.CoreV1Api(api).patch_namespace(
        later, {"metadata": {"annotations": {"linkerd.io/inject": "enabled"}}}
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            await create_pod(api, later, plain_pod, dry_run="All")
        except ApiException as exc:
            assert "namespace annotation linkerd.io/inject" in _message(exc)
            break
        assert time.monotonic() < deadline, "the namespace watch never delivered the new annotation"
        await asyncio.sleep(0.1)
    # and a pod that opts out of Istio in an Istio namespace gets Outrider as usual
    istio = await _namespace(
        api, "e2e-mesh-optout", {"outrider.dev/inject": "strict", "istio-injection": "enabled"}
    )
    opted = pod_body("opted", labels={"sidecar.istio.io/inject": "false"}, annotations=MCP)
    opted["spec"]["containers"][0]["securityContext"] = strict_sc
    assert is_injected(await create_pod(api, istio, opted))


# the shipped example ------------------------------------------------------------------------------


async def test_example_mcp_server_template_is_injected(api: client.ApiClient, webhook: Webhook) -> None:
    from .kubeutil import load_yaml

    (deploy,) = [
        d for d in load_yaml(MANIFESTS / "examples" / "mcp-server.yaml") if d["kind"] == "Deployment"
    ]
    enabled = await make_namespace(api, unique("e2e-example"), {"outrider.dev/inject": "enabled"})
    await client.CoreV1Api(api).create_namespaced_service_account(
        enabled, {"metadata": {"name": deploy["spec"]["template"]["spec"]["serviceAccountName"]}}
    )
    await _ready(api, webhook, enabled)
    template = deploy["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": "example"},
        "spec": template["spec"],
    }
    stored = await create_pod(api, enabled, pod)
    names = container_names(stored)
    assert names.count("outrider-proxy") == 1 and "outrider-init" in names, names
    (app,) = [c for c in stored["spec"]["containers"] if c["name"] == "mcp"]
    # the kubelet's probe of the MCP port now goes through the sidecar's admin port
    assert app["readinessProbe"]["httpGet"]["port"] == 15020
