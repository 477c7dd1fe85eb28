"""The node's processes in start order, as argv: pure data from the config and the binaries' paths."""

from __future__ import annotations

import sys
from pathlib import Path

from localnode.config import NodeConfig
from localnode.procs import ProcSpec
from localnode.render import ETCD_CLIENT, ETCD_PEER, node_ips, pod_cidrs, service_cidrs

ADMISSION_PLUGINS = (
    "NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,DefaultTolerationSeconds,"
    "NodeRestriction,PodSecurity,Priority,RuntimeClass,StorageObjectInUseProtection,"
    "MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook,ResourceQuota"
)


def containerd(cfg: NodeConfig) -> ProcSpec:
    return ProcSpec("containerd", ("/usr/bin/containerd", "--config", str(cfg.etc / "containerd.toml")))


def etcd(cfg: NodeConfig, binary: str) -> ProcSpec:
    return ProcSpec(
        "etcd",
        (
            binary,
            "--name=outrider-node",
            f"--data-dir={cfg.state_dir / 'etcd'}",
            f"--listen-client-urls=http://{ETCD_CLIENT}",
            f"--advertise-client-urls=http://{ETCD_CLIENT}",
            f"--listen-peer-urls=http://{ETCD_PEER}",
            f"--initial-advertise-peer-urls=http://{ETCD_PEER}",
            f"--initial-cluster=outrider-node=http://{ETCD_PEER}",
            "--listen-metrics-urls=",
            "--log-level=warn",
        ),
    )


def apiserver(cfg: NodeConfig, binary: str) -> ProcSpec:
    p = cfg.pki
    issuer = f"https://kubernetes.default.svc.{cfg.cluster_domain}"
    return ProcSpec(
        "kube-apiserver",
        (
            binary,
            f"--etcd-servers=http://{ETCD_CLIENT}",
            f"--bind-address={cfg.node_ip}",
            f"--advertise-address={cfg.node_ip}",
            f"--secure-port={cfg.api_port}",
            f"--service-cluster-ip-range={service_cidrs(cfg)}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--tls-cert-file={p / 'apiserver.crt'}",
            f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={p / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--service-account-issuer={issuer}",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            "--authorization-mode=Node,RBAC",
            f"--enable-admission-plugins={ADMISSION_PLUGINS}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ),
    )


def controller_manager(cfg: NodeConfig, binary: str) -> ProcSpec:
    p, kc = cfg.pki, str(cfg.etc / "controller-manager.kubeconfig")
    return ProcSpec(
        "kube-controller-manager",
        (
            binary,
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            "--secure-port=10257",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--root-ca-file={p / 'ca.crt'}",
            f"--service-account-private-key-file={p / 'sa.key'}",
            f"--cluster-signing-cert-file={p / 'ca.crt'}",
            f"--cluster-signing-key-file={p / 'ca.key'}",
            f"--service-cluster-ip-range={service_cidrs(cfg)}",
            f"--cluster-cidr={pod_cidrs(cfg)}",
            "--allocate-node-cidrs=false",
            # its default (/usr/libexec/kubernetes/...) would be created on the host
            f"--flex-volume-plugin-dir={cfg.state_dir / 'volume-plugins'}",
            "--v=1",
        ),
    )


def scheduler(cfg: NodeConfig, binary: str) -> ProcSpec:
    kc = str(cfg.etc / "scheduler.kubeconfig")
    return ProcSpec(
        "kube-scheduler",
        (
            binary,
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            "--secure-port=10259",
            "--leader-elect=false",
            "--v=1",
        ),
    )


def kubelet(cfg: NodeConfig, binary: str) -> ProcSpec:
    return ProcSpec(
        "kubelet",
        (
            binary,
            f"--config={cfg.etc / 'kubelet.yaml'}",
            f"--kubeconfig={cfg.etc / 'kubelet.kubeconfig'}",
            f"--root-dir={cfg.kubelet_dir}",
            f"--hostname-override={cfg.node_name}",
            f"--node-ip={','.join(node_ips(cfg))}",
            "--v=1",
        ),
    )


def kube_proxy(cfg: NodeConfig, binary: str) -> ProcSpec:
    return ProcSpec("kube-proxy", (binary, f"--config={cfg.etc / 'kube-proxy.yaml'}", "--v=1"))


def coredns(cfg: NodeConfig, binary: str) -> ProcSpec:
    return ProcSpec("coredns", (binary, "-conf", str(cfg.etc / "Corefile")))


def spire_server(cfg: NodeConfig, binary: str) -> ProcSpec:
    return ProcSpec("spire-server", (binary, "run", "-config", str(cfg.etc / "spire-server.conf")))


def spire_agent(cfg: NodeConfig, binary: str, join_token: str) -> ProcSpec:
    return ProcSpec(
        "spire-agent", (binary, "run", "-config", str(cfg.etc / "spire-agent.conf"), "-joinToken", join_token)
    )


def csi_socket(cfg: NodeConfig) -> str:
    return str(cfg.kubelet_dir / "plugins" / "csi.spiffe.io" / "csi.sock")


def spiffe_csi_driver(cfg: NodeConfig, binary: str) -> ProcSpec:
    return ProcSpec(
        "spiffe-csi-driver",
        (
            binary,
            f"-node-id={cfg.node_name}",
            f"-csi-socket-path={csi_socket(cfg)}",
            f"-workload-api-socket-dir={cfg.agent_socket_dir}",
            "-plugin-name=csi.spiffe.io",
        ),
    )


def csi_registrar(cfg: NodeConfig, binary: str | None) -> ProcSpec:
    """The CSI node-driver-registrar; without its binary (its source is not on the Go module proxy),
    `localnode/registrar.py`, which serves the same kubelet plugin-registration protocol."""
    registry = cfg.kubelet_dir / "plugins_registry"
    if binary is None:
        stand_in = Path(__file__).with_name("registrar.py")
        argv: tuple[str, ...] = (
            sys.executable,
            str(stand_in),
            f"--csi-address={csi_socket(cfg)}",
            f"--kubelet-registration-path={csi_socket(cfg)}",
            f"--plugin-registration-path={registry}",
            "--driver-name=csi.spiffe.io",
        )
        return ProcSpec("csi-node-driver-registrar", argv)
    return ProcSpec(
        "csi-node-driver-registrar",
        (
            binary,
            f"--csi-address={csi_socket(cfg)}",
            f"--kubelet-registration-path={csi_socket(cfg)}",
            f"--plugin-registration-path={registry}",
            "--v=2",
        ),
        env=(("KUBE_NODE_NAME", cfg.node_name),),
    )


def spire_controller_manager(cfg: NodeConfig, binary: str) -> ProcSpec:
    return ProcSpec(
        "spire-controller-manager",
        (binary, f"--config={cfg.etc / 'spire-controller-manager.yaml'}"),
        env=(
            ("ENABLE_WEBHOOKS", "false"),
            ("KUBECONFIG", str(cfg.etc / "spire-controller-manager.kubeconfig")),
        ),
    )
