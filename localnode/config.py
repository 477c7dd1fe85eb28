"""The node's fixed layout: addresses, CIDRs, ports and paths, parsed once from the environment.

Everything the cluster writes lives under `state_dir`; the only other host paths it touches are listed
in `HOST_DIRS` (created by the kubelet/CNI and removed by `down` when they did not exist before `up`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Paths the kubelet, containerd and the CNI plugins hard-code outside our state directory.
HOST_DIRS = (
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/run/netns",
    "/usr/libexec/kubernetes",
)
# Sysctls the kubelet, the bridge plugin or kube-proxy may change; `up` records them, `down` restores them.
SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.default.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.ipv6.conf.all.forwarding",
    "net.ipv6.conf.default.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.netfilter.nf_conntrack_udp_timeout",
    "net.netfilter.nf_conntrack_udp_timeout_stream",
)
# iptables chains the kubelet, kube-proxy and the CNI plugins create (in filter, nat and mangle).
CHAIN_PREFIXES = ("KUBE-", "CNI-")
TABLES = ("filter", "nat", "mangle")

K8S_VERSION = "v1.34.4"
PAUSE_IMAGE = "localhost/outrider/pause:3.10"


@dataclass(frozen=True)
class NodeConfig:
    state_dir: Path
    cache_dir: Path
    node_name: str = "outrider-node"
    cluster_name: str = "outrider-node"
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    host_link: str = "ornode0"  # veth carrying the node IP; its peer is `ornode0p`
    bridge: str = "orn-cni0"
    node_ip: str = "10.203.0.2"
    node_prefix: int = 24
    node_ip6: str = "fd00:203::2"
    node_prefix6: int = 64
    pod_cidr: str = "10.244.0.0/16"
    node_pod_cidr: str = "10.244.0.0/24"
    service_cidr: str = "10.96.0.0/16"
    api_service_ip: str = "10.96.0.1"
    dns_ip: str = "10.96.0.10"
    pod_cidr6: str = "fd00:10:244::/56"
    node_pod_cidr6: str = "fd00:10:244::/64"
    service_cidr6: str = "fd00:10:96::/112"
    api_port: int = 6443
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    spire_server_port: int = 8081
    ipv6: bool = True

    @property
    def peer_link(self) -> str:
        return f"{self.host_link}p"

    @property
    def api_url(self) -> str:
        return f"https://{self.node_ip}:{self.api_port}"

    # --- paths under state_dir ---
    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def run(self) -> Path:
        return self.state_dir / "run"

    @property
    def etc(self) -> Path:
        return self.state_dir / "etc"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def containerd_sock(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def kubelet_dir(self) -> Path:
        return self.state_dir / "kubelet"

    @property
    def cni_conf_dir(self) -> Path:
        return self.etc / "cni"

    @property
    def spire_dir(self) -> Path:
        return self.state_dir / "spire"

    @property
    def agent_socket_dir(self) -> Path:
        return self.spire_dir / "agent" / "public"

    @property
    def agent_socket(self) -> Path:
        """The Workload API socket, named as SPIRE's Helm charts name it (Outrider's default)."""
        return self.agent_socket_dir / "spire-agent.sock"

    @property
    def server_socket(self) -> Path:
        return self.spire_dir / "server" / "private" / "api.sock"

    @property
    def host_record(self) -> Path:
        return self.state_dir / "host-before.json"

    @property
    def images_dir(self) -> Path:
        return self.cache_dir / "images"


def kernel_has_ipv6() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


def from_env(env: dict[str, str] | None = None) -> NodeConfig:
    """The node config with `OUTRIDER_NODE_DIR`, `OUTRIDER_CACHE` and `OUTRIDER_NODE_IPV6` applied
    (IPv6, i.e. dual-stack, is on when the kernel has it unless `OUTRIDER_NODE_IPV6=0`)."""
    env = dict(os.environ) if env is None else env
    cache = env.get("OUTRIDER_CACHE") or str(
        Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME", "/root")) / ".cache") / "outrider"
    )
    state = env.get("OUTRIDER_NODE_DIR", "/var/lib/outrider-node")
    if not Path(state).is_absolute():
        raise ValueError(f"OUTRIDER_NODE_DIR must be an absolute path, got {state!r}")
    ipv6 = env.get("OUTRIDER_NODE_IPV6", "1") not in ("0", "false", "no") and kernel_has_ipv6()
    return NodeConfig(state_dir=Path(state), cache_dir=Path(cache), ipv6=ipv6)
