"""What the node changes on the host, as data: a snapshot before `up`, and the undo steps for `down`.

The snapshot (sysctls, iptables chains, mounts, links, netns, directories, cgroups) is saved as JSON in
the state directory; `down` restores or removes only what differs from it, never whole tables.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from localnode.config import CHAIN_PREFIXES, HOST_DIRS, SYSCTLS, TABLES

IPTABLES = ("iptables", "ip6tables")
CGROUP_ROOT = Path("/sys/fs/cgroup")
KUBEPODS = "kubepods"


@dataclass(frozen=True)
class HostState:
    sysctls: dict[str, str | None]
    chains: dict[str, list[str]]  # "iptables/nat" -> chains with our prefixes
    jumps: dict[str, list[str]]  # "iptables/nat" -> rules jumping into those chains
    mounts: list[str]
    links: list[str]
    netns: list[str]
    dirs: dict[str, list[str] | None]  # path -> its entries, or None when absent
    cgroups: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HostState:
        return cls(**json.loads(text))


# --- pure parsing ----------------------------------------------------------------------------------


def ours(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIXES)


def parse_save(text: str) -> tuple[list[str], list[str]]:
    """From `iptables-save -t T` output: (our chains, rules of any chain that jump/goto ours)."""
    chains, jumps = [], []
    for line in text.splitlines():
        if line.startswith(":"):
            name = line[1:].split()[0]
            if ours(name):
                chains.append(name)
        elif line.startswith("-A "):
            args = shlex.split(line)
            chain = args[1]
            target = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-j", "-g")), "")
            if ours(target) and not ours(chain):
                jumps.append(line)
    return chains, jumps


def mountpoints(mountinfo: str) -> list[str]:
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\"))
    return points


# --- reading the host ------------------------------------------------------------------------------


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> bool:
    try:
        Path("/proc/sys", *name.split(".")).write_text(value)
    except OSError:
        return False
    return True


def iptables_state() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    chains: dict[str, list[str]] = {}
    jumps: dict[str, list[str]] = {}
    for tool in IPTABLES:
        if shutil.which(f"{tool}-save") is None:
            continue
        for table in TABLES:
            out = _run([f"{tool}-save", "-t", table])
            if out.returncode != 0:
                continue
            c, j = parse_save(out.stdout)
            chains[f"{tool}/{table}"] = sorted(c)
            jumps[f"{tool}/{table}"] = sorted(j)
    return chains, jumps


def links() -> list[str]:
    out = _run(["ip", "-o", "link", "show"])
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines() if ":" in line)


def kubepods_cgroups() -> list[str]:
    return sorted(str(p) for p in CGROUP_ROOT.glob(f"*/{KUBEPODS}") if p.is_dir())


def _entries(path: str) -> list[str] | None:
    p = Path(path)
    return sorted(e.name for e in p.iterdir()) if p.is_dir() else None


def snapshot(extra_dirs: tuple[str, ...] = ()) -> HostState:
    chains, jumps = iptables_state()
    return HostState(
        sysctls={name: read_sysctl(name) for name in SYSCTLS},
        chains=chains,
        jumps=jumps,
        mounts=sorted(set(mountpoints(Path("/proc/self/mountinfo").read_text()))),
        links=links(),
        netns=_entries("/run/netns") or [],
        dirs={d: _entries(d) for d in (*HOST_DIRS, *extra_dirs)},
        cgroups=kubepods_cgroups(),
    )


# What the node can leave behind, by name: other work on the machine (other tests' netns, veths and
# mounts) comes and goes meanwhile and is not ours to report.
OUR_LINKS = ("orn", "veth")
KUBE_MOUNTS = ("/var/lib/kubelet", "/run/containerd", "/run/netns/cni-")


def our_mounts(state_dir: Path) -> tuple[str, ...]:
    return (str(state_dir), *KUBE_MOUNTS)


def _ours(names: list[str], prefixes: tuple[str, ...]) -> set[str]:
    return {n for n in names if n.startswith(prefixes)}


def differences(
    before: HostState,
    after: HostState,
    links: tuple[str, ...] = OUR_LINKS,
    mounts: tuple[str, ...] = our_mounts(Path("/var/lib/outrider-node")),
) -> list[str]:
    """Human-readable traces `after` has that `before` did not (empty = the host is as it was).

    Links and mounts count only when their names start with `links`/`mounts`, netns only as `cni-*`.
    """
    diffs = []
    for name, value in before.sysctls.items():
        if after.sysctls.get(name) != value:
            diffs.append(f"sysctl {name}: {value} -> {after.sysctls.get(name)}")
    for key, chains in after.chains.items():
        new = set(chains) - set(before.chains.get(key, []))
        if new:
            diffs.append(f"{key}: chains left {sorted(new)}")
    for key, rules in after.jumps.items():
        new = set(rules) - set(before.jumps.get(key, []))
        if new:
            diffs.append(f"{key}: rules left {sorted(new)}")
    for label, b, a, prefixes in (
        ("mounts", before.mounts, after.mounts, mounts),
        ("links", before.links, after.links, links),
        ("netns", before.netns, after.netns, ("cni-",)),
        ("cgroups", before.cgroups, after.cgroups, ("/",)),
    ):
        new = _ours(a, prefixes) - set(b)
        if new:
            diffs.append(f"{label} left: {sorted(new)}")
    for d, entries in after.dirs.items():
        was = before.dirs.get(d)
        if d == "/run/netns":
            continue  # counted above, cni-* only
        if entries is not None and was is None:
            diffs.append(f"directory left: {d}")
        elif entries is not None and was is not None and set(entries) - set(was):
            diffs.append(f"{d}: entries left {sorted(set(entries) - set(was))}")
    return diffs


# --- undoing ---------------------------------------------------------------------------------------


def remove_chains(before: HostState) -> list[str]:
    """Delete the jump rules and chains with our prefixes that did not exist before; returns errors."""
    errors = []
    for tool in IPTABLES:
        if shutil.which(f"{tool}-save") is None:
            continue
        for table in TABLES:
            key = f"{tool}/{table}"
            out = _run([f"{tool}-save", "-t", table])
            if out.returncode != 0:
                continue
            chains, jumps = parse_save(out.stdout)
            for rule in jumps:
                if rule in before.jumps.get(key, []):
                    continue
                args = shlex.split(rule)
                res = _run([tool, "-w", "-t", table, "-D", *args[1:]])
                if res.returncode != 0:
                    errors.append(f"{tool} -t {table} -D {shlex.join(args[1:])}: {res.stderr.strip()}")
            new = [c for c in chains if c not in before.chains.get(key, [])]
            for chain in new:
                _run([tool, "-w", "-t", table, "-F", chain])
            for chain in new:
                res = _run([tool, "-w", "-t", table, "-X", chain])
                if res.returncode != 0:
                    errors.append(f"{tool} -t {table} -X {chain}: {res.stderr.strip()}")
    return errors


def unmount_under(prefixes: tuple[str, ...], keep: list[str]) -> list[str]:
    """Unmount every mount point under `prefixes` not in `keep`, deepest first; returns failures."""
    failures: list[str] = []
    for _ in range(3):
        points = mountpoints(Path("/proc/self/mountinfo").read_text())
        targets = sorted(
            {p for p in points if p not in keep and any(p == x or p.startswith(x + "/") for x in prefixes)},
            key=len,
            reverse=True,
        )
        if not targets:
            return []
        failures = []
        for p in targets:
            if _run(["umount", p]).returncode != 0 and _run(["umount", "-l", p]).returncode != 0:
                failures.append(p)
    return failures


def cgroup_procs(tree: Path) -> list[int]:
    pids: list[int] = []
    for procs in tree.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(x) for x in procs.read_text().split()]
    return pids


def remove_cgroup_tree(tree: Path) -> bool:
    """rmdir a cgroup directory tree bottom-up (cgroupfs only allows rmdir of empty groups)."""
    if not tree.is_dir():
        return True
    dirs = sorted((p for p in tree.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for d in [*dirs, tree]:
        with contextlib.suppress(OSError):
            d.rmdir()
    return not tree.exists()


def restore_sysctls(before: HostState) -> list[str]:
    changed = []
    for name, value in before.sysctls.items():
        if value is not None and read_sysctl(name) != value:
            if write_sysctl(name, value):
                changed.append(f"{name}={value}")
            else:
                changed.append(f"{name}: could not restore {value}")
    return changed


def remove_new_entries(path: str, was: list[str] | None, only_prefix: str = "") -> None:
    p = Path(path)
    if not p.is_dir():
        return
    if was is None and not only_prefix:
        shutil.rmtree(p, ignore_errors=True)
        return
    for entry in p.iterdir():
        if entry.name in (was or []) or not entry.name.startswith(only_prefix):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if was is None and not any(p.iterdir()):
        p.rmdir()
