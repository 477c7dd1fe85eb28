"""`python -m localnode up`: build (cached), record the host, then start the node's parts in order.

Idempotent: with the node up it only prints how to use it; with some parts down it starts the missing ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from localnode import components, host, procs, render
from localnode.cluster import NodeError, ctr, kubectl, log_tail, run, wait_for
from localnode.config import PAUSE_IMAGE, NodeConfig
from localnode.oci import write_pause_archive
from localnode.pki import ensure_pki

REPO = Path(__file__).resolve().parents[1]

ORDER = (
    "containerd",
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "coredns",
    "spire-server",
    "spire-agent",
    "spiffe-csi-driver",
    "csi-node-driver-registrar",
    "spire-controller-manager",
)


def say(msg: str) -> None:
    print(f"[node] {msg}", flush=True)


def build(cfg: NodeConfig) -> dict[str, str]:
    """Run scripts/build-node.sh (its progress goes to our stderr); returns NAME -> binary path."""
    env = {**os.environ, "OUTRIDER_CACHE": str(cfg.cache_dir)}
    out = subprocess.run(
        [str(REPO / "scripts" / "build-node.sh")], stdout=subprocess.PIPE, text=True, check=False, env=env
    )
    if out.returncode != 0:
        raise NodeError("scripts/build-node.sh failed (its output is above)")
    bins = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    missing = [k for k, v in bins.items() if k != "scm-crds" and not Path(v).is_file()]
    if missing:
        raise NodeError(f"build-node.sh reported binaries that do not exist: {missing}")
    return bins


def all_running(cfg: NodeConfig) -> bool:
    return all(procs.running_pid(cfg.run, name) is not None for name in ORDER)


def node_ready(bins: dict[str, str], cfg: NodeConfig) -> bool:
    jsonpath = '{.status.conditions[?(@.type=="Ready")].status}'
    try:
        out = kubectl(bins, cfg, "get", "node", cfg.node_name, "-o", f"jsonpath={jsonpath}")
    except NodeError:
        return False
    return out.strip() == "True"


def usage(cfg: NodeConfig) -> str:
    return (
        f"export KUBECONFIG={cfg.kubeconfig}\n"
        f"export PATH={cfg.cache_dir}/kubernetes-v1.34.4/bin:$PATH   # kubectl\n"
        f"kubectl get nodes   # logs: {cfg.logs}/<component>.log; tear down: make node-down"
    )


def setup_network(cfg: NodeConfig) -> None:
    if cfg.host_link not in host.links():
        run(["ip", "link", "add", cfg.host_link, "type", "veth", "peer", "name", cfg.peer_link])
    addrs = run(["ip", "-o", "addr", "show", "dev", cfg.host_link])
    if f" {cfg.node_ip}/" not in addrs:
        run(["ip", "addr", "add", f"{cfg.node_ip}/{cfg.node_prefix}", "dev", cfg.host_link])
    if cfg.ipv6 and f" {cfg.node_ip6}/" not in addrs:
        run(["ip", "-6", "addr", "add", f"{cfg.node_ip6}/{cfg.node_prefix6}", "dev", cfg.host_link, "nodad"])
    run(["ip", "link", "set", cfg.peer_link, "up"])
    run(["ip", "link", "set", cfg.host_link, "up"])


def write_configs(cfg: NodeConfig) -> None:
    for d in (cfg.etc, cfg.cni_conf_dir, cfg.logs, cfg.run, cfg.spire_dir / "server" / "private"):
        d.mkdir(parents=True, exist_ok=True)
    cfg.agent_socket_dir.mkdir(parents=True, exist_ok=True)
    cfg.agent_socket_dir.chmod(0o755)
    p = cfg.pki
    files = {
        cfg.etc / "containerd.toml": render.containerd_toml(cfg),
        cfg.cni_conf_dir / "10-outrider-node.conflist": render.cni_conflist(cfg),
        cfg.etc / "kubelet.yaml": render.kubelet_config(cfg),
        cfg.etc / "kube-proxy.yaml": render.kube_proxy_config(cfg),
        cfg.etc / "Corefile": render.corefile(cfg),
        cfg.etc / "spire-server.conf": render.spire_server_conf(cfg),
        cfg.etc / "spire-agent.conf": render.spire_agent_conf(cfg),
        cfg.etc / "spire-controller-manager.yaml": render.scm_config(cfg),
        cfg.etc / "bootstrap.json": render.bootstrap_manifest(cfg),
        cfg.kubeconfig: render.kubeconfig(cfg, "admin", p / "admin.crt", p / "admin.key"),
    }
    for user, stem in (
        ("controller-manager", "controller-manager"),
        ("scheduler", "scheduler"),
        ("kubelet", "kubelet"),
        ("kube-proxy", "kube-proxy"),
        ("coredns", "coredns"),
        ("spire-controller-manager", "spire-controller-manager"),
    ):
        files[cfg.etc / f"{user}.kubeconfig"] = render.kubeconfig(
            cfg, user, p / f"{stem}.crt", p / f"{stem}.key"
        )
    for path, text in files.items():
        # unchanged files stay untouched: kube-proxy exits when its config file changes
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    cfg.kubeconfig.chmod(0o600)


def import_images(cfg: NodeConfig, bins: dict[str, str]) -> None:
    """The pause image, then every archive in the images cache not imported in this state dir yet."""
    pause_tar = Path(bins["pause"]).with_name("pause-image.tar")
    if not pause_tar.exists():
        write_pause_archive(Path(bins["pause"]), PAUSE_IMAGE, pause_tar)
    stamp = cfg.run / "imported.json"
    done: dict[str, str] = json.loads(stamp.read_text()) if stamp.exists() else {}
    archives = [pause_tar] + (sorted(cfg.images_dir.glob("*.tar")) if cfg.images_dir.is_dir() else [])
    for tar in archives:
        st = tar.stat()
        key = f"{st.st_size}:{st.st_mtime_ns}"
        if done.get(str(tar)) == key:
            continue
        say(f"importing {tar.name} into the node's containerd")
        ctr(cfg, "images", "import", "--snapshotter", "overlayfs", str(tar))
        done[str(tar)] = key
        stamp.write_text(json.dumps(done))


def start(cfg: NodeConfig, spec: procs.ProcSpec) -> None:
    if procs.running_pid(cfg.run, spec.name) is None:
        say(f"starting {spec.name}")
        procs.start(cfg.run, cfg.logs, spec)
        time.sleep(0.3)
    if procs.running_pid(cfg.run, spec.name) is None:
        log = cfg.logs / f"{spec.name}.log"
        raise NodeError(f"{spec.name} exited at once; last lines of {log}:\n{log_tail(log)}")


def alive_or_fail(cfg: NodeConfig, name: str) -> None:
    if procs.running_pid(cfg.run, name) is None:
        log = cfg.logs / f"{name}.log"
        raise NodeError(f"{name} stopped; last lines of {log}:\n{log_tail(log)}")


def spire_up(cfg: NodeConfig, bins: dict[str, str]) -> None:
    server, sock = bins["spire-server"], str(cfg.server_socket)
    start(cfg, components.spire_server(cfg, server))

    def server_healthy() -> bool:
        alive_or_fail(cfg, "spire-server")
        run([server, "healthcheck", "-socketPath", sock], timeout=10)
        return True

    wait_for("SPIRE server health", server_healthy, 60, cfg.logs / "spire-server.log")
    if procs.running_pid(cfg.run, "spire-agent") is None:
        bundle = run([server, "bundle", "show", "-socketPath", sock])
        (cfg.spire_dir / "agent").mkdir(parents=True, exist_ok=True)
        (cfg.spire_dir / "agent" / "bootstrap.crt").write_text(bundle)
        uid = kubectl(bins, cfg, "get", "node", cfg.node_name, "-o", "jsonpath={.metadata.uid}").strip()
        # the join token's agent gets the node alias spire-controller-manager parents pod entries to
        alias = render.node_alias(cfg, uid)
        out = run([server, "token", "generate", "-socketPath", sock, "-spiffeID", alias, "-ttl", "600"])
        match = re.search(r"Token:\s*(\S+)", out)
        if not match:
            raise NodeError("spire-server token generate printed no token")
        start(cfg, components.spire_agent(cfg, bins["spire-agent"], match.group(1)))

    def agent_healthy() -> bool:
        alive_or_fail(cfg, "spire-agent")
        run(
            [bins["spire-agent"], "healthcheck", "-socketPath", str(cfg.agent_socket)],
            timeout=10,
        )
        return True

    wait_for("SPIRE agent health", agent_healthy, 60, cfg.logs / "spire-agent.log")


def up(cfg: NodeConfig) -> int:
    if os.geteuid() != 0:
        say("the node needs root (kubelet, containerd, CNI, iptables); run make node as root")
        return 2
    t0 = time.monotonic()
    bins = build(cfg)
    t_build = time.monotonic() - t0
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    cfg.state_dir.chmod(0o700)
    if all_running(cfg) and node_ready(bins, cfg):
        say(f"node {cfg.node_name} is already up ({time.monotonic() - t0:.1f} s)")
        print(usage(cfg), flush=True)
        return 0
    if not cfg.host_record.exists():
        say(f"recording the host's state in {cfg.host_record} (make node-down restores it)")
        cfg.host_record.write_text(host.snapshot().to_json())
    for tool in ("containerd", "ctr", "runc", "iptables", "ip"):
        if shutil.which(tool) is None:
            raise NodeError(
                f"{tool} is missing: apt-get install containerd runc containernetworking-plugins iptables"
            )
    if not Path("/usr/lib/cni/bridge").exists():
        raise NodeError("CNI plugins missing: apt-get install containernetworking-plugins")
    t1 = time.monotonic()
    setup_network(cfg)
    ensure_pki(cfg)
    write_configs(cfg)

    start(cfg, components.containerd(cfg))
    wait_for("containerd", lambda: bool(ctr(cfg, "version")), 30, cfg.logs / "containerd.log")
    import_images(cfg, bins)
    start(cfg, components.etcd(cfg, bins["etcd"]))
    start(cfg, components.apiserver(cfg, bins["kube-apiserver"]))

    def api_ready() -> bool:
        alive_or_fail(cfg, "kube-apiserver")
        return kubectl(bins, cfg, "get", "--raw", "/readyz").strip() == "ok"

    took = wait_for("kube-apiserver /readyz", api_ready, 120, cfg.logs / "kube-apiserver.log")
    say(f"kube-apiserver ready ({took:.1f} s)")
    kubectl(bins, cfg, "apply", "--server-side", "-f", bins["scm-crds"])
    kubectl(bins, cfg, "apply", "--server-side", "-f", str(cfg.etc / "bootstrap.json"))
    start(cfg, components.controller_manager(cfg, bins["kube-controller-manager"]))
    start(cfg, components.scheduler(cfg, bins["kube-scheduler"]))
    start(cfg, components.kubelet(cfg, bins["kubelet"]))

    def ready() -> bool:
        alive_or_fail(cfg, "kubelet")
        return node_ready(bins, cfg)

    took = wait_for(f"node {cfg.node_name} Ready", ready, 180, cfg.logs / "kubelet.log")
    t_ready = time.monotonic() - t1
    say(f"node {cfg.node_name} Ready ({took:.1f} s after kubelet start, {t_ready:.1f} s after up began)")
    start(cfg, components.kube_proxy(cfg, bins["kube-proxy"]))
    start(cfg, components.coredns(cfg, bins["coredns"]))
    spire_up(cfg, bins)
    Path(components.csi_socket(cfg)).parent.mkdir(parents=True, exist_ok=True)
    start(cfg, components.spiffe_csi_driver(cfg, bins["spiffe-csi-driver"]))
    registrar = bins.get("csi-node-driver-registrar")
    if registrar is None:
        say("csi-node-driver-registrar: not built here, using localnode/registrar.py (the same protocol)")
    start(cfg, components.csi_registrar(cfg, registrar))

    def csi_registered() -> bool:
        drivers = kubectl(
            bins, cfg, "get", "csinode", cfg.node_name, "-o", "jsonpath={.spec.drivers[*].name}"
        )
        return "csi.spiffe.io" in drivers.split()

    wait_for("CSINode to list csi.spiffe.io", csi_registered, 60, cfg.logs / "csi-node-driver-registrar.log")
    start(cfg, components.spire_controller_manager(cfg, bins["spire-controller-manager"]))
    wait_for(
        "the default ServiceAccount",
        lambda: bool(kubectl(bins, cfg, "get", "serviceaccount", "default", "-o", "name")),
        60,
        cfg.logs / "kube-controller-manager.log",
    )
    total = time.monotonic() - t0
    say(f"up: build/cache check {t_build:.1f} s, Ready after {t_ready:.1f} s, everything in {total:.1f} s")
    print(usage(cfg), flush=True)
    return 0


def main(cfg: NodeConfig) -> int:
    try:
        return up(cfg)
    except NodeError as exc:
        print(f"[node] make node failed: {exc}", file=sys.stderr)
        print("[node] the partial node is left for inspection; make node-down removes it", file=sys.stderr)
        return 1
