"""All of `manifests/` against the real apiserver (item 7): server-side apply, RBAC exactly enough.

The webhook's in-cluster services run with a real token of the `outrider-webhook` ServiceAccount
(TokenRequest: the credential the pod gets). The apiserver's audit log then shows every call that
identity made: none may be forbidden (sufficient), every granted verb must be used (necessary), and
with the bindings removed the same start-up fails with 403.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from outrider.webhook.cluster import rotation
from outrider.webhook.cluster.options import ClusterOptions
from outrider.webhook.cluster.services import cluster_services
from outrider.webhook.config import ConfigHolder

from .harness import ControlPlane
from .kubeutil import MANIFESTS, eventually, server_side_apply
from .kustomize import render

SA_USER = "system:serviceaccount:outrider-system:outrider-webhook"
# stand-ins for CRDs this apiserver does not have (cert-manager, spire-controller-manager): enough
# for the API to accept the objects; their controllers are out of scope here
STUB_CRDS = [
    ("cert-manager.io", "v1", "Issuer", "issuers", "Namespaced"),
    ("cert-manager.io", "v1", "Certificate", "certificates", "Namespaced"),
    ("spire.spiffe.io", "v1alpha1", "ClusterSPIFFEID", "clusterspiffeids", "Cluster"),
]


def _crd(group: str, version: str, kind: str, plural: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }


# --- rendering (no cluster) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target", ["base", "overlays/kind", "overlays/node", "overlays/cert-manager", "examples"]
)
def test_renderer_matches_kubectl_kustomize(target: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH: the comparison with the reference kustomize cannot run")
    out = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS / target)], capture_output=True, text=True, check=True
    )
    reference = [d for d in yaml.safe_load_all(out.stdout) if d]

    def key(o: dict[str, Any]) -> tuple[str, str, str]:
        return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])

    assert sorted(render(MANIFESTS / target), key=key) == sorted(reference, key=key)


def test_webhook_configuration_is_exactly_as_specified() -> None:
    objects = render(MANIFESTS / "base")
    (mwc,) = [o for o in objects if o["kind"] == "MutatingWebhookConfiguration"]
    assert mwc["metadata"]["name"] == "outrider"
    hook, strict_updates = mwc["webhooks"]
    assert hook["name"] == "inject.outrider.dev" and hook["rules"][0]["operations"] == ["CREATE"]
    # the second entry only judges UPDATEs (ephemeral containers, sidecar image swaps) in strict namespaces
    assert strict_updates["name"] == "strict.outrider.dev"
    assert strict_updates["rules"][0]["operations"] == ["UPDATE"]
    assert set(strict_updates["rules"][0]["resources"]) == {"pods", "pods/ephemeralcontainers"}
    assert {"key": "outrider.dev/inject", "operator": "In", "values": ["strict"]} in strict_updates[
        "namespaceSelector"
    ]["matchExpressions"]
    assert strict_updates["failurePolicy"] == "Fail" and strict_updates["sideEffects"] == "None"
    assert hook["clientConfig"]["service"] == {
        "name": "outrider-webhook",
        "namespace": "outrider-system",
        "path": "/mutate",
        "port": 443,
    }
    assert {"key": "outrider.dev/inject", "operator": "In", "values": ["enabled", "strict"]} in hook[
        "namespaceSelector"
    ]["matchExpressions"]
    # a pod label must never be a way around injection
    assert "objectSelector" not in hook and "objectSelector" not in strict_updates
    assert strict_updates["matchConditions"][0]["name"] == "ephemeral-container-or-image-change"
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    assert hook["timeoutSeconds"] == 5 and hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["admissionReviewVersions"] == ["v1"]
    (deploy,) = [o for o in objects if o["kind"] == "Deployment"]
    assert deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"]
    (container,) = pod["containers"]
    assert {"livenessProbe", "readinessProbe", "startupProbe", "resources"} <= set(container)
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert any(o["kind"] == "PodDisruptionBudget" for o in objects)


# --- against the apiserver ----------------------------------------------------------------------------


@dataclass
class RecordingStore:
    loaded: list[bytes] = field(default_factory=list)

    def load_pem(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.loaded.append(cert_pem)


def _audit_calls(cp: ControlPlane, since_offset: int) -> list[dict[str, Any]]:
    calls = []
    with cp.audit_log.open() as fh:
        fh.seek(since_offset)
        for line in fh:
            event = json.loads(line)
            if event.get("user", {}).get("username") == SA_USER and event.get("stage") == "ResponseComplete":
                calls.append(event)
    return calls


async def _sa_kubeconfig(api: client.ApiClient, cp: ControlPlane, path: Path) -> Path:
    token = await client.CoreV1Api(api).create_namespaced_service_account_token(
        "outrider-webhook", "outrider-system", {"spec": {"expirationSeconds": 3600}}
    )
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": cp.url,
                    "certificate-authority-data": base64.b64encode(cp.ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "outrider-webhook", "user": {"token": token.status.token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "outrider-webhook"}}],
        "current-context": "c",
    }
    return _write_private(path, yaml.safe_dump(doc))


def _write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


async def _exercise_every_path(kubeconfig: Path, api: client.ApiClient) -> None:
    """Run the in-cluster services as the ServiceAccount and walk every code path that calls the API."""
    options = ClusterOptions(
        kubeconfig=str(kubeconfig),
        namespace="outrider-system",
        webhook_config_name="outrider",
        config_map="outrider-webhook",
        pod_name="rbac-probe",
        sync_seconds=0.2,
        ca_settle_seconds=0.2,
    )
    holder = ConfigHolder()
    v1 = client.CoreV1Api(api)
    async with cluster_services(options, holder, RecordingStore()) as facts:
        assert holder.current.sidecar_image == "ghcr.io/outrider-dev/outrider:0.1.0"  # from the ConfigMap
        assert await facts.labels("no-such-namespace") == {}  # a cache miss reads directly
        await v1.patch_namespaced_config_map(
            "outrider-webhook", "outrider-system", {"data": {"config.yaml": "image_pull_policy: Sometimes\n"}}
        )

        async def event_seen() -> bool:
            events = await v1.list_namespaced_event(
                "outrider-system", field_selector="involvedObject.name=outrider-webhook"
            )
            return any(e.reason == "InvalidConfig" for e in events.items)

        await eventually(event_seen, "the InvalidConfig Event written by the ServiceAccount")
        await v1.patch_namespaced_secret(
            "outrider-webhook-certs",
            "outrider-system",
            {"metadata": {"annotations": {rotation.ROTATE_ANNOTATION: "rbac-test"}}},
        )

        async def rotated() -> bool:
            ann = (
                await v1.read_namespaced_secret("outrider-webhook-certs", "outrider-system")
            ).metadata.annotations
            return bool(
                ann.get(rotation.ROTATED_ANNOTATION) == "rbac-test"
                and ann.get(rotation.PHASE_ANNOTATION) == rotation.STABLE
            )

        await eventually(rotated, "a full certificate rotation as the ServiceAccount")
    # leaving the context deletes this replica's Lease


@pytest.fixture
async def applied_manifests(api: client.ApiClient) -> AsyncIterator[None]:
    yield
    # failurePolicy Fail + no webhook behind the Service: never leave `outrider` registered
    with contextlib.suppress(ApiException):
        await client.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration("outrider")


@pytest.mark.controlplane
async def test_manifests_apply_and_rbac_is_exactly_enough(
    api: client.ApiClient, control_plane: ControlPlane, tmp_path: Path, applied_manifests: None
) -> None:
    for crd in STUB_CRDS:
        await server_side_apply(api, _crd(*crd))
    ext = client.ApiextensionsV1Api(api)

    async def crds_established() -> bool:
        items = (await ext.list_custom_resource_definition()).items
        names = {f"{p}.{g}" for g, _, _, p, _ in STUB_CRDS}
        ok = {
            c.metadata.name
            for c in items
            if any(
                cond.type == "Established" and cond.status == "True" for cond in (c.status.conditions or [])
            )
        }
        return names <= ok

    await eventually(crds_established, "stub CRDs established")

    base = render(MANIFESTS / "base")
    for obj in base:
        applied = await server_side_apply(api, obj)
        assert applied.get("kind") == obj["kind"], applied  # a Status object means it was refused
    for target in ("overlays/kind", "overlays/node", "overlays/cert-manager"):
        for obj in render(MANIFESTS / target):
            applied = await server_side_apply(api, obj, dry_run=True)
            assert applied.get("kind") == obj["kind"], (target, applied)
    for obj in render(MANIFESTS / "examples"):
        applied = await server_side_apply(api, obj)
        assert applied.get("kind") == obj["kind"], ("examples", applied)

    # --- the webhook's pod template passes Pod Security `restricted`, enforced on its namespace ---------
    (deploy,) = [o for o in base if o["kind"] == "Deployment"]
    template = deploy["spec"]["template"]
    webhook_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": "psa-check", "namespace": "outrider-system"},
        "spec": template["spec"],
    }
    v1 = client.CoreV1Api(api)
    await v1.create_namespaced_pod("outrider-system", webhook_pod, dry_run="All")
    loose = json.loads(json.dumps(webhook_pod))
    del loose["spec"]["containers"][0]["securityContext"]
    with pytest.raises(ApiException) as refused:  # and the label really is enforced
        await v1.create_namespaced_pod("outrider-system", loose, dry_run="All")
    assert refused.value.status == 403 and "restricted" in str(refused.value.body)

    # --- sufficient: every call the webhook makes as its ServiceAccount is allowed -------------------
    kubeconfig = await _sa_kubeconfig(api, control_plane, tmp_path / "sa.kubeconfig")
    offset = control_plane.audit_log.stat().st_size if control_plane.audit_log.exists() else 0
    await _exercise_every_path(kubeconfig, api)
    await asyncio.sleep(0.5)  # blocking audit mode: events are written before responses; be generous
    calls = _audit_calls(control_plane, offset)
    assert calls, f"no audit events for {SA_USER} in {control_plane.audit_log}"
    forbidden = [
        (c["verb"], c["objectRef"].get("resource"), c["objectRef"].get("name"))
        for c in calls
        if c.get("responseStatus", {}).get("code") == 403
    ]
    assert not forbidden, f"the manifests' RBAC is missing: {forbidden}"

    # --- necessary: every granted verb was used --------------------------------------------------------
    used = {(c["objectRef"].get("apiGroup", ""), c["objectRef"]["resource"], c["verb"]) for c in calls}
    unused = []
    for role in (o for o in base if o["kind"] in ("Role", "ClusterRole")):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        if (group, resource, verb) not in used:
                            unused.append((role["kind"], group, resource, verb))
    assert not unused, f"granted but never used (not least privilege): {unused}"

    # --- and without the bindings the same start-up is refused ----------------------------------------
    rbac = client.RbacAuthorizationV1Api(api)
    await rbac.delete_namespaced_role_binding("outrider-webhook", "outrider-system")
    await rbac.delete_cluster_role_binding("outrider-webhook")
    options = ClusterOptions(
        kubeconfig=str(kubeconfig),
        namespace="outrider-system",
        config_map="outrider-webhook",
        pod_name="denied",
    )
    for _ in range(50):  # the RBAC authorizer's informer needs a moment to see the deletion
        try:
            async with cluster_services(options, ConfigHolder(), RecordingStore()):
                pass
        except ApiException as exc:
            assert exc.status == 403
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the webhook's start-up still succeeded without its RBAC bindings")


@pytest.mark.parametrize("target", ["base", "overlays/kind", "overlays/node", "overlays/cert-manager"])
def test_shipped_configmaps_are_valid_webhook_config(target: str) -> None:
    from outrider.webhook.cluster.configmap import parse_configmap

    (cm,) = [o for o in render(MANIFESTS / target) if o["kind"] == "ConfigMap"]
    parsed = parse_configmap(cm["data"])
    assert parsed.webhook.sidecar_image
