"""Fixtures for the in-cluster tests: a real cluster (the one-node cluster or kind), Outrider installed
from the manifests as the README says, the dev IdP and egress targets as pods, one injected MCP server.

Opt in with OUTRIDER_CLUSTER_E2E=1 (`make node-e2e` and `make kind-e2e` set it): the tests create
namespaces, scale the webhook and edit its ConfigMap, so they never run against a cluster by chance.
KUBECONFIG comes from the environment, else the node's documented path (docs/node.md).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.kube import Kube, KubectlError, eventually, find_kubectl

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "pod_scripts"
NODE_DIR = Path(os.environ.get("OUTRIDER_NODE_DIR", "/var/lib/outrider-node"))
TRUST_DOMAIN = os.environ.get("OUTRIDER_TRUST_DOMAIN", "cluster.local")
CLUSTER_DOMAIN = os.environ.get("OUTRIDER_CLUSTER_DOMAIN", "cluster.local")
OVERLAY = os.environ.get("OUTRIDER_OVERLAY", "manifests/overlays/node")
AUDIENCE = "https://api.e2e.outrider.test"
RESOURCE = "https://mcp.e2e.outrider.test/mcp"
MCP_PORT = 8080
# The Workload API socket inside the SPIFFE CSI volume: `spire-agent.sock` with SPIRE's Helm charts and
# on the one-node cluster alike, Outrider's default, so the run sets no identity.socket.
AGENT_SOCKET = "/spiffe-workload-api/spire-agent.sock"
SYSTEM_NS = "outrider-system"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/cluster/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.cluster)


@dataclass(frozen=True)
class Images:
    sidecar: str
    webhook: str
    mcp: str
    testkit: str  # the sidecar image + the dev IdP/Workload API (the production image has neither)


@dataclass
class Names:
    """One run's namespaces: fresh names, so a run never meets a previous run's leftovers."""

    run: str = field(default_factory=lambda: os.environ.get("OUTRIDER_E2E_RUN") or secrets.token_hex(3))

    def ns(self, what: str) -> str:
        return f"e2e-{self.run}-{what}"

    @property
    def app(self) -> str:
        return self.ns("app")

    @property
    def targets(self) -> str:
        return self.ns("targets")

    @property
    def client(self) -> str:
        return self.ns("client")

    @property
    def idp(self) -> str:
        return self.ns("idp")

    @property
    def explicit(self) -> str:
        return self.ns("explicit")

    @property
    def strict(self) -> str:
        return self.ns("strict")

    @property
    def plain(self) -> str:
        return self.ns("plain")

    def svc(self, name: str, namespace: str) -> str:
        return f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def idp_url(self) -> str:
        return f"http://{self.svc('idp', self.idp)}:8080"

    @property
    def otlp_url(self) -> str:
        return f"http://{self.svc('otlp', self.idp)}:4318"

    def spiffe_id(self, namespace: str, sa: str = "mcp") -> str:
        return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}"


@pytest.fixture(scope="session")
def kube() -> Kube:
    if os.environ.get("OUTRIDER_CLUSTER_E2E") != "1":
        pytest.skip("in-cluster tests run only with OUTRIDER_CLUSTER_E2E=1 (make node-e2e / make kind-e2e)")
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip("no kubectl (set KUBECTL, or build the node: make node)")
    kubeconfig = os.environ.get("KUBECONFIG") or str(NODE_DIR / "kubeconfig")
    if not Path(kubeconfig.split(os.pathsep)[0]).exists():
        pytest.skip(f"no kubeconfig at {kubeconfig} (make node, or export KUBECONFIG)")
    k = Kube(kubectl, kubeconfig)
    try:
        k.run("get", "--raw", "/readyz", timeout=15)
    except (KubectlError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"OUTRIDER_CLUSTER_E2E=1 but the cluster at {kubeconfig} does not answer: {exc}")
    return k


@pytest.fixture(scope="session")
def images() -> Images:
    out = subprocess.run(
        [str(ROOT / "scripts" / "build-images.sh"), "names"], capture_output=True, text=True, check=True
    ).stdout
    names = dict(line.split("=", 1) for line in out.split())
    return Images(
        sidecar=names["sidecar"], webhook=names["webhook"], mcp=names["mcp"], testkit=names["testkit"]
    )


@pytest.fixture(scope="session")
def names() -> Names:
    return Names()


def _namespace(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def ca_bundle(kube: Kube) -> str:
    mwc = kube.get("mutatingwebhookconfiguration", "outrider") or {}
    return str(mwc.get("webhooks", [{}])[0].get("clientConfig", {}).get("caBundle", ""))


def wait_webhook_available(kube: Kube, replicas: int = 2) -> None:
    def ready() -> bool:
        d = kube.get("deployment", "outrider-webhook", SYSTEM_NS) or {}
        return int(d.get("status", {}).get("availableReplicas") or 0) >= replicas

    eventually(ready, f"{replicas} available outrider-webhook replicas", within=240, every=2)


@pytest.fixture(scope="session")
def outrider(kube: Kube, images: Images, names: Names) -> Iterator[dict[str, Any]]:
    """Outrider installed exactly as the README says, then configured for this run in its ConfigMap."""
    if os.environ.get("OUTRIDER_E2E_INSTALL", "1") == "1":
        existed = kube.get("deployment", "outrider-webhook", SYSTEM_NS) is not None
        kube.run("apply", "--server-side", "-k", str(ROOT / OVERLAY), timeout=120)
        kube.run("apply", "--server-side", "-f", str(ROOT / "manifests/examples/spire-clusterspiffeid.yaml"))
        if existed:  # a rebuilt image keeps its tag (the version): running replicas must pick it up
            kube.run("rollout", "restart", "deploy/outrider-webhook", "-n", SYSTEM_NS)
            kube.run(
                "rollout", "status", "deploy/outrider-webhook", "-n", SYSTEM_NS, "--timeout=240s", timeout=260
            )
    wait_webhook_available(kube)
    eventually(lambda: ca_bundle(kube), "the webhook to write its caBundle", within=120, every=2)

    cm = kube.get("configmap", "outrider-webhook", SYSTEM_NS)
    assert cm is not None, "ConfigMap outrider-system/outrider-webhook is missing after the install"
    original = dict(cm["data"])
    base = yaml.safe_load(original["config.yaml"]) or {}
    config = {
        **base,
        "token_audiences": [AUDIENCE],
        "default_audience": AUDIENCE,
        "sidecar": {
            "inbound": {"issuer": names.idp_url, "resource": RESOURCE},
            "exchange": {
                "token_endpoint": f"{names.idp_url}/token",
                "issuer": names.idp_url,
                "auth": "jwt-svid",
                "actor_token": True,
            },
            "telemetry": {"audit": "stdout"},
        },
        # OUTRIDER_E2E_APP_STOP_DELAY=0 measures a rollout without the app's preStop sleep (before/after)
        **(
            {"app_stop_delay_seconds": int(os.environ["OUTRIDER_E2E_APP_STOP_DELAY"])}
            if os.environ.get("OUTRIDER_E2E_APP_STOP_DELAY")
            else {}
        ),
        # spans and metrics to the OTLP receiver beside the IdP, flushed quickly
        "sidecar_env": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": names.otlp_url,
            "OTEL_BSP_SCHEDULE_DELAY": "500",
            "OTEL_METRIC_EXPORT_INTERVAL": "5000",
        },
    }
    allow = {"allow": [f"{names.svc('web', names.targets)}:8080"]}
    egress = {names.app: allow, names.explicit: allow, names.strict: allow}
    data = {"config.yaml": yaml.safe_dump(config), "namespace-egress.yaml": yaml.safe_dump(egress)}
    kube.run(
        "patch",
        "configmap",
        "outrider-webhook",
        "-n",
        SYSTEM_NS,
        "--type=merge",
        "-p",
        json.dumps({"data": data}),
    )
    yield {"config": config, "egress": egress}
    kube.run(
        "patch",
        "configmap",
        "outrider-webhook",
        "-n",
        SYSTEM_NS,
        "--type=merge",
        "-p",
        json.dumps({"data": original}),
        check=False,
    )


def dry_run_pod(kube: Kube, namespace: str, image: str, name: str = "dry-run") -> dict[str, Any]:
    """A pod as the API server would store it (admission included), without creating it."""
    pod = app_pod(name, namespace, image)
    out = kube.run("create", "--dry-run=server", "-o", "json", "-f", "-", stdin=json.dumps(pod))
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def proxy_config(pod: dict[str, Any]) -> dict[str, Any] | None:
    for c in pod["spec"].get("initContainers", []) + pod["spec"].get("containers", []):
        if c["name"] == "outrider-proxy":
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            return json.loads(env.get("OUTRIDER_CONFIG") or "null")  # type: ignore[no-any-return]
    return None


def app_pod(name: str, namespace: str, image: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name, **labels}},
        "spec": mcp_pod_spec(image),
    }


def mcp_pod_spec(image: str, *, strict: bool = False) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "mcp",
        "image": image,
        "imagePullPolicy": "Never",
        "env": [{"name": "PORT", "value": str(MCP_PORT)}],
        "ports": [{"name": "mcp", "containerPort": MCP_PORT}],
        "readinessProbe": {"tcpSocket": {"port": "mcp"}, "periodSeconds": 2},
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "256Mi"}},
    }
    spec: dict[str, Any] = {
        "serviceAccountName": "mcp",
        "containers": [container],
        "terminationGracePeriodSeconds": 5,
    }
    if strict:  # Pod Security `restricted` plus a pinned UID: what `strict` asks of app pods
        container["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    return spec


def mcp_workload(
    namespace: str, image: str, *, name: str = "mcp", replicas: int = 1, strict: bool = False
) -> list[dict[str, Any]]:
    """An unchanged MCP server: ServiceAccount, Deployment (annotated with its MCP port) and Service."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "mcp", "namespace": namespace}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}, "annotations": {"outrider.dev/mcp-port": "mcp"}},
                    "spec": mcp_pod_spec(image, strict=strict),
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "selector": {"app": name},
                "ports": [{"name": "mcp", "port": MCP_PORT, "targetPort": "mcp"}],
            },
        },
    ]


def rollout(kube: Kube, namespace: str, name: str, timeout: int = 240) -> None:
    out = kube.run(
        "rollout",
        "status",
        f"deploy/{name}",
        "-n",
        namespace,
        f"--timeout={timeout}s",
        check=False,
        timeout=timeout + 30,
    )
    if out.returncode != 0:
        describe = kube.run("describe", "pods", "-n", namespace, "-l", f"app={name}", check=False).stdout
        raise AssertionError(
            f"deploy/{name} in {namespace} did not become available:\n{out.stderr}\n{describe[-6000:]}"
        )


def running_pod(kube: Kube, namespace: str, app: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        for pod in kube.pods(namespace, f"app={app}"):
            if pod["metadata"].get("deletionTimestamp"):
                continue
            conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
            if conditions.get("Ready") == "True":
                return pod
        return None

    return eventually(ready, f"a Ready pod app={app} in {namespace}", within=180, every=2)


def idp_objects(
    names: Names, images: Images, spiffe_ids: list[str] | None = None, audience: str = AUDIENCE
) -> list[dict[str, Any]]:
    """The dev IdP (with its own SVID) and an OTLP receiver, in a namespace beside the workloads.

    `spiffe_ids` are the sidecars that may exchange tokens (client `outrider`) for `audience`."""
    ns = names.idp
    clients = ",".join(spiffe_ids or [names.spiffe_id(n) for n in (names.app, names.explicit, names.strict)])
    return [
        _namespace(ns, {}),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "idp", "namespace": ns}},
        {  # the IdP needs an SVID of its own: the Workload API only hands bundles to registered workloads
            "apiVersion": "spire.spiffe.io/v1alpha1",
            "kind": "ClusterSPIFFEID",
            "metadata": {"name": f"{ns}-idp"},
            "spec": {
                "spiffeIDTemplate": "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/idp",
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "podSelector": {"matchLabels": {"app": "idp"}},
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "idp", "namespace": ns},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "idp"}},
                "template": {
                    "metadata": {"labels": {"app": "idp"}},
                    "spec": {
                        "serviceAccountName": "idp",
                        "containers": [
                            {
                                "name": "idp",
                                "image": images.testkit,
                                "imagePullPolicy": "Never",
                                "command": ["python", "-m", "outrider.sidecar.dev.idp"],
                                "args": [
                                    "--host=0.0.0.0",
                                    "--port=8080",
                                    f"--issuer={names.idp_url}",
                                    f"--workload-api=unix://{AGENT_SOCKET}",
                                    "--client=e2e-cli=;public",
                                    f"--client=outrider={clients};audiences={audience}",
                                ],
                                "ports": [{"containerPort": 8080}],
                                "readinessProbe": {
                                    "httpGet": {"path": "/jwks", "port": 8080},
                                    "periodSeconds": 2,
                                },
                                "volumeMounts": [
                                    {"name": "spiffe", "mountPath": "/spiffe-workload-api", "readOnly": True}
                                ],
                            }
                        ],
                        "volumes": [{"name": "spiffe", "csi": {"driver": "csi.spiffe.io", "readOnly": True}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "idp", "namespace": ns},
            "spec": {"selector": {"app": "idp"}, "ports": [{"port": 8080, "targetPort": 8080}]},
        },
        # an OTLP/HTTP receiver beside the IdP: it prints every span it decodes (kubectl logs)
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "otlp", "namespace": ns},
            "data": {"otlp_sink.py": (SCRIPTS / "otlp_sink.py").read_text()},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "otlp", "namespace": ns},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "otlp"}},
                "template": {
                    "metadata": {"labels": {"app": "otlp"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "otlp",
                                "image": images.testkit,
                                "imagePullPolicy": "Never",
                                "command": ["python", "/sink/otlp_sink.py"],
                                "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
                                "readinessProbe": {"tcpSocket": {"port": 4318}, "periodSeconds": 2},
                                "volumeMounts": [{"name": "sink", "mountPath": "/sink"}],
                            }
                        ],
                        "volumes": [{"name": "sink", "configMap": {"name": "otlp"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "otlp", "namespace": ns},
            "spec": {"selector": {"app": "otlp"}, "ports": [{"port": 4318, "targetPort": 4318}]},
        },
    ]


@pytest.fixture(scope="session")
def idp(kube: Kube, images: Images, names: Names, outrider: dict[str, Any]) -> Iterator[str]:
    """The project's dev IdP as a pod beside the workloads; it trusts SPIRE's JWT bundle via its own SVID."""
    ns = names.idp
    kube.apply(idp_objects(names, images))
    rollout(kube, ns, "idp")
    rollout(kube, ns, "otlp")
    yield names.idp_url
    if os.environ.get("OUTRIDER_E2E_KEEP") != "1":
        kube.run("delete", "clusterspiffeid", f"{ns}-idp", "--ignore-not-found", check=False)
        kube.delete_namespace(ns)


def target_objects(names: Names, images: Images) -> list[dict[str, Any]]:
    """Two egress targets (HTTP 8080 + UDP echo 9999): `web` is allowed for the app, `other` is not."""
    ns = names.targets
    script = (SCRIPTS / "targets.py").read_text()
    objects: list[dict[str, Any]] = [
        _namespace(ns, {}),
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "targets", "namespace": ns},
            "data": {"targets.py": script},
        },
    ]
    for name in ("web", "other"):
        objects += [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {
                        "metadata": {"labels": {"app": name}},
                        "spec": {
                            "containers": [
                                {
                                    "name": "target",
                                    "image": images.mcp,
                                    "imagePullPolicy": "Never",
                                    "command": ["python", "/targets/targets.py", name],
                                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 2},
                                    "volumeMounts": [{"name": "targets", "mountPath": "/targets"}],
                                }
                            ],
                            "volumes": [{"name": "targets", "configMap": {"name": "targets"}}],
                        },
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "selector": {"app": name},
                    "ports": [
                        {"name": "http", "port": 8080, "protocol": "TCP"},
                        {"name": "udp", "port": 9999, "protocol": "UDP"},
                    ],
                },
            },
        ]
    return objects


@pytest.fixture(scope="session")
def targets(kube: Kube, images: Images, names: Names) -> Iterator[dict[str, Any]]:
    """Two egress targets (HTTP 8080 + UDP echo 9999): `web` is allowed for the app, `other` is not."""
    ns = names.targets
    kube.apply(target_objects(names, images))
    rollout(kube, ns, "web")
    rollout(kube, ns, "other")
    yield {
        name: {
            "host": names.svc(name, ns),
            "cluster_ip": kube.json("get", "svc", name, "-n", ns)["spec"]["clusterIP"],
            "pod": running_pod(kube, ns, name),
        }
        for name in ("web", "other")
    }
    if os.environ.get("OUTRIDER_E2E_KEEP") != "1":
        kube.delete_namespace(ns)


@pytest.fixture(scope="session")
def client_pod(kube: Kube, images: Images, names: Names) -> Iterator[tuple[str, str]]:
    """A pod outside every opted-in namespace with the MCP SDK, to call Services as a user would."""
    ns = names.client
    kube.apply(
        [
            _namespace(ns, {}),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "client", "namespace": ns, "labels": {"app": "client"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "client",
                            "image": images.mcp,
                            "imagePullPolicy": "Never",
                            "command": ["python", "-c", "import time; time.sleep(10**9)"],
                        }
                    ],
                },
            },
        ]
    )
    kube.run("wait", "-n", ns, "--for=condition=Ready", "pod/client", "--timeout=120s", timeout=150)
    yield ns, "client"
    if os.environ.get("OUTRIDER_E2E_KEEP") != "1":
        kube.delete_namespace(ns)


@pytest.fixture(scope="session")
def app(
    kube: Kube, images: Images, names: Names, outrider: dict[str, Any], idp: str, targets: dict[str, Any]
) -> Iterator[str]:
    """The unchanged MCP server as a Deployment in an `outrider.dev/inject=enabled` namespace."""
    ns = names.app
    kube.apply([_namespace(ns, {"outrider.dev/inject": "enabled"}), mcp_workload(ns, images.mcp)[0]])

    def configured() -> bool:  # both webhook replicas hot-reloaded this run's config
        return all(
            (proxy_config(dry_run_pod(kube, ns, images.mcp)) or {}).get("inbound", {}).get("issuer")
            == names.idp_url
            for _ in range(6)
        )

    eventually(configured, "the webhook replicas to load this run's ConfigMap", within=90, every=2)
    kube.apply(mcp_workload(ns, images.mcp))
    rollout(kube, ns, "mcp")
    yield ns
    if os.environ.get("OUTRIDER_E2E_KEEP") != "1":
        kube.delete_namespace(ns)


def status_of(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod's `outrider.dev/status` annotation (fails the test when the pod was not injected)."""
    raw = pod["metadata"].get("annotations", {}).get("outrider.dev/status")
    assert raw, f"pod {pod['metadata']['name']} has no outrider.dev/status annotation: it was not injected"
    return json.loads(raw)  # type: ignore[no-any-return]


def proxy_svid(kube: Kube, namespace: str, pod: str) -> dict[str, Any]:
    """The X.509-SVID outrider-proxy fetches over its CSI socket: its SPIFFE ID and its URI SANs."""
    fetch = (
        "import json\n"
        "from spiffe import WorkloadApiClient\n"
        "from cryptography.x509 import UniformResourceIdentifier, SubjectAlternativeName\n"
        f"c = WorkloadApiClient('unix://{AGENT_SOCKET}')\n"
        "svid = c.fetch_x509_svid()\n"
        "san = svid.leaf.extensions.get_extension_for_class(SubjectAlternativeName).value\n"
        "uris = san.get_values_for_type(UniformResourceIdentifier)\n"
        "print(json.dumps({'id': str(svid.spiffe_id), 'uris': uris}))\n"
    )
    out = kube.exec(namespace, pod, "outrider-proxy", "python", "-c", fetch, check=False, timeout=60)
    assert out.returncode == 0, (
        f"outrider-proxy could not fetch its X.509-SVID over the CSI socket:\n{out.stderr}"
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_script(
    kube: Kube, where: tuple[str, str, str], script: str, *args: str, timeout: float = 120
) -> dict[str, Any]:
    """Run one of pod_scripts/ inside a container (stdin) and parse its JSON line."""
    ns, pod, container = where
    out = kube.exec(
        ns,
        pod,
        container,
        "python",
        "-",
        *args,
        stdin=(SCRIPTS / script).read_text(),
        check=False,
        timeout=timeout,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(
            f"{script} {' '.join(args)} in {ns}/{pod}/{container} printed no result:\n"
            f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        )
    return json.loads(lines[-1])  # type: ignore[no-any-return]
