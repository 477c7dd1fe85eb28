"""The real one-node cluster of `make node`: Ready node, DNS, Services, CSI, SPIRE entries, clean teardown.

Each test uses real parts only: pods from a local busybox image run by the kubelet through containerd,
CoreDNS, kube-proxy's iptables rules, the SPIFFE CSI driver, SPIRE and spire-controller-manager.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from localnode import host, oci
from localnode.cluster import ctr
from tests.node.conftest import REPO, Node, localnode

pytestmark = [pytest.mark.node, pytest.mark.root, pytest.mark.slow]

BUSYBOX_IMAGE = "localhost/outrider-node-test/busybox:1"
BUSYBOX = "/bin/busybox"


def wait(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def busybox(node: Node) -> str:
    """A one-file image of Debian's static busybox, imported into the node's containerd."""
    binary = Path(BUSYBOX)
    if not binary.is_file():
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "busybox-static"], check=False, capture_output=True
        )
    if not binary.is_file():
        pytest.fail(
            "the test image needs Debian's busybox-static (/bin/busybox): apt-get install busybox-static"
        )
    archive = node.cfg.state_dir / "test-busybox.tar"
    archive.write_bytes(oci.single_binary_image(binary.read_bytes(), BUSYBOX, BUSYBOX_IMAGE, user="0:0"))
    ctr(node.cfg, "images", "import", "--snapshotter", "overlayfs", str(archive))
    return BUSYBOX_IMAGE


@pytest.fixture(scope="module")
def namespace(node: Node) -> Iterator[str]:
    name = f"node-test-{uuid.uuid4().hex[:6]}"
    node.k("create", "namespace", name)
    wait("the default ServiceAccount", lambda: bool(node.k("-n", name, "get", "sa", "default", check=False)))
    yield name
    node.k("delete", "namespace", name, "--wait=false", check=False)


def pod(name: str, image: str, command: list[str], **extra: object) -> dict[str, object]:
    container: dict[str, object] = {
        "name": extra.pop("container", name),
        "image": image,
        "imagePullPolicy": "Never",
        "command": command,
    }
    container.update(extra.pop("container_extra", {}))  # type: ignore[call-overload]
    annotations = extra.pop("annotations", {})
    spec: dict[str, object] = {"containers": [container], "terminationGracePeriodSeconds": 1}
    spec.update(extra)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}, "annotations": annotations},
        "spec": spec,
    }


def apply(node: Node, ns: str, *objs: dict[str, object]) -> None:
    node.k(
        "-n",
        ns,
        "apply",
        "-f",
        "-",
        input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}),
    )


def running(node: Node, ns: str, name: str) -> None:
    node.k("-n", ns, "wait", "--for=condition=Ready", f"pod/{name}", "--timeout=120s")


def test_node_is_ready_and_kubectl_works(node: Node) -> None:
    nodes = json.loads(node.k("get", "nodes", "-o", "json"))["items"]
    assert [n["metadata"]["name"] for n in nodes] == [node.cfg.node_name]
    ready = next(c for c in nodes[0]["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True", f"node not Ready: {ready}"
    addresses = {a["address"] for a in nodes[0]["status"]["addresses"] if a["type"] == "InternalIP"}
    assert node.cfg.node_ip in addresses
    version = json.loads(node.k("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == version["clientVersion"]["gitVersion"] == "v1.34.4"


def test_pod_resolves_a_service_through_coredns_and_reaches_it(
    node: Node, busybox: str, namespace: str
) -> None:
    web = pod(
        "web",
        busybox,
        [
            BUSYBOX,
            "sh",
            "-c",
            f"{BUSYBOX} mkdir -p /www && echo node-test-ok > /www/index.html"
            f" && exec {BUSYBOX} httpd -f -p 8080 -h /www",
        ],
        container_extra={"readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}},
    )
    client = pod("client", busybox, [BUSYBOX, "sleep", "3600"])
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"app": "web"},
            "ipFamilyPolicy": "PreferDualStack",
            "ports": [{"port": 80, "targetPort": 8080}],
        },
    }
    apply(node, namespace, web, client, service)
    running(node, namespace, "web")
    running(node, namespace, "client")
    svc = json.loads(node.k("-n", namespace, "get", "service", "web", "-o", "json"))
    cluster_ip = svc["spec"]["clusterIP"]

    fqdn = f"web.{namespace}.svc.{node.cfg.cluster_domain}"
    lookup = node.k("-n", namespace, "exec", "client", "--", BUSYBOX, "nslookup", fqdn)
    assert cluster_ip in lookup, f"CoreDNS did not answer {fqdn} with {cluster_ip}:\n{lookup}"
    resolv = node.k("-n", namespace, "exec", "client", "--", BUSYBOX, "cat", "/etc/resolv.conf")
    assert f"nameserver {node.cfg.dns_ip}" in resolv

    def from_pod() -> bool:
        out = node.k(
            "-n",
            namespace,
            "exec",
            "client",
            "--",
            BUSYBOX,
            "wget",
            "-q",
            "-O-",
            f"http://{cluster_ip}/",
            check=False,
        )
        return "node-test-ok" in out

    wait(f"the ClusterIP {cluster_ip} to answer from a pod", from_pod, 60)

    for ip in svc["spec"].get("clusterIPs", [cluster_ip]):
        url = f"http://[{ip}]/" if ":" in ip else f"http://{ip}/"
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - our own ClusterIP
            assert resp.read().decode().strip() == "node-test-ok", f"ClusterIP {ip} from the host"


def test_spiffe_csi_driver_is_registered_with_the_kubelet(node: Node) -> None:
    csinode = json.loads(node.k("get", "csinode", node.cfg.node_name, "-o", "json"))
    assert "csi.spiffe.io" in [d["name"] for d in csinode["spec"]["drivers"]]
    assert (
        node.k("get", "csidriver", "csi.spiffe.io", "-o", "name").strip()
        == "csidriver.storage.k8s.io/csi.spiffe.io"
    )


def _container_pid(node: Node, ns: str, pod_name: str) -> int:
    status = json.loads(node.k("-n", ns, "get", "pod", pod_name, "-o", "json"))["status"]
    cid = status["containerStatuses"][0]["containerID"].split("://", 1)[1]
    for line in ctr(node.cfg, "tasks", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"container {cid} of {pod_name} has no running task")


def _join_cgroups_of(pid: int) -> Callable[[], None]:
    """preexec_fn: move the child into the cgroups of `pid` (a container), as if it ran in it."""
    paths = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "kubepods" not in path:
            continue
        name = controllers.removeprefix("name=") if controllers else "unified"
        procs = Path("/sys/fs/cgroup") / name / path.lstrip("/") / "cgroup.procs"
        if procs.exists():
            paths.append(procs)

    def join() -> None:
        for procs in paths:
            procs.write_text(str(os.getpid()))

    return join


def test_clusterspiffeid_creates_entries_and_the_csi_volume_delivers_the_svid(
    node: Node, busybox: str, namespace: str
) -> None:
    node.k("apply", "-f", str(REPO / "manifests" / "examples" / "spire-clusterspiffeid.yaml"))
    node.k("label", "namespace", namespace, "outrider.dev/inject=enabled", "--overwrite")
    probe = pod(
        "spiffe-probe",
        busybox,
        [BUSYBOX, "sleep", "3600"],
        container="outrider-proxy",
        # this pod plays the proxy itself: if Outrider's webhook is installed, it must not inject one
        # (an annotation, so the ClusterSPIFFEID's label-based podSelector still matches it)
        annotations={"outrider.dev/inject": "false"},
        container_extra={
            "volumeMounts": [{"name": "spiffe", "mountPath": "/spiffe-workload-api", "readOnly": True}]
        },
        volumes=[{"name": "spiffe", "csi": {"driver": "csi.spiffe.io", "readOnly": True}}],
    )
    apply(node, namespace, probe)
    running(node, namespace, "spiffe-probe")
    uid = node.k("-n", namespace, "get", "pod", "spiffe-probe", "-o", "jsonpath={.metadata.uid}").strip()
    spiffe_id = f"spiffe://{node.cfg.trust_domain}/ns/{namespace}/sa/default"
    server = shutil.which("spire-server") or str(next(node.cfg.cache_dir.glob("spire-*/bin/spire-server")))
    agent = str(Path(server).with_name("spire-agent"))
    sock = str(node.cfg.server_socket)

    def entry() -> bool:
        out = subprocess.run(
            [server, "entry", "show", "-socketPath", sock, "-spiffeID", spiffe_id],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return f"k8s:pod-uid:{uid}" in out and "k8s:container-name:outrider-proxy" in out

    wait(f"spire-controller-manager to create the entry {spiffe_id}", entry, 90)

    pid = _container_pid(node, namespace, "spiffe-probe")
    workload_sock = f"/proc/{pid}/root/spiffe-workload-api/spire-agent.sock"
    assert Path(workload_sock).is_socket(), "the CSI volume did not bring the agent's socket into the pod"

    def fetch(preexec: Callable[[], None] | None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [agent, "api", "fetch", "x509", "-socketPath", workload_sock, "-timeout", "5s"],
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=preexec,
        )

    got = {"out": ""}

    def svid() -> bool:
        res = fetch(_join_cgroups_of(pid))
        got["out"] = res.stdout + res.stderr
        return f"SPIFFE ID:\t\t{spiffe_id}" in res.stdout or f"SPIFFE ID: {spiffe_id}" in " ".join(
            res.stdout.split()
        )

    wait("an X.509-SVID through the pod's CSI volume", svid, 60)
    # the agent attests by the caller's cgroups through the kubelet: a host process gets nothing
    outsider = fetch(None)
    assert spiffe_id not in outsider.stdout, "a process outside the pod received the pod's SVID"


def test_node_down_leaves_no_trace(node: Node) -> None:
    before = node.before or host.HostState.from_json(node.cfg.host_record.read_text())
    res = localnode("down")
    after = host.snapshot()
    left = host.differences(before, after, mounts=host.our_mounts(node.cfg.state_dir))
    if node.was_up:
        localnode("up")
    assert res.returncode == 0, f"localnode down failed:\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}"
    assert left == [], "make node-down left traces:\n" + "\n".join(left)
    assert not node.cfg.state_dir.exists() or node.was_up
