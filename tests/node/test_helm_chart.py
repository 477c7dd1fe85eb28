"""charts/outrider installed, upgraded and uninstalled with the real `helm` on the real one-node cluster.

tests/controlplane/test_chart_e2e.py proves the chart renders manifests/base and installs against a
kube-apiserver without a kubelet; here its webhook runs as pods and admits real ones. The release has
a name and a namespace of its own (not the README's `outrider`/`outrider-system`), so `outrider check`
must find the webhook through its MutatingWebhookConfiguration. Values are set only through the
chart's documented values (image.repository, image.tag, config, resources); images are the ones
`make images` loads; certificates are self-managed.

1. `helm install --wait`: an opted-in namespace's MCP server gets outrider-init + outrider-proxy, is
   Ready, its proxy's SVID is the SPIFFE ID of `outrider.dev/status`, alice's call through the Service
   reaches the server with an exchanged token, `outrider check` passes with no flag.
2. `helm upgrade` changing `config` (a new egress destination: a new configuration hash) and
   `resources` (the webhook Deployment rolls): pods created while it rolls are all admitted and
   injected (failurePolicy Fail, maxUnavailable 0, a graceful drain: none fails closed), `check`
   names the running MCP pod as stale with the restart command, and that command refreshes it.
3. `helm uninstall`: every object of the release's manifest is gone (read back through the API
   server), the only objects left are the ones the chart README documents (the namespace the operator
   created, and the webhook's own certificate Secret); the injected pod keeps running, and a new pod
   in the opted-in namespace is no longer injected.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import Images, Names, idp_objects, proxy_svid, rollout, status_of
from tests.cluster.kube import Kube, eventually
from tests.node.conftest import REPO, Node
from tests.node.verify import (
    alice_calls_whoami,
    check_result,
    live_pods,
    node_images,
    not_passing,
    outrider_check,
    start_client,
)

pytestmark = [pytest.mark.node, pytest.mark.root, pytest.mark.slow]

CHART = REPO / "charts" / "outrider"
RELEASE = "edge"  # not the README's `outrider`: nothing may depend on the release name
APP = "weather"
AUDIENCE = "https://api.example.com"
TEST_LABEL = "outrider-node-test"  # on every namespace this module creates, so a dead run's are found
WEBHOOK_SELECTOR = "app.kubernetes.io/name=outrider-webhook"


def config_yaml(images: Images, idp_url: str, allow: str) -> str:
    """The webhook's configuration (the chart's `config` value), as docs/install.md writes it."""
    return f"""\
sidecar_image: {images.sidecar}
trust_domain: cluster.local
resource_template: "https://{{app}}.{{namespace}}.mcp.example.com/mcp"
resource_patterns: ["https://*.{{namespace}}.mcp.example.com/mcp"]
token_audiences: [{AUDIENCE}]
default_audience: {AUDIENCE}
egress_default_policy:
  allow: [{allow}]
sidecar:
  inbound:
    issuer: {idp_url}
  exchange:
    token_endpoint: {idp_url}/token
    issuer: {idp_url}
    auth: jwt-svid
  telemetry:
    audit: stdout
"""


def mcp_server(namespace: str, image: str) -> list[dict[str, Any]]:
    """docs/install.md's example MCP server, unchanged but for its namespace and image."""
    labels = {"app.kubernetes.io/name": APP}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": APP, "namespace": namespace}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": APP, "namespace": namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels, "annotations": {"outrider.dev/mcp-port": "mcp"}},
                    "spec": {
                        "serviceAccountName": APP,
                        "terminationGracePeriodSeconds": 5,
                        "containers": [
                            {
                                "name": "mcp",
                                "image": image,
                                "env": [{"name": "PORT", "value": "8080"}],
                                "ports": [{"name": "mcp", "containerPort": 8080}],
                                "readinessProbe": {"tcpSocket": {"port": "mcp"}, "periodSeconds": 2},
                            }
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": APP, "namespace": namespace},
            "spec": {"selector": labels, "ports": [{"name": "mcp", "port": 8080, "targetPort": "mcp"}]},
        },
    ]


def probe_pod(namespace: str, image: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": name}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": image, "command": ["sleep", "1000000"]}],
        },
    }


@dataclass
class Release:
    kube: Kube
    helm: str
    env: dict[str, str]
    workdir: Path
    names: Names
    images: Images
    namespace: str  # the release namespace
    apps: str  # the opted-in namespace of the MCP server
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def helm_ok(self, *args: str, what: str) -> str:
        t0 = time.monotonic()
        out = self.run(self.helm, *args)
        self.seconds[what] = time.monotonic() - t0
        assert out.returncode == 0, (
            f"helm {' '.join(args[:3])} failed (exit {out.returncode}):\n{out.stderr[-3000:]}"
        )
        print(f"[helm] {what}: {self.seconds[what]:.1f} s")
        return out.stdout

    def check(self, *args: str) -> tuple[int, dict[str, Any]]:
        return outrider_check(self.env, self.workdir, *args)

    def app_pod(self) -> dict[str, Any]:
        (pod,) = live_pods(self.kube, self.apps, f"app.kubernetes.io/name={APP}")
        return pod


def _helm_binary() -> str:
    out = subprocess.run(
        [str(REPO / "scripts" / "build-upstream.sh"), "helm"], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        pytest.fail(f"helm could not be built (scripts/build-upstream.sh helm):\n{out.stderr[-1500:]}")
    return str(Path(out.stdout.strip().splitlines()[-1]) / "helm")


def _cleanup(kube: Kube, helm: str, env: dict[str, str], idp_ns: str | None) -> None:
    """Remove what this module installs (and what a run that died half-way left behind)."""
    listed = subprocess.run(
        [helm, "list", "-A", "-o", "json"], env=env, capture_output=True, text=True, check=False, timeout=120
    )
    for rel in json.loads(listed.stdout or "[]") if listed.returncode == 0 else []:
        if rel.get("name") == RELEASE and str(rel.get("chart", "")).startswith("outrider-"):
            subprocess.run(
                [helm, "uninstall", RELEASE, "-n", rel["namespace"], "--wait", "--timeout=3m"],
                env=env,
                capture_output=True,
                check=False,
                timeout=240,
            )
    stale = kube.run("get", "namespaces", "-l", TEST_LABEL, "-o", "name", check=False).stdout.split()
    for ns in [s.removeprefix("namespace/") for s in stale] + ([idp_ns] if idp_ns else []):
        kube.delete_namespace(ns)
    kube.run("delete", "clusterspiffeid", "-l", TEST_LABEL, "--ignore-not-found", check=False)
    # the chart's cluster-scoped names are fixed (one install per cluster): no other install may remain
    kube.run("delete", "-k", str(REPO / "manifests" / "base"), "--ignore-not-found", check=False, timeout=300)
    for ns in [s.removeprefix("namespace/") for s in stale] + ([idp_ns] if idp_ns else []):
        kube.run("wait", "--for=delete", f"namespace/{ns}", "--timeout=180s", check=False, timeout=200)


def _labelled(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for o in objs:
        if o["kind"] in ("Namespace", "ClusterSPIFFEID"):
            o["metadata"].setdefault("labels", {})[TEST_LABEL] = "helm"
    return objs


@pytest.fixture(scope="module")
def release(node: Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    kube = Kube(node.kubectl, str(node.cfg.kubeconfig))
    names = Names(run=f"helm{secrets.token_hex(2)}")
    workdir = tmp_path_factory.mktemp("helm-chart")
    env = {
        **os.environ,
        "PATH": os.pathsep.join(
            [str(Path(node.kubectl).parent), str(REPO / ".venv" / "bin"), os.environ.get("PATH", "")]
        ),
        "KUBECONFIG": str(node.cfg.kubeconfig),
        "HELM_CACHE_HOME": str(workdir / "helm-cache"),
        "HELM_CONFIG_HOME": str(workdir / "helm-config"),
        "HELM_DATA_HOME": str(workdir / "helm-data"),
    }
    helm = _helm_binary()
    _cleanup(kube, helm, env, None)
    rel = Release(kube, helm, env, workdir, names, node_images(), names.ns("gate"), names.ns("tools"))
    try:
        t0 = time.monotonic()
        built = rel.run("make", "-C", str(REPO), "images", timeout=3600)
        assert built.returncode == 0, f"make images failed:\n{built.stderr[-3000:]}"
        rel.seconds["make images"] = time.monotonic() - t0
        # docs/install.md step 2: register the sidecars
        kube.apply(
            _labelled([yaml.safe_load((REPO / "manifests/examples/spire-clusterspiffeid.yaml").read_text())])
        )
        t0 = time.monotonic()
        spiffe_id = f"spiffe://cluster.local/ns/{rel.apps}/sa/{APP}"
        kube.apply(
            _labelled(
                [
                    o
                    for o in idp_objects(names, rel.images, [spiffe_id], AUDIENCE)
                    if o["metadata"]["name"] != "otlp"
                ]
            )
        )
        rollout(kube, names.idp, "idp")
        rel.seconds["idp"] = time.monotonic() - t0
        # the chart README: the release namespace exists first, with the restricted Pod Security labels
        kube.run("create", "namespace", rel.namespace)
        kube.run(
            "label",
            "namespace",
            rel.namespace,
            f"{TEST_LABEL}=helm",
            "app.kubernetes.io/part-of=outrider",
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        )
        (workdir / "config.yaml").write_text(config_yaml(rel.images, names.idp_url, "api.example.com:443"))
        repo, tag = rel.images.webhook.rsplit(":", 1)
        rel.helm_ok(
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            rel.namespace,
            "--wait",
            "--timeout=5m",
            "--set",
            f"image.repository={repo}",
            "--set",
            f"image.tag={tag}",
            "--set-file",
            "config=config.yaml",
            what="helm install --wait",
        )
        yield rel
    finally:
        print("[helm] seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in rel.seconds.items()))
        if os.environ.get("OUTRIDER_HELM_KEEP") != "1":
            _cleanup(kube, helm, env, names.idp)


def test_1_helm_install_injects_a_pod_that_serves_an_authenticated_call(release: Release) -> None:
    kube = release.kube
    status = json.loads(
        release.helm_ok("status", RELEASE, "-n", release.namespace, "-o", "json", what="status")
    )
    assert status["info"]["status"] == "deployed" and status["version"] == 1, status["info"]
    mwc = kube.get("mutatingwebhookconfiguration", "outrider") or {}
    assert {h["clientConfig"]["service"]["namespace"] for h in mwc["webhooks"]} == {release.namespace}
    assert all(h["clientConfig"].get("caBundle") for h in mwc["webhooks"]), (
        "the webhook did not publish its CA"
    )

    t0 = time.monotonic()
    kube.apply(
        _labelled(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": release.apps, "labels": {"outrider.dev/inject": "enabled"}},
                }
            ]
        )
    )
    kube.apply(mcp_server(release.apps, release.images.mcp))
    out = kube.run(
        "-n", release.apps, "rollout", "status", f"deploy/{APP}", "--timeout=5m", check=False, timeout=330
    )
    assert out.returncode == 0, (
        f"{APP} did not become available:\n{out.stderr}\n"
        + kube.text("describe", "pods", "-n", release.apps)[-5000:]
    )
    release.seconds["deploy the MCP server"] = time.monotonic() - t0
    pod = release.app_pod()
    inits = [c["name"] for c in pod["spec"]["initContainers"]]
    assert inits[:2] == ["outrider-init", "outrider-proxy"], inits
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}.get("Ready") == "True", pod["status"]
    expected = f"spiffe://cluster.local/ns/{release.apps}/sa/{APP}"
    assert status_of(pod)["spiffeId"] == expected, status_of(pod)
    svid = proxy_svid(kube, release.apps, pod["metadata"]["name"])
    assert svid == {"id": expected, "uris": [expected]}, f"the proxy's SVID is {svid}, status says {expected}"

    client = start_client(kube, release.names.client, release.images)
    kube.run("label", "namespace", release.names.client, f"{TEST_LABEL}=helm", "--overwrite")
    alice_calls_whoami(
        kube,
        client,
        release.names,
        f"http://{APP}.{release.apps}.svc.cluster.local:8080/mcp",
        f"https://{APP}.{release.apps}.mcp.example.com/mcp",
        AUDIENCE,
        actor=expected,
    )

    # check without a flag follows the MutatingWebhookConfiguration to the release's namespace
    t0 = time.monotonic()
    code, report = release.check()
    release.seconds["outrider check"] = time.monotonic() - t0
    assert code == 0 and report["success"], not_passing(report)
    assert not_passing(report) == [], "a healthy helm install should pass every check"
    secret = check_result(report, "serving certificate Secret exists")
    assert secret["message"] == f"{release.namespace}/outrider-webhook-certs", secret
    # ... and only because it followed it: the default namespace holds no webhook
    code, report = release.check("--namespace", "outrider-system")
    assert code == 1 and check_result(report, "serving certificate Secret exists")["status"] == "fail", report


def _admit(kube: Kube, namespace: str, image: str, name: str) -> tuple[str, str]:
    """A server-side dry-run pod create (admission runs, nothing is stored): ("injected", config hash),
    ("plain", "") when admitted without the sidecar, or ("refused", the apiserver's message)."""
    out = kube.run(
        "create",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        "-",
        stdin=json.dumps(probe_pod(namespace, image, name)),
        check=False,
        timeout=60,
    )
    if out.returncode != 0:
        return "refused", out.stderr.strip()[-500:]
    pod = json.loads(out.stdout)
    raw = pod["metadata"].get("annotations", {}).get("outrider.dev/status")
    if not raw:
        return "plain", ""
    return "injected", str(json.loads(raw)["configHash"])


def test_2_helm_upgrade_rolls_the_webhook_without_a_failed_admission_and_check_names_stale_pods(
    release: Release,
) -> None:
    kube = release.kube
    pod = release.app_pod()
    old_hash = status_of(pod)["configHash"]
    old_webhooks = {p["metadata"]["name"] for p in live_pods(kube, release.namespace, WEBHOOK_SELECTOR)}
    assert len(old_webhooks) == 2, old_webhooks

    # pods created while the upgrade rolls the webhook: every one must be admitted and injected
    results: list[tuple[float, str, str]] = []
    stop = threading.Event()

    def admit_while_rolling() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            kind, detail = _admit(kube, release.apps, release.images.mcp, f"during-upgrade-{i}")
            results.append((time.monotonic(), kind, detail))
            time.sleep(0.2)

    (release.workdir / "config.yaml").write_text(
        config_yaml(release.images, release.names.idp_url, "api.example.com:443, tools.example.com:443")
    )
    repo, tag = release.images.webhook.rsplit(":", 1)
    prober = threading.Thread(target=admit_while_rolling, daemon=True)
    prober.start()
    try:
        release.helm_ok(
            "upgrade",
            RELEASE,
            str(CHART),
            "--namespace",
            release.namespace,
            "--wait",
            "--timeout=5m",
            "--set",
            f"image.repository={repo}",
            "--set",
            f"image.tag={tag}",
            "--set-file",
            "config=config.yaml",
            "--set",
            "resources.limits.memory=320Mi",  # a Deployment change: the webhook pods roll
            what="helm upgrade --wait",
        )
        # until the replaced replicas are gone, not only unready: admissions may still reach them
        eventually(
            lambda: (
                not old_webhooks
                & {p["metadata"]["name"] for p in kube.pods(release.namespace, WEBHOOK_SELECTOR)}
                or None
            ),
            "the old webhook pods to be gone",
            within=180,
            every=1,
        )
        time.sleep(3)
    finally:
        stop.set()
        prober.join(timeout=90)

    new_webhooks = {p["metadata"]["name"] for p in live_pods(kube, release.namespace, WEBHOOK_SELECTOR)}
    assert new_webhooks and not new_webhooks & old_webhooks, "the upgrade did not roll the webhook"
    kinds = [k for _, k, _ in results]
    print(
        f"[helm] admissions during the upgrade: {len(results)} ({ {k: kinds.count(k) for k in set(kinds)} })"
    )
    assert len(results) >= 5, f"too few admissions while the webhook rolled to say anything: {results}"
    bad = [r for r in results if r[1] != "injected"]
    assert not bad, f"pods created while the webhook rolled were refused or not injected: {bad}"
    new_hash = _admit(kube, release.apps, release.images.mcp, "after-upgrade")
    assert new_hash[0] == "injected" and new_hash[1] != old_hash, (new_hash, old_hash)
    assert {d for _, _, d in results} <= {old_hash, new_hash[1]}, "an admission used neither configuration"

    code, report = release.check()
    stale = check_result(report, "pods run the current configuration")
    assert stale["status"] == "warn", stale
    assert f"{release.apps}/{pod['metadata']['name']}" in stale["details"], stale
    restart = f"kubectl -n {release.apps} rollout restart deployment/{APP}"
    assert restart in stale["details"], stale

    out = release.run(*restart.split())
    assert out.returncode == 0, out.stderr
    out = kube.run(
        "-n", release.apps, "rollout", "status", f"deploy/{APP}", "--timeout=5m", check=False, timeout=330
    )
    assert out.returncode == 0, out.stderr

    def one_fresh_pod() -> dict[str, Any] | None:
        pods = live_pods(kube, release.apps, f"app.kubernetes.io/name={APP}")
        return pods[0] if len(pods) == 1 and pods[0]["metadata"]["name"] != pod["metadata"]["name"] else None

    fresh = eventually(one_fresh_pod, "one live MCP pod after the restart", within=120, every=2)
    assert fresh["metadata"]["name"] != pod["metadata"]["name"]
    assert status_of(fresh)["configHash"] == new_hash[1], status_of(fresh)
    kube.run(
        "-n",
        release.apps,
        "wait",
        "--for=delete",
        f"pod/{pod['metadata']['name']}",
        "--timeout=120s",
        timeout=150,
    )
    code, report = release.check()
    assert code == 0 and not_passing(report) == [], not_passing(report)


def _manifest_objects(manifest: str) -> list[tuple[str, str, str, str]]:
    """(apiVersion, kind, namespace, name) of each object in `helm get manifest`."""
    out = []
    for doc in yaml.safe_load_all(manifest):
        if doc:
            meta = doc["metadata"]
            out.append((doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"]))
    return out


def test_3_helm_uninstall_removes_every_object_and_stops_injection(release: Release) -> None:
    kube = release.kube
    objects = _manifest_objects(
        release.helm_ok("get", "manifest", RELEASE, "-n", release.namespace, what="get manifest")
    )
    kinds = {k for _, k, _, _ in objects}
    assert {"MutatingWebhookConfiguration", "Service", "Deployment", "ConfigMap", "ServiceAccount"} <= kinds
    assert {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "PodDisruptionBudget"} <= kinds
    pod = release.app_pod()

    release.helm_ok(
        "uninstall", RELEASE, "-n", release.namespace, "--wait", "--timeout=3m", what="helm uninstall"
    )

    for api_version, kind, ns, name in objects:
        where = ["-n", ns] if ns else []
        resource = f"{kind}.{api_version.split('/')[0]}" if "/" in api_version else kind
        out = kube.run("get", resource, name, *where, "--ignore-not-found", "-o", "name", check=False)
        assert out.returncode == 0 and not out.stdout.strip(), f"{kind} {ns}/{name} outlived helm uninstall"
    # nothing of the release in its namespace but what the chart README says stays
    kinds_in_ns = ",".join(
        (
            "deployments.apps",
            "replicasets.apps",
            "pods",
            "services",
            "endpointslices.discovery.k8s.io",
            "configmaps",
            "secrets",
            "serviceaccounts",
            "roles.rbac.authorization.k8s.io",
            "rolebindings.rbac.authorization.k8s.io",
            "poddisruptionbudgets.policy",
            "leases.coordination.k8s.io",
        )
    )
    left: list[str] = []

    def only_documented_left() -> bool:
        listed = kube.text("get", kinds_in_ns, "-n", release.namespace, "-o", "name").split()
        left[:] = [n for n in listed if n not in DOCUMENTED_LEFTOVERS]
        return not left

    try:
        eventually(only_documented_left, "only the documented objects left", within=120, every=2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: helm uninstall left {left} in {release.namespace}") from None
    assert kube.get("mutatingwebhookconfiguration", "outrider") is None
    assert kube.get("clusterrole", "outrider-webhook") is None

    # the injected pod keeps running with its sidecar; a new pod is admitted without one
    after = kube.json("get", "pod", pod["metadata"]["name"], "-n", release.apps)
    assert after["status"]["phase"] == "Running" and not after["metadata"].get("deletionTimestamp")
    assert {c["type"]: c["status"] for c in after["status"]["conditions"]}.get("Ready") == "True"
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]
    assert _admit(kube, release.apps, release.images.mcp, "after-uninstall") == ("plain", "")
    code, report = release.check()
    assert (
        code == 1 and check_result(report, "MutatingWebhookConfiguration outrider exists")["status"] == "fail"
    )


# kept by `helm uninstall` on purpose (charts/outrider/README.md): the webhook, not Helm, creates its
# certificate Secret; the operator's namespace and the default ServiceAccount/ConfigMap Kubernetes puts
# in every namespace. The replicas' Leases are not here: their pods own them (POD_UID), so the garbage
# collector removes them even though the Role that would let a stopping replica do it is gone first.
DOCUMENTED_LEFTOVERS = {
    "secret/outrider-webhook-certs",
    "serviceaccount/default",
    "configmap/kube-root-ca.crt",
}
