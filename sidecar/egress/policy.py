"""The egress allowlist: rule parsing, name normalisation and the allow/deny decision.

Pure functions over plain data (no sockets, no files): the webhook, the enforcer and the tests share them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import idna

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PortRange = tuple[int, int]

# A rule without a port allows the two web ports; `:*` allows every port. Naming ports is the norm
# because "this host on any port" is rarely what an operator means.
DEFAULT_PORTS: tuple[PortRange, ...] = ((80, 80), (443, 443))
ANY_PORT: tuple[PortRange, ...] = ((1, 65535),)

POLICY_VERSION = 1

# ASCII host names: letters, digits, '-' and '_' (seen in real service names), 1-63 per label.
_ASCII_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class PolicyError(ValueError):
    """A policy document as a whole is malformed (not a mapping, `allow` not a list, ...)."""


@dataclass(frozen=True)
class RuleError:
    """One rule that could not be parsed: its text, where it came from and what is wrong."""

    text: str
    origin: str
    message: str

    def __str__(self) -> str:
        return f"{self.origin}: egress rule {self.text!r}: {self.message}"


@dataclass(frozen=True)
class Rule:
    kind: str  # "host" (exact name) | "suffix" (`*.example.com`) | "cidr"
    ports: tuple[PortRange, ...]
    host: str | None = None  # normalised A-label name; for "suffix" the part after "*."
    network: IPNetwork | None = None

    def __str__(self) -> str:
        if self.kind == "cidr":
            assert self.network is not None
            target = str(self.network)
            if self.network.version == 6 and self.ports != DEFAULT_PORTS:
                target = f"[{target}]"
        else:
            target = f"*.{self.host}" if self.kind == "suffix" else str(self.host)
        if self.ports == DEFAULT_PORTS:
            return target
        return f"{target}:{_ports_text(self.ports)}"

    def to_mapping(self) -> dict[str, Any]:
        key, value = ("cidr", str(self.network)) if self.kind == "cidr" else ("host", _target_text(self))
        return {key: value, "ports": [_range_text(r) for r in self.ports]}

    def matches(self, name: str | None, ip: IPAddress | None, port: int) -> bool:
        if not any(lo <= port <= hi for lo, hi in self.ports):
            return False
        if self.kind == "cidr":
            assert self.network is not None
            if ip is None:
                return False
            ip = unmapped(ip)
            return ip.version == self.network.version and ip in self.network
        if name is None:
            return False
        if self.kind == "host":
            return name == self.host
        return name.endswith("." + str(self.host))


@dataclass(frozen=True)
class RuleSet:
    """A union of rules from one origin (cluster default, a namespace policy, an annotation, a file)."""

    source: str
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Policy:
    """The intersection of its layers: a destination is allowed only when every layer allows it.

    No layers at all means default deny, so an empty or missing policy can never open the pod up.
    """

    layers: tuple[RuleSet, ...] = ()

    def narrowed(self, *extra: RuleSet) -> Policy:
        return Policy(layers=(*self.layers, *extra))

    def to_mapping(self) -> dict[str, Any]:
        """The resolved form the webhook writes into the pod spec (`OUTRIDER_CONFIG` egress.policy)."""
        return {
            "version": POLICY_VERSION,
            "layers": [
                {"source": layer.source, "allow": [rule.to_mapping() for rule in layer.rules]}
                for layer in self.layers
            ],
        }


@dataclass(frozen=True)
class Destination:
    """Where a connection wants to go, as far as the enforcer could tell."""

    port: int
    name: str | None = None  # normalised SNI / Host / CONNECT host name (never an IP literal)
    ip: IPAddress | None = None  # the original destination or the IP literal the client named


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str | None  # the matching rule of the narrowest layer; None for a denial
    source: str | None  # that rule's origin, or the layer that denied
    reason: str


# --- names ------------------------------------------------------------------------------------------


def normalize_name(raw: str) -> str:
    """Lower-case A-label form with no trailing dot; raises ValueError for a name that is not a host.

    IP literals are refused here on purpose: they are judged by CIDR rules only (`parse_ip`).
    """
    name = raw.strip().rstrip(".").lower()
    if not name:
        raise ValueError("empty host name")
    if parse_ip(name) is not None:
        raise ValueError("an IP address is not a host name (use a CIDR rule)")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"not a valid internationalised host name ({exc})") from None
    if len(name) > 253:
        raise ValueError("host name longer than 253 characters")
    labels = name.split(".")
    for label in labels:
        if not _ASCII_LABEL.match(label):
            raise ValueError(f"label {label!r} is not a valid host name label")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError as exc:
                raise ValueError(f"label {label!r} is not a valid IDNA A-label ({exc})") from None
    return name


def parse_ip(raw: str) -> IPAddress | None:
    """The address an IP literal names (`10.0.0.1`, `::1`, `[::1]`), or None for anything else."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]  # a zone id never widens anything: judge the address alone
    if ":" not in text and not text.replace(".", "").isdigit():
        # Neither form can parse (IPv4 is dotted decimal digits, IPv6 has colons): a host name
        # skips the two exceptions ipaddress would raise (~10 us per rule of an own allowlist).
        return None
    try:
        return unmapped(ipaddress.ip_address(text))
    except ValueError:
        return None


def unmapped(ip: IPAddress) -> IPAddress:
    """`::ffff:a.b.c.d` is IPv4 `a.b.c.d` on the wire (a dual-stack socket sends it over IPv4), so
    it is judged by IPv4 rules: otherwise an IPv6 rule like `::/0` would reach every IPv4 host."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# Cloud metadata and host-agent endpoints outside link-local, which hand out credentials as readily as
# 169.254.169.254: AWS IMDS and the EKS Pod Identity agent over IPv6 (fd00:ec2::254, ::23, in AWS's
# own fd00:ec2::/64), Google Cloud's and Oracle Cloud's metadata over IPv6, Alibaba Cloud's metadata
# (in 100.64.0.0/10) and Azure's WireServer.
CLOUD_METADATA = tuple(
    ipaddress.ip_network(n)
    for n in (
        "fd00:ec2::/64",
        "fd20:ce::254/128",
        "fd00:c1::a9fe:a9fe/128",
        "100.100.100.200/32",
        "168.63.129.16/32",
    )
)


def is_special(ip: IPAddress) -> bool:
    """Addresses a *name* may not lead to unless a CIDR rule allows them explicitly: loopback (the
    pod itself, the sidecar's own ports), link-local (cloud metadata at 169.254.169.254, fe80::),
    the clouds' other metadata endpoints (`CLOUD_METADATA`), unspecified (0.0.0.0 connects to the pod
    itself) and multicast."""
    ip = unmapped(ip)
    this_network = ip.version == 4 and ip.packed[0] == 0  # 0.0.0.0/8: "this host on this network"
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast or this_network:
        return True
    return any(ip in network for network in CLOUD_METADATA)


def address_allowed(policy: Policy, ip: IPAddress, port: int) -> bool:
    """Every layer allows this address by a CIDR rule alone (no name involved)."""
    return decide(policy, Destination(port=port, ip=unmapped(ip))).allowed


def connection_allowed(policy: Policy, name: str | None, ip: IPAddress, port: int) -> bool:
    """Would a connection to `ip` (for `name`, if it had one) be made under `policy`? Used to re-judge
    open tunnels when the policy narrows."""
    if address_allowed(policy, ip, port):
        return True
    return name is not None and bool(name_addresses(policy, name, [ip], port))


def name_addresses(policy: Policy, name: str, addresses: Iterable[IPAddress], port: int) -> list[IPAddress]:
    """The resolved addresses an allowed name may be reached at.

    Each must satisfy every layer together with the name (a layer that only has CIDR rules judges the
    address actually dialled, not the one the client chose), and special ones (`is_special`) need a
    CIDR rule: a name that an attacker can point anywhere (a wildcard rule, a rebinding resolver) must
    not become a road to the metadata service or the pod itself."""
    out: list[IPAddress] = []
    for address in addresses:
        address = unmapped(address)
        if address in out:
            continue
        if not decide(policy, Destination(port=port, name=name, ip=address)).allowed:
            continue
        if is_special(address) and not address_allowed(policy, address, port):
            continue
        out.append(address)
    return out


def destination_for(name_or_ip: str | None, port: int, original_ip: IPAddress | None = None) -> Destination:
    """Build a Destination from a client-supplied name: IP literals become addresses, bad names None."""
    if name_or_ip is None:
        return Destination(port=port, ip=original_ip)
    literal = parse_ip(name_or_ip)
    if literal is not None:
        return Destination(port=port, ip=literal)
    try:
        return Destination(port=port, name=normalize_name(name_or_ip), ip=original_ip)
    except ValueError:
        return Destination(port=port, ip=original_ip)


# --- rules ------------------------------------------------------------------------------------------


def _range_text(r: PortRange) -> str:
    if r == (1, 65535):
        return "*"
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _ports_text(ports: tuple[PortRange, ...]) -> str:
    return ",".join(_range_text(r) for r in ports)


def _target_text(rule: Rule) -> str:
    return f"*.{rule.host}" if rule.kind == "suffix" else str(rule.host)


def parse_port_spec(spec: object) -> tuple[PortRange, ...]:
    """`443`, `"443"`, `"8000-8100"` or `"*"` -> port ranges; raises ValueError naming the problem."""
    if isinstance(spec, bool):
        raise ValueError(f"port {spec!r} is not a number")
    if isinstance(spec, int):
        lo = hi = spec
    else:
        text = str(spec).strip()
        if text == "*":
            return ANY_PORT
        lo_text, sep, hi_text = text.partition("-")
        if not text.isascii() or not lo_text.isdigit() or (sep and not hi_text.isdigit()):
            raise ValueError(f"port {text!r} is not a number, a range like 8000-8100, or *")
        lo, hi = int(lo_text), int(hi_text) if sep else int(lo_text)
    if not (1 <= lo <= hi <= 65535):
        raise ValueError(f"port {spec!r} is outside 1-65535 (or the range is reversed)")
    return ((lo, hi),)


def _merge_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    merged: list[PortRange] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def _target_rule(target: str, ports: tuple[PortRange, ...]) -> Rule:
    target = target.strip()
    if not target:
        raise ValueError("empty rule")
    if "/" in target or parse_ip(target) is not None:
        text = target[1:-1] if target.startswith("[") and target.endswith("]") else target
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError("not a valid CIDR (like 10.0.0.0/8 or fd00::/8)") from None
        return Rule(kind="cidr", ports=ports, network=network)
    if target == "*" or target.startswith("*."):
        suffix = target[2:]
        if not suffix:
            raise ValueError("a bare '*' would allow every name; name a suffix like *.example.com")
        host = normalize_name(suffix)
        if "." not in host:
            raise ValueError("a wildcard needs at least two labels after '*.' (like *.example.com)")
        return Rule(kind="suffix", ports=ports, host=host)
    if "*" in target:
        raise ValueError("'*' is only allowed as the whole first label (like *.example.com)")
    return Rule(kind="host", ports=ports, host=normalize_name(target))


def parse_rule_text(text: str) -> Rule:
    """`name`, `name:443`, `*.suffix:8000-8100`, `10.0.0.0/8:*`, `[fd00::/8]:443`, `fd00::/8`."""
    text = text.strip()
    target, port_text = text, None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("missing ']' after an IPv6 address")
        target, rest = text[: close + 1], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("expected ':port' after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        target, port_text = text.split(":")
    ports = DEFAULT_PORTS if port_text is None else parse_port_spec(port_text)
    return _target_rule(target, ports)


def parse_rule(item: object) -> Rule:
    """A rule from its string form or a mapping `{host|cidr: ..., ports: [...]}`."""
    if isinstance(item, str):
        return parse_rule_text(item)
    if isinstance(item, Mapping):
        unknown = sorted(set(map(str, item)) - {"host", "cidr", "ports", "port"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; allowed: host, cidr, ports")
        targets = [k for k in ("host", "cidr") if k in item]
        if len(targets) != 1:
            raise ValueError("a rule mapping needs exactly one of 'host' or 'cidr'")
        target = str(item[targets[0]])
        if targets[0] == "cidr" and "/" not in target and parse_ip(target) is None:
            raise ValueError("not a valid CIDR (like 10.0.0.0/8 or fd00::/8)")
        if targets[0] == "host" and ("/" in target or parse_ip(target) is not None):
            raise ValueError("an IP address is not a host name (use a 'cidr' rule)")
        raw_ports = item.get("ports", item.get("port"))
        if raw_ports is None:
            ports = DEFAULT_PORTS
        else:
            seq = (
                raw_ports
                if isinstance(raw_ports, Sequence) and not isinstance(raw_ports, str)
                else [raw_ports]
            )
            if not seq:
                raise ValueError("'ports' is empty; leave it out for 80 and 443, or use '*'")
            ports = _merge_ranges(r for spec in seq for r in parse_port_spec(spec))
        return _target_rule(target, ports)
    raise ValueError(f"a rule must be a string or a mapping, not {type(item).__name__}")


def parse_rules(items: Iterable[object], origin: str) -> tuple[tuple[Rule, ...], tuple[RuleError, ...]]:
    """Parse every rule; the bad ones are returned as errors (text + origin) and left out."""
    rules: list[Rule] = []
    errors: list[RuleError] = []
    for index, item in enumerate(items):
        try:
            rule = parse_rule(item)
        except ValueError as exc:
            errors.append(RuleError(text=_item_text(item), origin=f"{origin} [{index}]", message=str(exc)))
            continue
        if rule not in rules:
            rules.append(rule)
    return tuple(rules), tuple(errors)


def split_annotation(value: str) -> list[str]:
    """`outrider.dev/egress-allow`: rules separated by commas, spaces or new lines."""
    return [part for part in re.split(r"[\s,]+", value) if part]


def _item_text(item: object) -> str:
    if isinstance(item, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in item.items())
    return str(item)


def _allow_list(data: Mapping[str, Any], origin: str) -> Sequence[object]:
    allow = data.get("allow", [])
    if allow is None:
        return []
    if isinstance(allow, str) or not isinstance(allow, Sequence):
        raise PolicyError(f"{origin}: 'allow' must be a list of rules, not {type(allow).__name__}")
    return allow


def parse_policy(data: Mapping[str, Any] | None, origin: str) -> tuple[Policy, tuple[RuleError, ...]]:
    """A policy document -> Policy (bad rules left out) and the rule errors.

    Two shapes: a plain `{allow: [...]}` (one layer named `origin`) or the resolved
    `{version: 1, layers: [{source, allow}]}` that the webhook writes. Raises PolicyError when the
    document as a whole is malformed.
    """
    if data is None:
        return Policy(), ()
    if not isinstance(data, Mapping):
        raise PolicyError(f"{origin}: an egress policy must be a mapping, not {type(data).__name__}")
    if "layers" in data:
        raw_layers = data["layers"]
        if isinstance(raw_layers, str) or not isinstance(raw_layers, Sequence):
            raise PolicyError(f"{origin}: 'layers' must be a list")
        layers: list[RuleSet] = []
        errors: list[RuleError] = []
        for index, raw in enumerate(raw_layers):
            if not isinstance(raw, Mapping):
                raise PolicyError(f"{origin}: layers[{index}] must be a mapping with 'source' and 'allow'")
            source = str(raw.get("source") or f"{origin} layer {index}")
            rules, errs = parse_rules(_allow_list(raw, source), source)
            layers.append(RuleSet(source=source, rules=rules))
            errors.extend(errs)
        return Policy(layers=tuple(layers)), tuple(errors)
    rules, errs = parse_rules(_allow_list(data, origin), origin)
    return Policy(layers=(RuleSet(source=origin, rules=rules),)), errs


def decide(policy: Policy, dest: Destination) -> Verdict:
    """Allowed only if every layer has a matching rule; the narrowest (last) layer's rule is reported."""
    if not policy.layers:
        return Verdict(False, None, None, "default deny: no egress policy")
    matched: Rule | None = None
    source: str | None = None
    for layer in policy.layers:
        rule = next((r for r in layer.rules if r.matches(dest.name, dest.ip, dest.port)), None)
        if rule is None:
            return Verdict(False, None, layer.source, f"default deny: no rule in {layer.source} matches")
        matched, source = rule, layer.source
    return Verdict(True, str(matched), source, f"allowed by {matched} ({source})")


def union(first: RuleSet, second: RuleSet, source: str) -> RuleSet:
    rules = list(first.rules)
    rules.extend(r for r in second.rules if r not in rules)
    return RuleSet(source=source, rules=tuple(rules))
