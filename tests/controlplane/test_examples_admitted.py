"""The shipped examples are admitted as documented, through the real kube-apiserver and webhook.

Every example pod (and every workload's pod template, as its controller would create it) is created
with `dryRun=All` in a namespace labelled as the example says, against an `outrider webhook` running
with manifests/base's default ConfigMap, plus exactly the `# outrider-config: {...}` lines the
example's header documents. Without such a line the example must be admitted by the default config.
Everything else in the example files (Services, NetworkPolicies, ...) is server-side dry-run applied.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from outrider.webhook import annotations as ann
from outrider.webhook.offline import TEMPLATE_PATHS

from .harness import ControlPlane
from .kubeutil import (
    MANIFESTS,
    container_names,
    create_pod,
    eventually,
    is_injected,
    make_namespace,
    pod_body,
    register_webhook,
    running_webhook,
    server_side_apply,
    serving_certs,
    unique,
    unregister_webhook,
)
from .kustomize import render

pytestmark = pytest.mark.controlplane

REPO = MANIFESTS.parent
EXAMPLES = sorted(
    [
        *(p for p in (MANIFESTS / "examples").glob("*.yaml") if p.name != "kustomization.yaml"),
        *(REPO / "examples" / "demo").glob("*.yaml"),
        *(p for p in (REPO / "examples").glob("*.yaml") if p.name != "webhook-config.yaml"),
    ]
)
# Cluster-scoped custom resources this apiserver does not serve (covered by test_manifests_e2e).
SKIP_KINDS = {"Kustomization", "ClusterSPIFFEID"}


def documented_config(path: Path) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        if line.startswith("# outrider-config:"):
            extra.update(json.loads(line.partition(":")[2]))
    return extra


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") not in SKIP_KINDS]


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def base_config() -> dict[str, Any]:
    (cm,) = [o for o in render(MANIFESTS / "base") if o["kind"] == "ConfigMap"]
    return yaml.safe_load(cm["data"]["config.yaml"])  # type: ignore[no-any-return]


def example_ids() -> Iterator[Any]:
    for path in EXAMPLES:
        if load_docs(path):  # spire-clusterspiffeid.yaml: a CRD, applied by test_manifests_e2e
            yield pytest.param(path, id=str(path.relative_to(REPO)))


@pytest.mark.parametrize("path", list(example_ids()))
async def test_example_is_admitted_as_documented(
    path: Path, api: client.ApiClient, control_plane: ControlPlane, tmp_path: Path
) -> None:
    docs = load_docs(path)
    config_file = write_config(tmp_path / "config.yaml", {**base_config(), **documented_config(path)})
    certs = serving_certs(tmp_path / "tls")
    # Namespaces get unique names here (the session's apiserver is shared); labels as documented: the
    # example's own Namespace object, else what its comments say operators set (inject=enabled).
    renamed: dict[str, str] = {}
    labels: dict[str, dict[str, str]] = {}
    for doc in docs:
        if doc["kind"] == "Namespace":
            labels[doc["metadata"]["name"]] = dict(doc["metadata"].get("labels") or {})
    for doc in docs:
        ns = doc["metadata"].get("namespace")
        if ns and ns not in labels:
            labels[ns] = {ann.NAMESPACE_INJECT: ann.NAMESPACE_ENABLED}
    for original, wanted in labels.items():
        renamed[original] = await make_namespace(api, unique(original[:40]), wanted)
    # Service accounts a pod names but the file does not create (a team's other manifests would).
    declared = {
        (d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs if d["kind"] == "ServiceAccount"
    }
    for doc in docs:
        if doc["kind"] in TEMPLATE_PATHS:
            spec = _template(doc)["spec"]
            account = spec.get("serviceAccountName")
            ns = doc["metadata"].get("namespace")
            if account and (ns, account) not in declared:
                await client.CoreV1Api(api).create_namespaced_service_account(
                    renamed[ns], {"metadata": {"name": account}}
                )
                declared.add((ns, account))
    name = unique("outrider-examples")
    async with running_webhook(
        control_plane,
        tmp_path,
        [
            "--cert-mode",
            "files",
            "--tls-cert",
            str(certs.cert_file),
            "--tls-key",
            str(certs.key_file),
            "--host",
            "127.0.0.1",
            "--webhook-config-name",
            name,
            "--config",
            str(config_file),
        ],
    ) as webhook:
        await register_webhook(api, name, webhook.url, certs.ca_pem)
        try:
            probe_ns = next(iter(renamed.values()))

            async def called() -> bool:
                probe = pod_body("probe", annotations={ann.MCP_PORT: "8080"})
                pod = await create_pod(api, probe_ns, probe, dry_run="All")
                return is_injected(pod)

            if labels[next(iter(labels))].get(ann.NAMESPACE_INJECT):
                await eventually(called, "the apiserver calls the webhook")
            for doc in docs:
                doc = copy.deepcopy(doc)
                if doc["kind"] == "Namespace":
                    continue
                meta = doc["metadata"]
                if meta.get("namespace"):
                    meta["namespace"] = renamed[meta["namespace"]]
                if doc["kind"] == "ServiceAccount":
                    await client.CoreV1Api(api).create_namespaced_service_account(meta["namespace"], doc)
                    continue
                if doc["kind"] in TEMPLATE_PATHS:
                    await _admit(api, doc, path)
                if doc["kind"] != "Pod":
                    applied = await server_side_apply(api, doc, dry_run=True)
                    assert applied.get("kind") == doc["kind"], (path.name, applied)
        finally:
            await unregister_webhook(api, name)


def _template(doc: dict[str, Any]) -> dict[str, Any]:
    holder: Any = doc
    for key in TEMPLATE_PATHS[doc["kind"]]:
        holder = holder[key]
    return holder  # type: ignore[no-any-return]


async def _admit(api: client.ApiClient, doc: dict[str, Any], path: Path) -> None:
    holder = _template(doc)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": dict(holder.get("metadata") or {}),
        "spec": holder["spec"],
    }
    namespace = doc["metadata"]["namespace"]
    pod["metadata"].pop("namespace", None)
    if not pod["metadata"].get("name"):
        prefix = pod["metadata"].pop("generateName", None) or doc["metadata"].get("name") or "example"
        pod["metadata"]["name"] = unique(prefix.rstrip("-")[:40])
    try:
        created = await create_pod(api, namespace, pod, dry_run="All")
    except ApiException as exc:
        raise AssertionError(
            f"{path.name}: {doc['kind']} {doc['metadata']['name']} refused: {exc.body}"
        ) from None
    assert is_injected(created), (path.name, container_names(created))
    assert ann.STATUS in created["metadata"]["annotations"]


def test_the_refused_audiences_are_really_documented() -> None:
    # An example that needs more than manifests/base says so in its header (and nothing else may).
    needing = {p.name for p in EXAMPLES if documented_config(p)}
    assert needing == {"mcp-server.yaml", "mcp-server-deployment.yaml"}, needing
