"""The demo pod's network: a pod namespace, an "internet" namespace, and a link to this host.

    host (demo, IdP, OTLP receiver)  --veth--  pod ns (MCP server, sidecar, iptables)  --veth--  internet ns
Everything is torn down on exit, including the /etc/netns files that give the pod its resolv.conf.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def root_available() -> bool:
    """Root with `ip` and `iptables`, and allowed to create a network namespace (not so in every
    container that runs as root)."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        return False
    if shutil.which("unshare") is None:
        return True  # cannot probe; `ip netns add` will say what is wrong
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@dataclass(frozen=True)
class Topology:
    tag: str
    pod_ns: str
    inet_ns: str
    host_ip: str  # this host's end of the host<->pod link
    pod_ip: str  # the pod's address as a client sees it
    pod_inet_ip: str  # the pod's end of the pod<->internet link
    inet_ip: str  # the "internet" host serving the allowed and denied names
    host_names: tuple[str, ...]


def plan(tag: str, names: Sequence[str], octet: int) -> Topology:
    """Pure: the names and addresses of one demo's namespaces (10.<octet>.1.0/30 and 10.<octet>.2.0/30)."""
    return Topology(
        tag=tag,
        pod_ns=f"outrider-demo-pod-{tag}",
        inet_ns=f"outrider-demo-inet-{tag}",
        host_ip=f"10.{octet}.1.1",
        pod_ip=f"10.{octet}.1.2",
        pod_inet_ip=f"10.{octet}.2.2",
        inet_ip=f"10.{octet}.2.1",
        host_names=tuple(names),
    )


def used_addresses() -> set[str]:
    """IPv4 addresses on this host's interfaces (so two demos never pick the same link)."""
    result = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=False)
    return {part.split("/")[0] for line in result.stdout.splitlines() for part in line.split() if "/" in part}


def free_octet(used: set[str], preferred: int) -> int:
    """Pure: the first octet from `preferred` on (200-249, wrapping) whose 10.<octet>.1.1 is unused."""
    for i in range(50):
        octet = 200 + (preferred - 200 + i) % 50
        if f"10.{octet}.1.1" not in used:
            return octet
    raise RuntimeError("no free 10.2xx.1.0/30 link for the demo (50 demos running?)")


def setup_commands(t: Topology) -> list[list[str]]:
    """Pure: the `ip` commands that build the topology, in order."""
    h, hp, pi, ie = f"orh{t.tag}", f"orp{t.tag}", f"ori{t.tag}", f"ore{t.tag}"
    pod = ["ip", "-n", t.pod_ns]
    inet = ["ip", "-n", t.inet_ns]
    return [
        ["ip", "netns", "add", t.pod_ns],
        ["ip", "netns", "add", t.inet_ns],
        ["ip", "link", "add", h, "type", "veth", "peer", "name", hp, "netns", t.pod_ns],
        ["ip", "link", "add", pi, "netns", t.pod_ns, "type", "veth", "peer", "name", ie, "netns", t.inet_ns],
        ["ip", "addr", "add", f"{t.host_ip}/30", "dev", h],
        ["ip", "link", "set", h, "up"],
        [*pod, "addr", "add", f"{t.pod_ip}/30", "dev", hp],
        [*pod, "addr", "add", f"{t.pod_inet_ip}/30", "dev", pi],
        [*pod, "link", "set", "lo", "up"],
        [*pod, "link", "set", hp, "up"],
        [*pod, "link", "set", pi, "up"],
        [*pod, "route", "add", "default", "via", t.inet_ip],
        [*inet, "addr", "add", f"{t.inet_ip}/30", "dev", ie],
        [*inet, "link", "set", "lo", "up"],
        [*inet, "link", "set", ie, "up"],
    ]


def hosts_file(t: Topology) -> str:
    # Like a pod's: nothing but localhost. The demo's names resolve through the internet
    # namespace's DNS server, as a cluster's would (the enforcer never trusts /etc/hosts).
    return "127.0.0.1 localhost\n::1 localhost\n"


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()}")


def teardown(t: Topology) -> list[str]:
    """Remove everything `setup` may have created; returns what could not be removed."""
    problems: list[str] = []
    for ns in (t.pod_ns, t.inet_ns):
        # Deleting a namespace removes its veth ends, which removes the peers too.
        result = subprocess.run(["ip", "netns", "delete", ns], capture_output=True, text=True, check=False)
        if result.returncode != 0 and "No such file" not in result.stderr:
            problems.append(f"ip netns delete {ns}: {result.stderr.strip()}")
    subprocess.run(["ip", "link", "delete", f"orh{t.tag}"], capture_output=True, check=False)
    shutil.rmtree(Path("/etc/netns") / t.pod_ns, ignore_errors=True)
    return problems


@contextmanager
def topology(t: Topology) -> Iterator[Topology]:
    """Build the namespaces and links (root only); always tear them down."""
    try:
        for cmd in setup_commands(t):
            _run(cmd)
        etc = Path("/etc/netns") / t.pod_ns
        etc.mkdir(parents=True, exist_ok=True)
        # `ip netns exec` bind-mounts these over /etc/hosts and /etc/resolv.conf inside the pod.
        (etc / "hosts").write_text(hosts_file(t))
        (etc / "resolv.conf").write_text(f"nameserver {t.inet_ip}\n")
        yield t
    finally:
        teardown(t)
