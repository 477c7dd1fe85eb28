"""`outrider iptables` (the `outrider-init` command): print, apply or remove the pod's capture rules.

Runs once per pod in the init container with NET_ADMIN; `--dry-run` prints the planned rules only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from outrider.sidecar.egress.iptables import (
    IPV6_MODES,
    CaptureOptions,
    IptablesError,
    apply,
    cleanup,
    ipv6_available,
    plan_rules,
    resolv_conf_nameservers,
    run_command,
)
from outrider.sidecar.egress.netns_guard import host_reasons, read_facts


def _ports(values: list[str]) -> tuple[int, ...]:
    ports: list[int] = []
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            if not part.strip().isdigit() or not 1 <= int(part) <= 65535:
                raise argparse.ArgumentTypeError(f"{part!r} is not a port number (1-65535)")
            ports.append(int(part))
    return tuple(dict.fromkeys(ports))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proxy-port", type=int, default=15001, help="outbound capture port (default 15001)")
    parser.add_argument(
        "--inbound-proxy-port", type=int, default=15006, help="inbound MCP port (default 15006)"
    )
    parser.add_argument(
        "--inbound-ports",
        action="append",
        default=[],
        metavar="PORT[,PORT]",
        help="app ports whose inbound TCP goes to the inbound proxy (the MCP port)",
    )
    parser.add_argument("--proxy-uid", type=int, default=15337, help="the sidecar's UID (not captured)")
    parser.add_argument(
        "--proxy-gid",
        type=int,
        default=15337,
        help="accepted for compatibility; GIDs are never exempt (runAsGroup 15337 would escape)",
    )
    parser.add_argument(
        "--exclude-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="destination left uncaptured (repeatable)",
    )
    parser.add_argument(
        "--exclude-port",
        action="append",
        default=[],
        metavar="PORT",
        help="destination TCP port left uncaptured (repeatable)",
    )
    parser.add_argument(
        "--dns-server",
        action="append",
        default=[],
        metavar="IP",
        help="extra resolver allowed for DNS (custom dnsConfig nameservers; repeatable)",
    )
    parser.add_argument(
        "--resolv-conf", default="/etc/resolv.conf", help="where the pod's resolvers are listed"
    )
    parser.add_argument(
        "--ipv6",
        choices=IPV6_MODES,
        default="auto",
        help="capture IPv6 like IPv4, drop IPv6 egress, or off; auto: capture when the pod has IPv6",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--dry-run", action="store_true", help="print the rules, change nothing")
    action.add_argument("--cleanup", action="store_true", help="remove every Outrider rule and chain")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print options and rules as JSON")
    parser.add_argument(
        "--force",
        action="store_true",
        help="change the rules even where the network namespace looks like a host's, not a pod's",
    )


def options_from_args(args: argparse.Namespace, *, probe_ipv6: bool = True) -> CaptureOptions:
    import ipaddress

    for cidr in args.exclude_cidr:
        ipaddress.ip_network(cidr, strict=False)
    servers = resolv_conf_nameservers(Path(args.resolv_conf)) + [
        str(ipaddress.ip_address(s)) for s in args.dns_server
    ]
    ipv6 = args.ipv6
    if ipv6 == "auto":
        if not probe_ipv6 or ipv6_available():
            ipv6 = "capture"
        elif run_command(["ip6tables", "-w", "-t", "filter", "-S", "OUTPUT"]).returncode == 0:
            ipv6 = "drop"
        else:
            ipv6 = "off"
    return CaptureOptions(
        proxy_port=args.proxy_port,
        inbound_proxy_port=args.inbound_proxy_port,
        inbound_ports=_ports(args.inbound_ports),
        proxy_uid=args.proxy_uid,
        proxy_gid=args.proxy_gid,
        exclude_cidrs=tuple(args.exclude_cidr),
        exclude_ports=_ports(args.exclude_port),
        dns_servers=tuple(dict.fromkeys(servers)),
        ipv6=ipv6,
    )


def run(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"outrider iptables: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        if args.json:
            print(json.dumps({"options": asdict(options), "rules": plan_rules(options)}, indent=2))
        else:
            print("\n".join(plan_rules(options)))
        return 0
    if not args.force:
        reasons = host_reasons(read_facts())
        if reasons:
            print(
                "outrider iptables: refusing to change the rules here: this looks like a host's network "
                f"namespace, not a pod's ({'; '.join(reasons)}). It runs as the pod's outrider-init "
                "container; use --dry-run to see the rules, or --force if this really is the pod",
                file=sys.stderr,
            )
            return 3
    try:
        changes = cleanup(options) if args.cleanup else apply(options)
    except IptablesError as exc:
        print(f"outrider iptables: {exc}", file=sys.stderr)
        return 1
    verb = "removed" if args.cleanup else "applied"
    print(f"outrider iptables: {verb} {len(changes)} change(s)")
    for line in changes:
        print(f"  {line}")
    return 0
