"""Whether `outrider iptables` is about to change a host's network namespace instead of a pod's.

`host_reasons` is the pure decision over facts; `read_facts` gathers them from /proc and the kernel.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

# The kernel's fixed inode numbers of the initial PID and network namespaces (PROC_PID_INIT_INO;
# the network one is fixed in recent kernels, older ones number it like any other namespace).
INITIAL_PID_NS_INODE = 0xEFFFFFFC
INITIAL_NET_NS_INODE = 0xEFFFFFF9
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8


@dataclass(frozen=True)
class NetnsFacts:
    initial_pid_namespace: bool | None  # None: unknown
    # Whether we share the network namespace of the host's PID 1 or of kthreadd (PID 2: kernel
    # threads always live in the initial one); None when neither can be looked at.
    same_netns_as_init: bool | None
    netns_inode: int | None
    up_interfaces: tuple[str, ...]  # interfaces that are up, loopback excluded


def host_reasons(facts: NetnsFacts) -> list[str]:
    """Why this network namespace looks like a host's (empty: it looks like a pod's).

    Inside a pod's own PID namespace PID 1 is the container's first process, which shares the
    pod's network, so the comparison with PID 1 only means something in the initial PID namespace.
    Where it cannot be made there, the answer is "refuse": this guard fails closed.
    """
    reasons: list[str] = []
    if facts.netns_inode == INITIAL_NET_NS_INODE:
        reasons.append("it is the kernel's initial network namespace")
    elif facts.initial_pid_namespace and facts.same_netns_as_init:
        reasons.append("it is the network namespace of the host's init process")
    elif facts.initial_pid_namespace and facts.same_netns_as_init is None:
        reasons.append(
            "this runs in the host's PID namespace and the host's init network namespace cannot be "
            "compared (no access to /proc/1/ns/net or /proc/2/ns/net)"
        )
    if len(facts.up_interfaces) > 1:
        reasons.append(
            f"it has {len(facts.up_interfaces)} interfaces up besides loopback "
            f"({', '.join(facts.up_interfaces)}); a pod has one"
        )
    return reasons


def read_facts() -> NetnsFacts:
    initial: bool | None
    try:
        initial = Path("/proc/self/ns/pid").stat().st_ino == INITIAL_PID_NS_INODE
    except OSError:
        initial = None
    ours: os.stat_result | None
    try:
        ours = Path("/proc/self/ns/net").stat()
    except OSError:
        ours = None
    same: bool | None = None
    if ours is not None:
        for pid in ("1", "2"):
            if pid == "2" and _comm("2") != "kthreadd":
                continue
            try:
                theirs = Path(f"/proc/{pid}/ns/net").stat()
            except OSError:  # PID 1 may hide its namespaces even from root (ptrace rules)
                continue
            same = (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)
            break
    return NetnsFacts(initial, same, ours.st_ino if ours else None, _up_interfaces())


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _up_interfaces() -> tuple[str, ...]:
    # Asked of the kernel for this namespace (sysfs may be mounted for another one).
    up: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("16sH14x", name.encode()[:15], 0)
            try:
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request)
            except OSError:
                continue
            flags = struct.unpack("16sH14x", answer)[1]
            if flags & _IFF_UP and not flags & _IFF_LOOPBACK:
                up.append(name)
    return tuple(sorted(up))
