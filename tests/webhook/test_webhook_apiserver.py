"""Every golden injected output is accepted by a real kube-apiserver (server-side dry-run create).

The OpenAPI schema misses rules the API server enforces (probes on native sidecars, init container
restartPolicy, port name syntax, field combinations); only the real validation proves the output.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from webhook_support import GOLDEN_DIR, fixture_names, pod_template

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]

# The control-plane harness belongs to the cluster tests (package `controlplane` under tests/).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from controlplane.harness import ControlPlane  # noqa: E402
from kubernetes_asyncio import client, config  # noqa: E402
from kubernetes_asyncio.client.exceptions import ApiException  # noqa: E402

from outrider.webhook import kubeyaml  # noqa: E402

CREATE = {
    "Pod": ("CoreV1Api", "create_namespaced_pod"),
    "ReplicationController": ("CoreV1Api", "create_namespaced_replication_controller"),
    "Deployment": ("AppsV1Api", "create_namespaced_deployment"),
    "StatefulSet": ("AppsV1Api", "create_namespaced_stateful_set"),
    "DaemonSet": ("AppsV1Api", "create_namespaced_daemon_set"),
    "ReplicaSet": ("AppsV1Api", "create_namespaced_replica_set"),
    "Job": ("BatchV1Api", "create_namespaced_job"),
    "CronJob": ("BatchV1Api", "create_namespaced_cron_job"),
}


def _outputs() -> list[str]:
    """Fixtures with something printed (refused workloads print nothing) of a kind the API serves."""
    names = []
    for name in fixture_names():
        path = GOLDEN_DIR / f"{name}.injected.yaml"
        document = kubeyaml.load(path.read_text()) if path.exists() else None
        if isinstance(document, dict) and document.get("kind") in CREATE:
            names.append(name)
    return names


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane.start(tmp_path_factory.mktemp("webhook-controlplane"))
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
async def api(control_plane: ControlPlane) -> AsyncIterator[client.ApiClient]:
    api_client = await config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    try:
        yield api_client
    finally:
        await api_client.close()


async def _ensure(coro: Any) -> None:
    try:
        await coro
    except ApiException as exc:
        if exc.status != 409:
            raise


@pytest.mark.parametrize("name", _outputs())
async def test_injected_output_passes_real_api_validation(api: client.ApiClient, name: str) -> None:
    # read as kubectl reads it, which is what `outrider inject -f x.yaml | kubectl apply -f -` sends
    document: dict[str, Any] = kubeyaml.load((GOLDEN_DIR / f"{name}.injected.yaml").read_text())
    namespace = document["metadata"].get("namespace", "default")
    core = client.CoreV1Api(api)
    await _ensure(core.create_namespace({"metadata": {"name": namespace}}))
    spec = pod_template(document).get("spec") or {}
    for sa in {"default", spec.get("serviceAccountName") or "default"}:
        await _ensure(core.create_namespaced_service_account(namespace, {"metadata": {"name": sa}}))
    api_class, method = CREATE[document["kind"]]
    create = getattr(getattr(client, api_class)(api), method)
    try:
        created = await create(namespace, document, dry_run="All")
    except ApiException as exc:
        pytest.fail(f"kube-apiserver refused {name}.injected.yaml: {exc.body}")
    assert created.metadata.namespace == namespace


async def test_the_api_server_check_can_fail(api: client.ApiClient) -> None:
    # A readiness probe on a plain (run-to-completion) init container is valid to the schema but not
    # to the API server: the check above would catch the engine emitting one.
    document = kubeyaml.load((GOLDEN_DIR / "simple-pod.injected.yaml").read_text())
    init = document["spec"]["initContainers"][0]
    assert init["name"] == "outrider-init"
    init["readinessProbe"] = {"httpGet": {"path": "/", "port": 15020}}
    core = client.CoreV1Api(api)
    await _ensure(core.create_namespace({"metadata": {"name": "tools"}}))
    await _ensure(core.create_namespaced_service_account("tools", {"metadata": {"name": "default"}}))
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod("tools", document, dry_run="All")
    assert err.value.status == 422


STRICT_NS = "strict-e2e"
HARDENED = {"runAsUser": 1000, "runAsNonRoot": True, "allowPrivilegeEscalation": False}


def _strict_webhooks(url: str, ca_pem: bytes) -> dict[str, Any]:
    """The manifest's own webhook entries (rules, matchConditions), pointed at the test server."""
    import base64

    manifest = (
        Path(__file__).resolve().parents[2] / "manifests" / "base" / "mutatingwebhookconfiguration.yaml"
    )
    webhooks = yaml.safe_load(manifest.read_text())["webhooks"]
    for hook in webhooks:
        hook["clientConfig"] = {"url": url, "caBundle": base64.b64encode(ca_pem).decode()}
        hook["namespaceSelector"] = {"matchLabels": {"outrider.dev/inject": "strict"}}
    assert [h["name"] for h in webhooks] == ["inject.outrider.dev", "strict.outrider.dev"]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "outrider-strict-e2e"},
        "webhooks": webhooks,
    }


async def test_strict_updates_through_a_real_api_server(
    api: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """kube-apiserver sends `pods/ephemeralcontainers` and pod UPDATEs; strict refuses the risky ones."""
    from webhook_support import ThreadedWebhook

    from outrider.webhook.certs import DEFAULT_DNS_NAMES, write_certs
    from outrider.webhook.namespaces import StaticNamespaces

    cert_dir = tmp_path_factory.mktemp("strict-certs")
    write_certs(cert_dir, DEFAULT_DNS_NAMES)
    server = ThreadedWebhook(
        cert_dir, namespaces=StaticNamespaces({STRICT_NS: {"outrider.dev/inject": "strict"}})
    )
    core = client.CoreV1Api(api)
    admission = client.AdmissionregistrationV1Api(api)
    mwc = _strict_webhooks(f"https://127.0.0.1:{server.port}/mutate", (cert_dir / "ca.crt").read_bytes())
    await _ensure(
        core.create_namespace({"metadata": {"name": STRICT_NS, "labels": {"outrider.dev/inject": "strict"}}})
    )
    await _ensure(core.create_namespaced_service_account(STRICT_NS, {"metadata": {"name": "default"}}))
    await admission.create_mutating_webhook_configuration(mwc)
    try:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "mcp"},
            "spec": {
                "containers": [
                    {
                        "name": "app",
                        "image": "ghcr.io/example/mcp:1",
                        "ports": [{"containerPort": 8080}],
                        "securityContext": HARDENED,
                    }
                ]
            },
        }
        created = None
        for _ in range(50):  # the registration reaches the API server's admission chain shortly after
            created = await core.create_namespaced_pod(STRICT_NS, pod)
            if created.metadata.annotations and "outrider.dev/status" in created.metadata.annotations:
                break
            await core.delete_namespaced_pod("mcp", STRICT_NS, grace_period_seconds=0)
            await asyncio.sleep(0.2)
        assert created is not None and "outrider.dev/status" in (created.metadata.annotations or {})

        def debugger(name: str, **extra: Any) -> dict[str, Any]:
            return {"spec": {"ephemeralContainers": [{"name": name, "image": "busybox:1.36", **extra}]}}

        with pytest.raises(ApiException) as refused:
            await core.patch_namespaced_pod_ephemeralcontainers(
                "mcp",
                STRICT_NS,
                debugger("net", securityContext={**HARDENED, "capabilities": {"add": ["NET_ADMIN"]}}),
            )
        assert refused.value.status == 403
        assert "spec.ephemeralContainers[0] (net).securityContext.capabilities.add has NET_ADMIN" in str(
            refused.value.body
        )
        with pytest.raises(ApiException) as targeted:
            await core.patch_namespaced_pod_ephemeralcontainers(
                "mcp",
                STRICT_NS,
                debugger("peek", securityContext=HARDENED, targetContainerName="outrider-proxy"),
            )
        assert "targetContainerName is outrider-proxy" in str(targeted.value.body)
        ok = await core.patch_namespaced_pod_ephemeralcontainers(
            "mcp", STRICT_NS, debugger("debug", securityContext=HARDENED, targetContainerName="app")
        )
        assert [c.name for c in ok.spec.ephemeral_containers] == ["debug"]

        swapped = {"spec": {"initContainers": [{"name": "outrider-proxy", "image": "busybox:1.36"}]}}
        with pytest.raises(ApiException) as image:
            await core.patch_namespaced_pod("mcp", STRICT_NS, swapped)
        assert "(outrider-proxy).image changed" in str(image.value.body)
        app_image = {"spec": {"containers": [{"name": "app", "image": "ghcr.io/example/mcp:2"}]}}
        updated = await core.patch_namespaced_pod("mcp", STRICT_NS, app_image)
        assert updated.spec.containers[0].image == "ghcr.io/example/mcp:2"

        # the webhook down: label edits still go through (matchConditions keep them away from it),
        # while an image change is refused (failurePolicy Fail)
        server.close()
        labelled = await core.patch_namespaced_pod("mcp", STRICT_NS, {"metadata": {"labels": {"x": "y"}}})
        assert labelled.metadata.labels["x"] == "y"
        with pytest.raises(ApiException) as down:
            await core.patch_namespaced_pod(
                "mcp",
                STRICT_NS,
                {"spec": {"containers": [{"name": "app", "image": "ghcr.io/example/mcp:3"}]}},
            )
        assert "strict.outrider.dev" in str(down.value.body)
    finally:
        await admission.delete_mutating_webhook_configuration(mwc["metadata"]["name"])
        server.close()
