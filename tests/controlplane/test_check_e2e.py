"""`outrider check` against a real kube-apiserver running a real `outrider webhook`: healthy, then each fault.

The module starts its own control plane (check looks at the whole cluster, so other tests' namespaces
and webhooks must not leak in), installs manifests/base, and runs the webhook process in self-managed
certificate mode with the MutatingWebhookConfiguration pointed at its loopback port. There is no
kubelet or controller-manager: EndpointSlices and pod statuses are written the way those controllers
would (stand-ins for them), everything else is the real API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from .harness import ControlPlane, free_port, make_ca
from .kubeutil import (
    MANIFESTS,
    REPO,
    WebhookProcess,
    eventually,
    is_injected,
    make_namespace,
    pod_body,
    server_side_apply,
)
from .kustomize import render
from .test_manifests_e2e import _crd

NS = "outrider-system"
APPS = "check-apps"
MCP = {"outrider.dev/mcp-port": "8080"}


@dataclass
class Cluster:
    cp: ControlPlane
    webhook: WebhookProcess


def run_check(cluster: Cluster, *args: str, kubeconfig: Path | None = None) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "outrider.webhook.cli",
            "check",
            "--kubeconfig",
            str(kubeconfig or cluster.cp.kubeconfig),
            "-o",
            "json",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert out.stdout, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout)


def by_name(report: dict[str, Any], prefix: str) -> dict[str, Any]:
    hits = [c for c in report["checks"] if c["name"].startswith(prefix)]
    assert hits, f"no check named {prefix!r}: {[c['name'] for c in report['checks']]}"
    return hits[0]


def text(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "outrider.webhook.cli",
            "check",
            "--kubeconfig",
            str(cluster.cp.kubeconfig),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def _endpoint_slice(ready: list[bool]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "outrider-webhook-check",
            "namespace": NS,
            "labels": {"kubernetes.io/service-name": "outrider-webhook"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "https", "port": 9443, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [f"10.1.0.{i + 1}"], "conditions": {"ready": r}} for i, r in enumerate(ready)
        ],
    }


async def _install(cp: ControlPlane, webhook_port: int) -> None:
    api = await config.new_client_from_config(config_file=str(cp.kubeconfig))
    try:
        await server_side_apply(
            api, _crd("spire.spiffe.io", "v1alpha1", "ClusterSPIFFEID", "clusterspiffeids", "Cluster")
        )
        for obj in render(MANIFESTS / "base"):
            if obj["kind"] == "MutatingWebhookConfiguration":
                for hook in obj["webhooks"]:  # the apiserver here cannot route to a Service's ClusterIP
                    hook["clientConfig"] = {"url": f"https://127.0.0.1:{webhook_port}/mutate"}
            await server_side_apply(api, obj)
        await server_side_apply(api, _endpoint_slice([True, True]))
        await server_side_apply(
            api,
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "CSIDriver",
                "metadata": {"name": "csi.spiffe.io"},
                "spec": {
                    "podInfoOnMount": True,
                    "attachRequired": False,
                    "volumeLifecycleModes": ["Ephemeral"],
                },
            },
        )

        async def spiffe_id_applied() -> bool:
            try:
                for obj in render(MANIFESTS / "examples"):
                    if obj["kind"] == "ClusterSPIFFEID":
                        await server_side_apply(api, obj)
            except (ApiException, AssertionError):
                return False
            return True

        await eventually(spiffe_id_applied, "the ClusterSPIFFEID CRD serving")
        await make_namespace(api, APPS, {"outrider.dev/inject": "enabled"})
    finally:
        await api.close()


async def _wait_injecting(cp: ControlPlane) -> None:
    api = await config.new_client_from_config(config_file=str(cp.kubeconfig))
    try:

        async def injected() -> bool:
            with contextlib.suppress(ApiException):
                pod = await client.CoreV1Api(api).create_namespaced_pod(
                    APPS, pod_body("probe", annotations=MCP), dry_run="All"
                )
                return is_injected(api.sanitize_for_serialization(pod))
            return False

        await eventually(injected, "the webhook injecting through its self-managed certificate", within=60)
        # a Deployment's pod, as the ReplicaSet controller would create it
        body = pod_body(
            "web-7d9f8b6c5d-abcde", labels={"app": "web", "pod-template-hash": "7d9f8b6c5d"}, annotations=MCP
        )
        body["metadata"]["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-7d9f8b6c5d",
                "uid": "0b7c1f7e-0000-4000-8000-000000000001",
                "controller": True,
            }
        ]
        await client.CoreV1Api(api).create_namespaced_pod(APPS, body)
    finally:
        await api.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("check")
    cp = ControlPlane.start(workdir / "cp")
    port = free_port()
    webhook = WebhookProcess(
        args=[
            "--kubeconfig",
            str(cp.kubeconfig),
            "--host",
            "127.0.0.1",
            "--namespace",
            NS,
            "--webhook-config-name",
            "outrider",
            "--cert-mode",
            "self-managed",
            "--config-map",
            "outrider-webhook",
        ],
        port=port,
        log=workdir / "webhook.log",
        # a long sync: the faults below must stay in place while check looks at them
        env={
            "POD_NAME": "outrider-webhook-check",
            "OUTRIDER_CERT_EXTRA_SANS": "127.0.0.1",
            "OUTRIDER_CLUSTER_SYNC_SECONDS": "3600",
        },
    )
    try:
        asyncio.run(_install(cp, port))
        webhook.start()
        asyncio.run(webhook.wait_serving())
        asyncio.run(_wait_injecting(cp))
        yield Cluster(cp, webhook)
    finally:
        webhook.stop()
        print(f"\n[check] webhook log {webhook.log}; {cp.logs_hint()}")
        cp.stop()


@pytest.fixture
async def api(cluster: Cluster) -> AsyncIterator[client.ApiClient]:
    api_client = await config.new_client_from_config(config_file=str(cluster.cp.kubeconfig))
    try:
        yield api_client
    finally:
        await api_client.close()


# --- healthy ---------------------------------------------------------------------------------------


def test_healthy_cluster_passes(cluster: Cluster) -> None:
    code, report = run_check(cluster)
    assert code == 0, report
    assert report["success"] is True
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    for name in (
        "can query the Kubernetes API",
        "supports native sidecars",
        "SPIFFE CSI driver is registered",
        "a ClusterSPIFFEID selects outrider-proxy",
        "MutatingWebhookConfiguration outrider exists",
        "serving certificate is valid now",
        "caBundle trusts the serving certificate",
        "Service outrider-webhook has ready endpoints",
        "a dry-run pod in an opted-in namespace is injected",
        "ConfigMap outrider-webhook parses",
        "pods run the current configuration",
        "pods in opted-in namespaces are injected",
        f"namespace {APPS}",
    ):
        assert statuses.get(name) == "pass", (name, report)
    out = text(cluster)  # the human report, grouped
    assert out.returncode == 0
    assert "outrider-webhook\n----------------" in out.stdout and "√ caBundle trusts" in out.stdout


def test_pre_install_on_an_installed_cluster(cluster: Cluster) -> None:
    code, report = run_check(cluster, "--pre")
    assert code == 0, report
    assert by_name(report, "no MutatingWebhookConfiguration")["status"] == "warn"
    assert by_name(report, "can create the install's objects")["status"] == "pass"
    assert not any(c["name"].startswith("caBundle") for c in report["checks"])  # prerequisites only


async def test_pre_install_without_rights(cluster: Cluster, api: client.ApiClient, tmp_path: Path) -> None:
    v1 = client.CoreV1Api(api)
    await v1.create_namespaced_service_account("default", {"metadata": {"name": "check-nobody"}})
    token = await v1.create_namespaced_service_account_token(
        "check-nobody", "default", {"spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"]}}
    )
    doc = json.loads(json.dumps(__import__("yaml").safe_load(cluster.cp.kubeconfig.read_text())))
    doc["users"] = [{"name": "admin", "user": {"token": token.status.token}}]
    kubeconfig = tmp_path / "nobody.kubeconfig"
    kubeconfig.write_text(json.dumps(doc))
    code, report = run_check(cluster, "--pre", kubeconfig=kubeconfig)
    assert code == 1, report
    access = by_name(report, "can create the install's objects")
    assert access["status"] == "fail"
    assert "create mutatingwebhookconfigurations.admissionregistration.k8s.io" in access["details"]
    assert token.status.token not in json.dumps(report)


# --- faults ----------------------------------------------------------------------------------------


async def test_webhook_scaled_to_zero(cluster: Cluster, api: client.ApiClient) -> None:
    await server_side_apply(api, _endpoint_slice([]))
    try:
        code, report = run_check(cluster)
        assert code == 1
        ep = by_name(report, "Service outrider-webhook has ready endpoints")
        assert ep["status"] == "fail" and "0 ready" in ep["message"] and "scale" in ep["hint"]
    finally:
        await server_side_apply(api, _endpoint_slice([True, True]))
    await server_side_apply(api, _endpoint_slice([True, False]))
    try:
        code, report = run_check(cluster)
        assert code == 0 and by_name(report, "Service outrider-webhook")["status"] == "warn"
    finally:
        await server_side_apply(api, _endpoint_slice([True, True]))


async def _mwc_bundle(api: client.ApiClient, bundle: str) -> None:
    adm = client.AdmissionregistrationV1Api(api)
    mwc = await adm.read_mutating_webhook_configuration("outrider")
    ops = [
        {"op": "replace", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle}
        for i in range(len(mwc.webhooks))
    ]
    await adm.patch_mutating_webhook_configuration("outrider", ops)


async def test_wrong_ca_bundle(cluster: Cluster, api: client.ApiClient) -> None:
    adm = client.AdmissionregistrationV1Api(api)
    original = (await adm.read_mutating_webhook_configuration("outrider")).webhooks[0].client_config.ca_bundle
    other = make_ca("some-other-ca")[0].public_bytes(serialization.Encoding.PEM)
    await _mwc_bundle(api, base64.b64encode(other).decode())
    try:
        code, report = run_check(cluster)
        assert code == 1
        bundle = by_name(report, "caBundle trusts the serving certificate")
        assert bundle["status"] == "fail" and "inject.outrider.dev" in bundle["message"]
        # and the consequence, seen for real: the apiserver cannot call the webhook
        assert by_name(report, "a dry-run pod")["status"] == "fail"
    finally:
        await _mwc_bundle(api, original)


async def test_expired_certificate(cluster: Cluster, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    secret = await v1.read_namespaced_secret("outrider-webhook-certs", NS)
    original = dict(secret.data)
    ca = x509.load_pem_x509_certificate(base64.b64decode(original["ca.crt"]))
    ca_key = serialization.load_pem_private_key(base64.b64decode(original["ca.key"]), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    expired = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "outrider-webhook")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    await v1.patch_namespaced_secret(
        "outrider-webhook-certs",
        NS,
        {"data": {"tls.crt": base64.b64encode(expired.public_bytes(serialization.Encoding.PEM)).decode()}},
    )
    try:
        code, report = run_check(cluster)
        assert code == 1
        validity = by_name(report, "serving certificate is valid now")
        assert validity["status"] == "fail" and "expired" in validity["message"]
        assert "outrider.dev/rotate" in validity["hint"]
        # still signed by the bundled CA: that check passes, only expiry fails
        assert by_name(report, "caBundle trusts")["status"] == "pass"
    finally:
        await v1.patch_namespaced_secret("outrider-webhook-certs", NS, {"data": original})


async def test_missing_csi_driver(cluster: Cluster, api: client.ApiClient) -> None:
    storage = client.StorageV1Api(api)
    driver = api.sanitize_for_serialization(await storage.read_csi_driver("csi.spiffe.io"))
    await storage.delete_csi_driver("csi.spiffe.io")
    try:
        for args in ((), ("--pre",)):
            code, report = run_check(cluster, *args)
            assert code == 1, args
            csi = by_name(report, "SPIFFE CSI driver is registered")
            assert csi["status"] == "fail" and "spiffe-csi" in csi["hint"]
    finally:
        driver["metadata"] = {"name": "csi.spiffe.io"}
        await storage.create_csi_driver(driver)


async def test_bad_config_map(cluster: Cluster, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    original = (await v1.read_namespaced_config_map("outrider-webhook", NS)).data
    await v1.patch_namespaced_config_map(
        "outrider-webhook", NS, {"data": {"config.yaml": original["config.yaml"] + "native_sidecar: maybe\n"}}
    )
    try:
        code, report = run_check(cluster)
        assert code == 1
        cm = by_name(report, "ConfigMap outrider-webhook parses")
        assert cm["status"] == "fail" and "native_sidecar" in cm["message"]
        assert by_name(report, "pods run the current configuration")["status"] == "warn"
    finally:
        await v1.patch_namespaced_config_map("outrider-webhook", NS, {"data": original})


async def test_stale_pods_listed_with_the_restart_command(cluster: Cluster, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    original = (await v1.read_namespaced_config_map("outrider-webhook", NS)).data
    changed = original["config.yaml"].replace("outrider:0.1.0", "outrider:0.1.1")
    assert changed != original["config.yaml"]
    await v1.patch_namespaced_config_map("outrider-webhook", NS, {"data": {"config.yaml": changed}})
    try:
        code, report = run_check(cluster)
        assert code == 0, report  # stale pods are a warning
        stale = by_name(report, "pods run the current configuration")
        assert stale["status"] == "warn"
        assert f"{APPS}/web-7d9f8b6c5d-abcde" in stale["details"]
        assert f"kubectl -n {APPS} rollout restart deployment/web" in stale["details"]
    finally:
        await v1.patch_namespaced_config_map("outrider-webhook", NS, {"data": original})


async def test_escaped_pods_and_namespace_egress_mode(cluster: Cluster, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    ns = await make_namespace(api, "check-late")  # pod created before the label: not injected
    await v1.create_namespaced_pod(ns, pod_body("early", annotations=MCP))
    await v1.patch_namespace(
        ns,
        {
            "metadata": {
                "labels": {"outrider.dev/inject": "enabled", "pod-security.kubernetes.io/enforce": "baseline"}
            }
        },
    )
    try:
        code, report = run_check(cluster)
        assert code == 0, report
        escaped = by_name(report, "pods in opted-in namespaces are injected")
        assert escaped["status"] == "warn" and f"{ns}/early" in escaped["details"]
        assert f"kubectl -n {ns} delete pod early" in " ".join(escaped["details"])
        mode = by_name(report, f"namespace {ns}")
        assert "Pod Security baseline" in mode["message"] and "egress mode explicit" in mode["message"]
    finally:
        await v1.delete_namespace(ns)
        # namespace deletion needs the (absent) namespace controller: drop the label so check ignores it
        await v1.patch_namespace(ns, {"metadata": {"labels": {"outrider.dev/inject": None}}})


async def test_proxy_not_ready_reports_readyz(cluster: Cluster, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    pod = await v1.create_namespaced_pod(APPS, pod_body("notready", annotations=MCP))
    proxy_in_init = any(c.name == "outrider-proxy" for c in pod.spec.init_containers or [])
    status = {
        "name": "outrider-proxy",
        "ready": False,
        "restartCount": 0,
        "image": "x",
        "imageID": "",
        "started": True,
        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
    }
    app = {
        "name": "mcp",
        "ready": True,
        "restartCount": 0,
        "image": "x",
        "imageID": "",
        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
    }
    body = {"status": {"phase": "Running", "containerStatuses": [app] + ([] if proxy_in_init else [status])}}
    if proxy_in_init:
        init = {
            "name": "outrider-init",
            "ready": False,
            "restartCount": 0,
            "image": "x",
            "imageID": "",
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
        }
        body["status"]["initContainerStatuses"] = [init, status]
    await v1.patch_namespaced_pod_status("notready", APPS, body)
    try:
        code, report = run_check(cluster)
        assert code == 1, report
        ready = by_name(report, "outrider-proxy containers are ready")
        assert ready["status"] == "fail"
        (detail,) = [d for d in ready["details"] if d.startswith(f"{APPS}/notready")]
        assert "/readyz not reachable" in detail  # no kubelet here: the apiserver's pod proxy says why
    finally:
        await v1.delete_namespaced_pod("notready", APPS, grace_period_seconds=0)
