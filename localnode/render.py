"""Pure renderers: every config file and command line of the node, as text or argv, from a NodeConfig.

Nothing here touches the host, so the whole layout is testable (and readable) as data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localnode.config import PAUSE_IMAGE, NodeConfig

ETCD_CLIENT = "127.0.0.1:12379"
ETCD_PEER = "127.0.0.1:12380"


def _j(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


def node_ips(cfg: NodeConfig) -> list[str]:
    return [cfg.node_ip, cfg.node_ip6] if cfg.ipv6 else [cfg.node_ip]


def pod_cidrs(cfg: NodeConfig) -> str:
    return f"{cfg.pod_cidr},{cfg.pod_cidr6}" if cfg.ipv6 else cfg.pod_cidr


def service_cidrs(cfg: NodeConfig) -> str:
    return f"{cfg.service_cidr},{cfg.service_cidr6}" if cfg.ipv6 else cfg.service_cidr


def containerd_toml(cfg: NodeConfig) -> str:
    s = cfg.state_dir
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""# containerd of the outrider node only: its own root, state and socket (not the system one)
version = 2
root = "{s}/containerd"
state = "{cfg.run}/containerd-state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{cfg.containerd_sock}"

[ttrpc]
  address = "{cfg.containerd_sock}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{s}/containerd-opt"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: a negative oom_score_adj makes runc fail to create the sandbox
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cfg.cni_conf_dir}"
    max_conf_num = 1
"""


def cni_conflist(cfg: NodeConfig) -> str:
    ranges: list[list[dict[str, str]]] = [[{"subnet": cfg.node_pod_cidr}]]
    routes = [{"dst": "0.0.0.0/0"}]
    if cfg.ipv6:
        ranges.append([{"subnet": cfg.node_pod_cidr6}])
        routes.append({"dst": "::/0"})
    return _j(
        {
            "cniVersion": "0.4.0",
            "name": "outrider-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": cfg.bridge,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": ranges,
                        "routes": routes,
                        "dataDir": str(cfg.state_dir / "cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
    )


def kubeconfig(cfg: NodeConfig, user: str, cert: Path, key: Path) -> str:
    return _j(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": cfg.cluster_name,
                    "cluster": {"server": cfg.api_url, "certificate-authority": str(cfg.pki / "ca.crt")},
                }
            ],
            "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
            "contexts": [{"name": cfg.cluster_name, "context": {"cluster": cfg.cluster_name, "user": user}}],
            "current-context": cfg.cluster_name,
        }
    )


def kubelet_config(cfg: NodeConfig) -> str:
    pki = cfg.pki
    return _j(
        {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": cfg.node_ip,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(pki / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
            "containerRuntimeEndpoint": f"unix://{cfg.containerd_sock}",
            # cgroup v1 hybrid host, no systemd as init: cgroupfs, and v1 must be allowed explicitly
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "clusterDNS": [cfg.dns_ip],
            "clusterDomain": cfg.cluster_domain,
            "volumePluginDir": str(cfg.state_dir / "volume-plugins"),
            "podLogsDir": "/var/log/pods",
            # nothing can be pulled here: never garbage-collect the imported images
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "serializeImagePulls": False,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "resolvConf": "/etc/resolv.conf",
            "maxPods": 110,
        }
    )


def kube_proxy_config(cfg: NodeConfig) -> str:
    addrs = [f"{cfg.node_ip}/32"] + ([f"{cfg.node_ip6}/128"] if cfg.ipv6 else [])
    return _j(
        {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(cfg.etc / "kube-proxy.kubeconfig")},
            "hostnameOverride": cfg.node_name,
            "bindAddress": cfg.node_ip,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            "clusterCIDR": pod_cidrs(cfg),
            "nodePortAddresses": addrs,
            # leave the host's conntrack sysctls alone (0 = do not set)
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
                "udpTimeout": "0s",
                "udpStreamTimeout": "0s",
            },
            # no NodePorts on 127.0.0.1, so kube-proxy never sets net.ipv4.conf.all.route_localnet
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "syncPeriod": "30s"},
        }
    )


def corefile(cfg: NodeConfig) -> str:
    return f""".:53 {{
    bind {cfg.node_ip}
    errors
    kubernetes {cfg.cluster_domain} in-addr.arpa ip6.arpa {{
        kubeconfig {cfg.etc / "coredns.kubeconfig"}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 30
}}
"""


def spire_server_conf(cfg: NodeConfig) -> str:
    d = cfg.spire_dir / "server"
    return f"""server {{
    bind_address = "{cfg.node_ip}"
    bind_port = "{cfg.spire_server_port}"
    socket_path = "{cfg.server_socket}"
    trust_domain = "{cfg.trust_domain}"
    data_dir = "{d / "data"}"
    log_level = "INFO"
    ca_ttl = "72h"
    default_x509_svid_ttl = "1h"
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d / "data" / "datastore.sqlite3"}"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            keys_path = "{d / "data" / "keys.json"}"
        }}
    }}
}}
"""


def spire_agent_conf(cfg: NodeConfig) -> str:
    d = cfg.spire_dir / "agent"
    return f"""agent {{
    data_dir = "{d / "data"}"
    log_level = "INFO"
    server_address = "{cfg.node_ip}"
    server_port = "{cfg.spire_server_port}"
    socket_path = "{cfg.agent_socket}"
    trust_bundle_path = "{d / "bootstrap.crt"}"
    trust_domain = "{cfg.trust_domain}"
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            directory = "{d / "data"}"
        }}
    }}
    WorkloadAttestor "k8s" {{
        plugin_data {{
            # node_name is the host the plugin dials: the kubelet listens on the node IP
            node_name = "{cfg.node_ip}"
            kubelet_secure_port = 10250
            kubelet_ca_path = "{cfg.pki / "ca.crt"}"
            certificate_path = "{cfg.pki / "spire-agent.crt"}"
            private_key_path = "{cfg.pki / "spire-agent.key"}"
        }}
    }}
}}
"""


def node_alias(cfg: NodeConfig, node_uid: str) -> str:
    """The SPIFFE ID the agent's join token also gives it; spire-controller-manager's parentIDTemplate
    names the same ID. (`/spire/agent/k8s_psat/...`, its default, is reserved for real psat agents.)"""
    return f"spiffe://{cfg.trust_domain}/k8s-node/{cfg.cluster_name}/{node_uid}"


def scm_config(cfg: NodeConfig) -> str:
    return _j(
        {
            "apiVersion": "spire.spiffe.io/v1alpha1",
            "kind": "ControllerManagerConfig",
            "metrics": {"bindAddress": "0"},
            "health": {"healthProbeBindAddress": "0"},
            "leaderElection": {"leaderElect": False},
            "clusterName": cfg.cluster_name,
            "clusterDomain": cfg.cluster_domain,
            "trustDomain": cfg.trust_domain,
            "ignoreNamespaces": ["kube-system", "kube-public", "spire-system", "local-path-storage"],
            "spireServerSocketPath": str(cfg.server_socket),
            # pod entries hang off the node alias the agent's join token carries (see node_alias)
            "parentIDTemplate": "spiffe://{{ .TrustDomain }}/k8s-node/{{ .ClusterName }}/{{ .NodeMeta.UID }}",
        }
    )


def _user_binding(name: str, role: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": f"outrider-node:{name}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": f"outrider-node:{name}"}
        ],
    }


def bootstrap_manifest(cfg: NodeConfig) -> str:
    """Cluster objects the host processes need: RBAC for their client certs, the kube-dns Service
    (pointing at CoreDNS on the node IP) and the CSIDriver object of the SPIFFE CSI driver."""
    objs: list[dict[str, Any]] = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "outrider-node:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        _user_binding("coredns", "outrider-node:coredns"),
        # the SPIRE agent's k8s workload attestor lists pods on the kubelet's /pods endpoint
        _user_binding("spire-agent", "system:kubelet-api-admin"),
        _user_binding("spire-controller-manager", "cluster-admin"),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "kube-dns",
                "namespace": "kube-system",
                "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"},
            },
            "spec": {
                "clusterIP": cfg.dns_ip,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-host",
                "namespace": "kube-system",
                "labels": {
                    "kubernetes.io/service-name": "kube-dns",
                    "endpointslice.kubernetes.io/managed-by": "outrider-node",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [cfg.node_ip], "conditions": {"ready": True}}],
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ],
        },
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "CSIDriver",
            "metadata": {"name": "csi.spiffe.io"},
            "spec": {
                "attachRequired": False,
                "podInfoOnMount": True,
                "fsGroupPolicy": "None",
                "volumeLifecycleModes": ["Ephemeral"],
            },
        },
    ]
    return _j({"apiVersion": "v1", "kind": "List", "items": objs})
