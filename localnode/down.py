"""`python -m localnode down`: stop everything `up` started and undo its host changes from the record.

Pods are deleted through the API first (so the kubelet and CNI tear down their sandboxes), then the
processes stop, and what is left (containers, shims, mounts, netns, cgroups, chains, links, sysctls,
directories) is removed by comparing with the snapshot `up` took. Nothing else on the host is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from localnode import host, procs
from localnode.cluster import NodeError, ctr, run
from localnode.config import HOST_DIRS, K8S_VERSION, NodeConfig
from localnode.up import ORDER


def say(msg: str) -> None:
    print(f"[node-down] {msg}", flush=True)


def _kubectl(cfg: NodeConfig) -> str:
    return str(cfg.cache_dir / f"kubernetes-{K8S_VERSION}" / "bin" / "kubectl")


def drain_pods(cfg: NodeConfig) -> None:
    """Delete every pod so the kubelet stops containers and calls CNI DEL (frees IPs, netns, veths)."""
    for name in ("spire-controller-manager", "kube-controller-manager", "kube-scheduler"):
        procs.stop(cfg.run, name)
    if procs.running_pid(cfg.run, "kubelet") is None or procs.running_pid(cfg.run, "kube-apiserver") is None:
        return
    kc = f"--kubeconfig={cfg.kubeconfig}"
    with contextlib.suppress(NodeError):
        run(
            [
                _kubectl(cfg),
                kc,
                "delete",
                "pods",
                "--all",
                "-A",
                "--grace-period=0",
                "--force",
                "--wait=false",
            ]
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            left = run([_kubectl(cfg), kc, "get", "pods", "-A", "-o", "name"], timeout=10).split()
            tasks = ctr(cfg, "tasks", "ls", "-q", timeout=10).split()
        except NodeError:
            break
        if not left and not tasks:
            return
        time.sleep(1)
    say("some pods did not terminate within 60 s; removing their containers directly")


def remove_containers(cfg: NodeConfig) -> None:
    if procs.running_pid(cfg.run, "containerd") is None:
        return
    with contextlib.suppress(NodeError):
        for task in ctr(cfg, "tasks", "ls", "-q", timeout=20).split():
            with contextlib.suppress(NodeError):
                ctr(cfg, "tasks", "kill", "-s", "SIGKILL", task, timeout=20)
            with contextlib.suppress(NodeError):
                ctr(cfg, "tasks", "delete", "-f", task, timeout=20)
        for c in ctr(cfg, "containers", "ls", "-q", timeout=20).split():
            with contextlib.suppress(NodeError):
                ctr(cfg, "containers", "delete", c, timeout=20)


def kill_leftovers(cfg: NodeConfig, before: host.HostState) -> None:
    """containerd shims (they carry our socket path) and any process left in new kubepods cgroups."""
    for pid in procs.pids_with_arg(str(cfg.containerd_sock)):
        procs.kill_and_wait(pid, 5)
    for tree in host.kubepods_cgroups():
        if tree in before.cgroups:
            continue
        for pid in host.cgroup_procs(Path(tree)):
            procs.kill_and_wait(pid, 5)


def down(cfg: NodeConfig) -> int:
    if os.geteuid() != 0:
        say("needs root")
        return 2
    t0 = time.monotonic()
    if not cfg.host_record.exists():
        if cfg.state_dir.exists():
            say(f"{cfg.host_record} is missing: cannot tell what the node changed; inspect {cfg.state_dir}")
            return 1
        say("no node to remove")
        return 0
    before = host.HostState.from_json(cfg.host_record.read_text())
    drain_pods(cfg)
    remove_containers(cfg)
    for name in reversed(ORDER):
        if procs.stop(cfg.run, name):
            say(f"stopped {name}")
    kill_leftovers(cfg, before)

    prefixes = (str(cfg.state_dir), "/var/lib/kubelet", "/run/containerd")
    netns_new = [
        f"/run/netns/{n}" for n in host.snapshot().netns if n.startswith("cni-") and n not in before.netns
    ]
    failed = host.unmount_under((*prefixes, *netns_new), before.mounts)
    if failed:
        say(f"could not unmount: {failed}")
    for tree in host.kubepods_cgroups():
        if tree not in before.cgroups and not host.remove_cgroup_tree(Path(tree)):
            say(f"could not remove cgroup {tree}")
    for err in host.remove_chains(before):
        say(f"iptables: {err}")
    bridge_ports = (
        run(["ip", "-o", "link", "show", "master", cfg.bridge]) if cfg.bridge in host.links() else ""
    )
    for line in bridge_ports.splitlines():
        subprocess.run(["ip", "link", "del", line.split(":")[1].strip().split("@")[0]], check=False)
    for link in (cfg.bridge, cfg.host_link):
        if link in host.links() and link not in before.links:
            subprocess.run(["ip", "link", "del", link], check=False)
    for change in host.restore_sysctls(before):
        say(f"restored {change}")
    for d in HOST_DIRS:
        host.remove_new_entries(d, before.dirs.get(d), only_prefix="cni-" if d == "/run/netns" else "")
    shutil.rmtree(cfg.state_dir, ignore_errors=True)
    left = host.differences(before, host.snapshot(), mounts=host.our_mounts(cfg.state_dir))
    for diff in left:
        say(f"left behind: {diff}")
    say(f"done in {time.monotonic() - t0:.1f} s" + ("" if not left else f" ({len(left)} traces left)"))
    return 0 if not left else 1


def main(cfg: NodeConfig) -> int:
    try:
        return down(cfg)
    except NodeError as exc:
        print(f"[node-down] failed: {exc}", file=sys.stderr)
        return 1
