"""The pod's traffic-capture rules as data (Istio style), and their idempotent application and removal.

`plan_rules` is pure: options -> ordered rule list (golden-tested, printed by `--dry-run`). `apply`
and `cleanup` are the thin shell that runs iptables/ip6tables; a second `apply` changes nothing.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

COMMENT_PREFIX = "outrider"

# Our chains, per table. The jump rules from the built-in chains are the only rules outside them.
OUTPUT_CHAIN = "OUTRIDER_OUTPUT"
REDIRECT_CHAIN = "OUTRIDER_REDIRECT"
INBOUND_CHAIN = "OUTRIDER_INBOUND"
IN_REDIRECT_CHAIN = "OUTRIDER_IN_REDIRECT"
UDP_CHAIN = "OUTRIDER_UDP"
TCP_CHAIN = "OUTRIDER_TCP"
OTHER_CHAIN = "OUTRIDER_OTHER"
V6_DROP_CHAIN = "OUTRIDER_V6_DROP"

IPV6_MODES = ("auto", "capture", "drop", "off")


@dataclass(frozen=True)
class CaptureOptions:
    proxy_port: int = 15001
    inbound_proxy_port: int = 15006
    inbound_ports: tuple[int, ...] = ()
    proxy_uid: int = 15337
    # Kept for the CLI flag only: no rule matches the GID. `--gid-owner` matches the socket's primary
    # (fs) GID, so any app container with runAsGroup 15337 would leave uncaptured; the UID alone is
    # the sidecar's mark (the webhook must refuse app containers that run as UID 15337).
    proxy_gid: int = 15337
    exclude_cidrs: tuple[str, ...] = ()
    exclude_ports: tuple[int, ...] = ()  # outbound destination ports left uncaptured
    dns_servers: tuple[str, ...] = ()
    ipv6: str = "capture"  # resolved: "capture" | "drop" | "off" (no ip6tables at all)


@dataclass(frozen=True)
class Rule:
    family: int  # 4 (iptables) | 6 (ip6tables)
    table: str
    chain: str
    spec: tuple[str, ...]  # match and target, without the comment
    why: str = field(default="capture", compare=False)  # the comment text after "outrider: "

    @property
    def tool(self) -> str:
        return "iptables" if self.family == 4 else "ip6tables"

    def argv(self, op: str) -> list[str]:
        comment = f"{COMMENT_PREFIX}: {self.why}"
        return [
            self.tool,
            "-w",
            "-t",
            self.table,
            op,
            self.chain,
            *self.spec,
            "-m",
            "comment",
            "--comment",
            comment,
        ]

    def render(self) -> str:
        args = self.argv("-A")
        args[-1] = f'"{args[-1]}"'
        return " ".join(a for a in args if a != "-w")


@dataclass(frozen=True)
class Chain:
    family: int
    table: str
    name: str
    parent: str  # the built-in chain that jumps here
    jump_spec: tuple[str, ...]  # match of that jump rule
    rules: tuple[Rule, ...] = field(default=())


def _rule(family: int, table: str, chain: str, why: str, *spec: str) -> Rule:
    return Rule(family, table, chain, tuple(spec), why)


def _split_family(values: Iterable[str]) -> tuple[list[str], list[str]]:
    v4: list[str] = []
    v6: list[str] = []
    for value in values:
        network = ipaddress.ip_network(value, strict=False)
        target = v6 if network.version == 6 else v4
        text = str(network) if network.num_addresses > 1 else str(network.network_address)
        if text not in target:  # a server or range given twice: one rule
            target.append(text)
    return v4, v6


def plan_chains(options: CaptureOptions) -> list[Chain]:
    """Every chain we own with its rules, in the order they are created and applied."""
    dns4, dns6 = _split_family(options.dns_servers)
    excl4, excl6 = _split_family(options.exclude_cidrs)
    families = [4] if options.ipv6 in ("drop", "off") else [4, 6]
    chains: list[Chain] = []
    for family in families:
        loopback = "127.0.0.0/8" if family == 4 else "::1/128"
        dns = dns4 if family == 4 else dns6
        excluded = excl4 if family == 4 else excl6
        out: list[Rule] = [
            _rule(
                family,
                "nat",
                OUTPUT_CHAIN,
                "sidecar uid not captured",
                "-m",
                "owner",
                "--uid-owner",
                str(options.proxy_uid),
                "-j",
                "RETURN",
            ),
            _rule(family, "nat", OUTPUT_CHAIN, "loopback not captured", "-o", "lo", "-j", "RETURN"),
            _rule(family, "nat", OUTPUT_CHAIN, "loopback not captured", "-d", loopback, "-j", "RETURN"),
        ]
        out += [
            _rule(
                family,
                "nat",
                OUTPUT_CHAIN,
                "DNS over TCP to the pod resolver",
                "-d",
                server,
                "-p",
                "tcp",
                "--dport",
                "53",
                "-j",
                "RETURN",
            )
            for server in dns
        ]
        out += [
            _rule(family, "nat", OUTPUT_CHAIN, "excluded CIDR", "-d", cidr, "-j", "RETURN")
            for cidr in excluded
        ]
        out += [
            _rule(
                family,
                "nat",
                OUTPUT_CHAIN,
                "excluded port",
                "-p",
                "tcp",
                "--dport",
                str(port),
                "-j",
                "RETURN",
            )
            for port in options.exclude_ports
        ]
        out.append(_rule(family, "nat", OUTPUT_CHAIN, "capture outbound TCP", "-j", REDIRECT_CHAIN))
        chains.append(
            Chain(
                family,
                "nat",
                REDIRECT_CHAIN,
                "",
                (),
                (
                    _rule(
                        family,
                        "nat",
                        REDIRECT_CHAIN,
                        "to the egress enforcer",
                        "-p",
                        "tcp",
                        "-j",
                        "REDIRECT",
                        "--to-ports",
                        str(options.proxy_port),
                    ),
                ),
            )
        )
        chains.append(Chain(family, "nat", OUTPUT_CHAIN, "OUTPUT", ("-p", "tcp"), tuple(out)))
        if options.inbound_ports:
            chains.append(
                Chain(
                    family,
                    "nat",
                    IN_REDIRECT_CHAIN,
                    "",
                    (),
                    (
                        _rule(
                            family,
                            "nat",
                            IN_REDIRECT_CHAIN,
                            "to the inbound MCP proxy",
                            "-p",
                            "tcp",
                            "-j",
                            "REDIRECT",
                            "--to-ports",
                            str(options.inbound_proxy_port),
                        ),
                    ),
                )
            )
            chains.append(
                Chain(
                    family,
                    "nat",
                    INBOUND_CHAIN,
                    "PREROUTING",
                    ("-p", "tcp"),
                    tuple(
                        _rule(
                            family,
                            "nat",
                            INBOUND_CHAIN,
                            "capture inbound MCP port",
                            "-p",
                            "tcp",
                            "--dport",
                            str(port),
                            "-j",
                            IN_REDIRECT_CHAIN,
                        )
                        for port in options.inbound_ports
                    ),
                )
            )
        # TCP segments that conntrack calls INVALID (a lone RST, SYN+FIN, ...) never reach the nat
        # table, so without this a process with NET_RAW (a default container capability) could send
        # data out in hand-made segments that are never redirected.
        tcp = [
            _rule(family, "filter", TCP_CHAIN, "loopback TCP", "-o", "lo", "-j", "RETURN"),
            _rule(
                family,
                "filter",
                TCP_CHAIN,
                "drop TCP that bypasses nat (invalid or untracked)",
                "-m",
                "conntrack",
                "--ctstate",
                "INVALID,UNTRACKED",
                "-j",
                "DROP",
            ),
        ]
        chains.append(Chain(family, "filter", TCP_CHAIN, "OUTPUT", ("-p", "tcp"), tuple(tcp)))
        udp = [_rule(family, "filter", UDP_CHAIN, "loopback UDP", "-o", "lo", "-j", "RETURN")]
        udp += [
            _rule(
                family,
                "filter",
                UDP_CHAIN,
                "DNS to the pod resolver",
                "-d",
                server,
                "-p",
                "udp",
                "--dport",
                "53",
                "-j",
                "RETURN",
            )
            for server in dns
        ]
        udp.append(_rule(family, "filter", UDP_CHAIN, "drop other outbound UDP", "-j", "DROP"))
        chains.append(Chain(family, "filter", UDP_CHAIN, "OUTPUT", ("-p", "udp"), tuple(udp)))
        # Everything that is neither TCP (captured) nor UDP (above): ICMP echo can carry data out
        # (unprivileged ping sockets need no NET_RAW), so only replies/errors of known flows and,
        # for IPv6, the neighbour discovery the link needs, may leave.
        other = [
            _rule(family, "filter", OTHER_CHAIN, "loopback", "-o", "lo", "-j", "RETURN"),
            _rule(family, "filter", OTHER_CHAIN, "UDP judged in OUTRIDER_UDP", "-p", "udp", "-j", "RETURN"),
            _rule(
                family,
                "filter",
                OTHER_CHAIN,
                "replies and errors of known flows",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "RETURN",
            ),
        ]
        if family == 6:
            other += [
                _rule(
                    6,
                    "filter",
                    OTHER_CHAIN,
                    "IPv6 neighbour discovery",
                    "-p",
                    "ipv6-icmp",
                    "--icmpv6-type",
                    str(icmp_type),
                    "-j",
                    "RETURN",
                )
                for icmp_type in (133, 135, 136)
            ]
        other.append(_rule(family, "filter", OTHER_CHAIN, "drop other outbound protocols", "-j", "DROP"))
        chains.append(Chain(family, "filter", OTHER_CHAIN, "OUTPUT", ("!", "-p", "tcp"), tuple(other)))
    if options.ipv6 == "drop":
        chains.append(
            Chain(
                6,
                "filter",
                V6_DROP_CHAIN,
                "OUTPUT",
                (),
                (
                    _rule(6, "filter", V6_DROP_CHAIN, "IPv6 loopback", "-o", "lo", "-j", "RETURN"),
                    _rule(6, "filter", V6_DROP_CHAIN, "no IPv6 capture: drop IPv6 egress", "-j", "DROP"),
                ),
            )
        )
    return chains


def plan_rules(options: CaptureOptions) -> list[str]:
    """The dry-run listing: chain creations, chain rules and the jumps, as shell-like lines."""
    lines: list[str] = []
    for chain in plan_chains(options):
        tool = "iptables" if chain.family == 4 else "ip6tables"
        lines.append(f"{tool} -t {chain.table} -N {chain.name}")
        lines.extend(rule.render() for rule in chain.rules)
        if chain.parent:
            lines.append(_jump(chain).render())
    return lines


def _jump(chain: Chain) -> Rule:
    return _rule(
        chain.family, chain.table, chain.parent, f"jump to {chain.name}", *chain.jump_spec, "-j", chain.name
    )


# --- the shell ------------------------------------------------------------------------------------

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError:  # e.g. no ip6tables in the image: report like a failed command
        return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: command not found")


class IptablesError(RuntimeError):
    pass


def _must(runner: Runner, argv: Sequence[str]) -> None:
    result = runner(argv)
    if result.returncode != 0:
        raise IptablesError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def _chain_exists(runner: Runner, family: int, table: str, name: str) -> bool:
    tool = "iptables" if family == 4 else "ip6tables"
    return runner([tool, "-w", "-t", table, "-S", name]).returncode == 0


def _chain_matches(runner: Runner, chain: Chain) -> bool:
    tool = "iptables" if chain.family == 4 else "ip6tables"
    listing = runner([tool, "-w", "-t", chain.table, "-S", chain.name])
    if listing.returncode != 0:
        return False
    present = [line for line in listing.stdout.splitlines() if line.startswith("-A ")]
    if len(present) != len(chain.rules):
        return False
    return all(runner(rule.argv("-C")).returncode == 0 for rule in chain.rules)


def apply(options: CaptureOptions, runner: Runner = run_command) -> list[str]:
    """Make the tables hold exactly the planned rules; returns what changed (empty: already in place)."""
    changes: list[str] = []
    chains = plan_chains(options)
    for chain in chains:  # chains first, so every jump target exists
        if _chain_matches(runner, chain):
            continue
        tool = "iptables" if chain.family == 4 else "ip6tables"
        if _chain_exists(runner, chain.family, chain.table, chain.name):
            _must(runner, [tool, "-w", "-t", chain.table, "-F", chain.name])
            changes.append(f"{tool} -t {chain.table} -F {chain.name}")
        else:
            _must(runner, [tool, "-w", "-t", chain.table, "-N", chain.name])
            changes.append(f"{tool} -t {chain.table} -N {chain.name}")
        for rule in chain.rules:
            _must(runner, rule.argv("-A"))
            changes.append(rule.render())
    for chain in chains:
        if not chain.parent:
            continue
        jump = _jump(chain)
        if runner(jump.argv("-C")).returncode != 0:
            _must(runner, jump.argv("-A"))
            changes.append(jump.render())
    return changes


def cleanup(options: CaptureOptions, runner: Runner = run_command) -> list[str]:
    """Remove our jumps and chains (whatever options they were made with); returns what was removed."""
    removed: list[str] = []
    every = CaptureOptions(
        inbound_ports=options.inbound_ports or (1,), ipv6="capture", proxy_uid=options.proxy_uid
    )
    chains = plan_chains(every) + [
        c for c in plan_chains(CaptureOptions(ipv6="drop")) if c.name == V6_DROP_CHAIN
    ]
    for chain in chains:
        if not chain.parent:
            continue
        jump = _jump(chain)
        while runner(jump.argv("-C")).returncode == 0:
            _must(runner, jump.argv("-D"))
            removed.append(jump.render().replace(" -A ", " -D ", 1))
    present = [c for c in chains if _chain_exists(runner, c.family, c.table, c.name)]
    # Flush every chain before deleting any: our chains jump to each other.
    for chain in present:
        tool = "iptables" if chain.family == 4 else "ip6tables"
        _must(runner, [tool, "-w", "-t", chain.table, "-F", chain.name])
    for chain in present:
        tool = "iptables" if chain.family == 4 else "ip6tables"
        _must(runner, [tool, "-w", "-t", chain.table, "-X", chain.name])
        removed.append(f"{tool} -t {chain.table} -X {chain.name}")
    return removed


def resolv_conf_nameservers(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError:
        return []
    servers: list[str] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                servers.append(str(ipaddress.ip_address(parts[1].split("%")[0])))
            except ValueError:
                continue
    return servers


def ipv6_available(runner: Runner = run_command, proc: Path = Path("/proc")) -> bool:
    """The pod has IPv6 when the kernel has it on and ip6tables can reach its nat table."""
    if not (proc / "net" / "if_inet6").exists():
        return False
    try:
        if (proc / "sys" / "net" / "ipv6" / "conf" / "all" / "disable_ipv6").read_text().strip() == "1":
            return False
    except OSError:
        return False
    return runner(["ip6tables", "-w", "-t", "nat", "-S", "OUTPUT"]).returncode == 0
