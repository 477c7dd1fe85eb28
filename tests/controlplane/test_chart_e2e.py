"""charts/outrider: renders what manifests/ applies (object by object), lints clean, installs for real.

helm comes from `scripts/build-upstream.sh helm` (helm.sh/helm/v3 built from the Go module proxy,
cached by version). Install/upgrade/uninstall run against a control plane of this module's own: the
chart's cluster-scoped objects have fixed names that other modules' tests also create.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from .harness import ControlPlane
from .kubeutil import MANIFESTS, REPO, server_side_apply
from .kustomize import render
from .test_manifests_e2e import _crd

CHART = REPO / "charts" / "outrider"
NS = "outrider-system"


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run(
        [str(REPO / "scripts" / "build-upstream.sh"), "helm"], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        if os.environ.get("CI"):  # make test builds helm first (build-upstream.sh all): here it must exist
            pytest.fail(f"helm could not be built (scripts/build-upstream.sh helm):\n{out.stderr[-1500:]}")
        pytest.skip(f"helm could not be built (scripts/build-upstream.sh helm):\n{out.stderr[-1500:]}")
    return str(Path(out.stdout.strip().splitlines()[-1]) / "helm")


def template(helm: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [helm, "template", "outrider", str(CHART), "--namespace", NS, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def _by_key(objs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    out = {_key(o): o for o in objs}
    assert len(out) == len(objs), "duplicate objects"
    return out


@pytest.mark.parametrize(
    ("args", "target"),
    [((), "base"), (("--set", "certificates.mode=cert-manager"), "overlays/cert-manager")],
)
def test_chart_renders_the_same_objects_as_kustomize(helm: str, args: tuple[str, ...], target: str) -> None:
    chart = _by_key(template(helm, "--set", "namespace.create=true", *args))
    manifests = _by_key(render(MANIFESTS / target))
    assert sorted(chart) == sorted(manifests)
    for key, obj in manifests.items():
        assert chart[key] == obj, f"{key} differs between charts/outrider and manifests/{target}"


def test_values_change_what_they_name(helm: str) -> None:
    objs = _by_key(
        template(
            helm,
            "--set",
            "replicas=3",
            "--set",
            "image.repository=registry.example/outrider-webhook",
            "--set",
            "image.tag=9.9.9",
            "--set",
            "resources.limits.memory=512Mi",
            "--set",
            "webhook.failurePolicy=Ignore",
            "--set",
            "webhook.excludeNamespaces={kube-system,monitoring}",
            "--set-json",
            'webhook.extraNamespaceSelectorExpressions=[{"key":"team","operator":"Exists"}]',
            "--set-json",
            'certificates.certManager.issuerRef={"kind":"ClusterIssuer","name":"corp-ca"}',
            "--set",
            "certificates.mode=cert-manager",
        )
    )
    deploy = objs[("Deployment", NS, "outrider-webhook")]
    assert deploy["spec"]["replicas"] == 3
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/outrider-webhook:9.9.9"
    assert container["resources"]["limits"]["memory"] == "512Mi"
    mwc = objs[("MutatingWebhookConfiguration", "", "outrider")]
    inject, strict = mwc["webhooks"]
    assert inject["failurePolicy"] == "Ignore" and strict["failurePolicy"] == "Fail"
    exprs = inject["namespaceSelector"]["matchExpressions"]
    assert {
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": ["kube-system", "monitoring", NS],
    } in exprs
    assert {"key": "team", "operator": "Exists"} in exprs
    assert ("Namespace", "", NS) not in objs  # the default
    assert ("Issuer", NS, "outrider-selfsigned") not in objs
    assert objs[("Certificate", NS, "outrider-webhook")]["spec"]["issuerRef"] == {
        "kind": "ClusterIssuer",
        "name": "corp-ca",
    }


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("certificates.mode=vault", "/certificates/mode"),
        ("webhook.failurePolicy=Maybe", "failurePolicy"),
        ("replicaz=2", "replicaz"),
    ],
)
def test_bad_values_are_refused_with_their_name(helm: str, value: str, says: str) -> None:
    out = subprocess.run(
        [helm, "template", "outrider", str(CHART), "--namespace", NS, "--set", value],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0 and says in out.stderr, out.stderr


def test_helm_lint_is_clean(helm: str) -> None:
    for args in ((), ("--set", "certificates.mode=cert-manager")):
        out = subprocess.run(
            [helm, "lint", "--strict", str(CHART), *args], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "0 chart(s) failed" in out.stdout


def test_chart_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()

    def leaves(doc: Any, prefix: str = "") -> Iterator[str]:
        if (
            isinstance(doc, dict)
            and doc
            and prefix not in ("resources.", "certificates.certManager.issuerRef.")
        ):
            for k, v in doc.items():
                yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix.rstrip(".")

    for name in leaves(yaml.safe_load((CHART / "values.yaml").read_text())):
        assert f"`{name}`" in readme, f"charts/outrider/README.md does not document {name}"


# --- against a real kube-apiserver -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    cp = ControlPlane.start(tmp_path_factory.mktemp("chart") / "cp")
    try:
        yield cp
    finally:
        cp.stop()


def _helm(helm: str, cp: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, "--kubeconfig", str(cp.kubeconfig), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


async def _read(cp: ControlPlane, namespace: str = NS) -> tuple[Any, Any]:
    api = await config.new_client_from_config(config_file=str(cp.kubeconfig))
    try:
        deploy = await client.AppsV1Api(api).read_namespaced_deployment("outrider-webhook", namespace)
        mwc = await client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration("outrider")
        return deploy, mwc
    finally:
        await api.close()


async def _gone(cp: ControlPlane) -> bool:
    api = await config.new_client_from_config(config_file=str(cp.kubeconfig))
    try:
        await client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration("outrider")
    except ApiException as exc:
        return exc.status == 404
    finally:
        await api.close()
    return False


def test_install_upgrade_uninstall(helm: str, cluster: ControlPlane) -> None:
    out = _helm(helm, cluster, "install", "outrider", str(CHART), "--namespace", NS, "--create-namespace")
    assert out.returncode == 0, out.stderr
    deploy, mwc = asyncio.run(_read(cluster))
    assert deploy.spec.replicas == 2 and len(mwc.webhooks) == 2
    out = _helm(helm, cluster, "upgrade", "outrider", str(CHART), "--namespace", NS, "--set", "replicas=4")
    assert out.returncode == 0, out.stderr
    deploy, _ = asyncio.run(_read(cluster))
    assert deploy.spec.replicas == 4
    status = json.loads(_helm(helm, cluster, "status", "outrider", "--namespace", NS, "-o", "json").stdout)
    assert status["version"] == 2 and status["info"]["status"] == "deployed"
    out = _helm(helm, cluster, "uninstall", "outrider", "--namespace", NS)
    assert out.returncode == 0, out.stderr
    assert asyncio.run(_gone(cluster))


def test_cert_manager_mode_installs_with_its_crds(helm: str, cluster: ControlPlane) -> None:
    async def crds() -> None:
        api = await config.new_client_from_config(config_file=str(cluster.kubeconfig))
        try:
            for crd in (
                ("cert-manager.io", "v1", "Issuer", "issuers", "Namespaced"),
                ("cert-manager.io", "v1", "Certificate", "certificates", "Namespaced"),
            ):
                await server_side_apply(api, _crd(*crd))
        finally:
            await api.close()

    asyncio.run(crds())
    ns = "outrider-cm-system"
    for _ in range(50):  # the CRDs become served within moments
        out = _helm(
            helm,
            cluster,
            "install",
            "outrider-cm",
            str(CHART),
            "--namespace",
            ns,
            "--create-namespace",
            "--set",
            "certificates.mode=cert-manager",
        )
        if out.returncode == 0 or "no matches for kind" not in out.stderr:
            break
        asyncio.run(asyncio.sleep(0.2))
    assert out.returncode == 0, out.stderr
    deploy, mwc = asyncio.run(_read(cluster, ns))
    assert mwc.metadata.annotations["cert-manager.io/inject-ca-from"] == f"{ns}/outrider-webhook"
    assert "--cert-mode=files" in deploy.spec.template.spec.containers[0].args
    assert _helm(helm, cluster, "uninstall", "outrider-cm", "--namespace", ns).returncode == 0


@pytest.mark.parametrize("mode", ["self-managed", "cert-manager"])
def test_rendered_objects_validate_strictly(helm: str, mode: str) -> None:
    import kubernetes_validate

    objs = template(helm, "--set", "namespace.create=true", "--set", f"certificates.mode={mode}")
    checked = 0
    for obj in objs:
        if obj["apiVersion"].startswith("cert-manager.io/"):
            continue  # a CRD kind: kubernetes-validate has no schema for it
        kubernetes_validate.validate(obj, "1.34", strict=True)
        checked += 1
    assert checked >= 10
