"""Every golden injected output is accepted by a real kube-apiserver (server-side dry-run create).

The OpenAPI schema misses rules the API server enforces (probes on native sidecars, init container
restartPolicy, port name syntax, field combinations); only the real validation proves the output.
"""

from __future__ import annotations

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
    return [n for n in fixture_names() if (GOLDEN_DIR / f"{n}.injected.yaml").exists()]


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
    document: dict[str, Any] = yaml.safe_load((GOLDEN_DIR / f"{name}.injected.yaml").read_text())
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
    document = yaml.safe_load((GOLDEN_DIR / "simple-pod.injected.yaml").read_text())
    init = document["spec"]["initContainers"][0]
    assert init["name"] == "outrider-init"
    init["readinessProbe"] = {"httpGet": {"path": "/", "port": 15020}}
    core = client.CoreV1Api(api)
    await _ensure(core.create_namespace({"metadata": {"name": "tools"}}))
    await _ensure(core.create_namespaced_service_account("tools", {"metadata": {"name": "default"}}))
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod("tools", document, dry_run="All")
    assert err.value.status == 422
