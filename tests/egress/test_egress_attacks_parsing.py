"""Red-team cases for the pure parts: hostile ClientHellos, Host headers, addresses and policy documents.

Each test names an attack a hostile MCP server could try and asserts the outcome the enforcer acts on
(a name it then resolves itself, or no name: judged by IP, i.e. denied without a CIDR rule).
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.sidecar.egress.policy import (
    Destination,
    Policy,
    RuleSet,
    address_allowed,
    decide,
    destination_for,
    is_special,
    name_addresses,
    parse_ip,
    parse_port_spec,
    parse_rule,
    parse_rules,
)
from outrider.sidecar.egress.reload import PolicyHolder, effective, parse_policy_file, spec_policy
from outrider.sidecar.egress.sniff import HTTP, NEED_MORE, TCP, TLS, parse_request_head, sniff
from outrider.webhook.egress import plan_egress

from .test_egress_sniff import client_hello

# --- hand-made ClientHellos -----------------------------------------------------------------------


def sni_extension(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + struct.pack("!H", len(n)) + n for n in names)
    return 0x0000, struct.pack("!H", len(entries)) + entries


def hello(*extensions: tuple[int, bytes], record_version: bytes = b"\x03\x01") -> bytes:
    exts = b"".join(struct.pack("!HH", t, len(body)) + body for t, body in extensions)
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(exts)) + exts
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16" + record_version + struct.pack("!H", len(message)) + message


def test_handmade_hello_matches_the_real_parser() -> None:
    assert sniff(hello(sni_extension(b"allowed.test"))) == sniff(client_hello("allowed.test"))


def test_client_hello_without_sni_has_no_name() -> None:
    for raw in (hello(), client_hello(None), hello((0x000A, b"\x00\x02\x00\x1d"))):
        found = sniff(raw)
        assert found.kind == TLS and found.name is None  # judged by IP alone: denied without a CIDR


def test_two_server_name_extensions_are_refused() -> None:
    found = sniff(hello(sni_extension(b"allowed.test"), sni_extension(b"denied.test")))
    assert found.kind == TLS and found.name is None and "more than one server_name" in found.detail


def test_two_host_names_in_one_extension_are_refused() -> None:
    found = sniff(hello(sni_extension(b"allowed.test", b"denied.test")))
    assert found.name is None and "more than one SNI host_name" in found.detail


def test_unknown_name_types_are_skipped_not_trusted() -> None:
    assert sniff(hello(sni_extension(b"denied.test", name_type=7))).name is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"ALLOWED.Test.", "allowed.test"),  # judged and resolved in its normal form
        (b"allowed.test..", "allowed.test"),
        (b"a" * 64 + b".test", None),  # overlong label: not a host name
        (b"allowed.test\x00.denied.test", None),  # NUL: refused by the parser
        (b"allowed test", None),
        (b"xn--bcher-kva.test", "xn--bcher-kva.test"),  # valid punycode stays an A-label
        (b"xn--zz.test", None),  # invalid punycode
        (b"*.allowed.test", None),
        (b"10.200.1.20", None),  # an IP literal in SNI never counts as a name
    ],
)
def test_sni_name_forms(raw: bytes, expected: str | None) -> None:
    found = sniff(hello(sni_extension(raw)))
    dest = destination_for(found.name, 443, ipaddress.ip_address("192.0.2.1"))
    assert dest.name == expected


def test_non_ascii_sni_is_refused() -> None:
    found = sniff(hello(sni_extension("bücher.test".encode())))
    assert found.name is None and "not ASCII" in found.detail


def test_ech_outer_name_is_what_is_judged() -> None:
    # Encrypted ClientHello: the inner name is invisible; the outer (public) name is judged and resolved,
    # so the connection can only reach the outer name's addresses (documented limitation).
    ech = (
        0xFE0D,
        b"\x00" + b"\x00\x01\x00\x01" + b"\x07" + b"\x00\x20" + b"\x11" * 32 + b"\x00\x10" + b"x" * 16,
    )
    assert sniff(hello(ech, sni_extension(b"public.test"))).name == "public.test"


def test_client_hello_split_byte_by_byte_needs_more_until_complete() -> None:
    raw = client_hello("allowed.test")
    for end in range(1, len(raw)):
        assert sniff(raw[:end]).kind == NEED_MORE, end
    assert sniff(raw).name == "allowed.test"


def test_oversized_hello_never_yields_a_name_before_it_is_complete() -> None:
    padded = hello((0x0015, b"\x00" * 20000), sni_extension(b"allowed.test"))
    assert padded[5] == 1
    # One record cannot carry it (max 16384 + 2048): malformed, no name.
    assert sniff(padded).name is None
    assert sniff(padded[:16384]).name is None


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 40,  # SSLv2-style ClientHello
        b"\x16\x02\x00\x00\x10" + b"\x00" * 16,  # major version 2
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # ServerHello first
        b"\x17\x03\x03\x00\x05hello",  # application data without a handshake
        b"\x00\x01\x02\x03",
    ],
)
def test_garbage_and_old_records_have_no_name(raw: bytes) -> None:
    assert sniff(raw).name is None


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_sniff_never_raises_on_garbage(data: bytes) -> None:
    found = sniff(b"\x16\x03\x01" + data)
    assert found.kind in (TLS, NEED_MORE)


# --- HTTP heads -----------------------------------------------------------------------------------


def http_name(head: bytes, port: int = 80) -> str | None:
    found = sniff(head)
    assert found.kind == HTTP, found
    return destination_for(found.name, port, ipaddress.ip_address("192.0.2.1")).name


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: allowed.test:8080\r\n\r\n", "allowed.test"),
        (b"GET / HTTP/1.1\r\nHost: ALLOWED.test.\r\n\r\n", "allowed.test"),
        (b"GET / HTTP/1.1\r\nHost: evil@allowed.test\r\n\r\n", None),  # userinfo is not a host
        (b"GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: denied.test\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nhost: allowed.test\r\nHOST: allowed.test\r\n\r\n", None),
        # absolute-form wins over Host (RFC 9112), for us as for the origin server
        (b"GET http://denied.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n", "denied.test"),
        (b"GET http://allowed.test@denied.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n", "denied.test"),
        (b"GET / HTTP/1.0\r\n\r\n", None),  # HTTP/1.0 without Host
        (b"GET / HTTP/1.1\r\nHost: allowed%2etest\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", None),  # an IP literal: no name
        (b"GET / HTTP/1.1\r\nHost: allowed.test:\xd9\xa4\xd9\xa4\xd9\xa3\r\n\r\n", None),  # Arabic digits
        (b"GET / HTTP/1.1\r\nHost: allowed.test\r\n folded: x\r\n\r\n", None),  # obs-fold
        (b"GET / HTTP/1.1\r\nHost : allowed.test\r\n\r\n", None),  # space before the colon
    ],
)
def test_http_host_forms(head: bytes, expected: str | None) -> None:
    assert http_name(head) == expected


def test_ipv6_literal_host_becomes_an_address() -> None:
    found = sniff(b"GET / HTTP/1.1\r\nHost: [fe80::1%25eth0]:80\r\n\r\n")
    dest = destination_for(found.name, 80)
    assert dest.name is None and dest.ip == ipaddress.ip_address("fe80::1")


def test_very_long_head_never_completes() -> None:
    head = b"GET / HTTP/1.1\r\nHost: allowed.test\r\nX: " + b"a" * 100_000
    assert parse_request_head(head) is None and sniff(head).kind == NEED_MORE


def test_non_http_methods_are_raw_tcp() -> None:
    assert sniff(b"SSH-2.0-OpenSSH\r\n").kind == TCP
    assert sniff(b"HELLO allowed.test\r\n").kind == TCP


# --- addresses ------------------------------------------------------------------------------------


def layers(*rule_lists: list[object]) -> Policy:
    out = []
    for index, rules in enumerate(rule_lists):
        parsed, errors = parse_rules(rules, f"layer {index}")
        assert not errors, errors
        out.append(RuleSet(f"layer {index}", parsed))
    return Policy(layers=tuple(out))


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    "text",
    ["169.254.169.254", "127.0.0.2", "0.0.0.0", "0.1.2.3", "::", "::1", "fe80::1", "ff02::1", "224.0.0.1",
     "::ffff:169.254.169.254", "::ffff:127.0.0.1"],
)  # fmt: skip
def test_special_addresses(text: str) -> None:
    assert is_special(ip(text))


def test_a_name_never_leads_to_metadata_or_loopback_without_a_cidr() -> None:
    p = layers(["*.attacker.test"])
    resolved = [ip("169.254.169.254"), ip("::ffff:127.0.0.1"), ip("0.0.0.0"), ip("10.0.0.7"), ip("fe80::1")]
    assert name_addresses(p, "x.attacker.test", resolved, 443) == [ip("10.0.0.7")]
    assert name_addresses(
        layers(["*.attacker.test", "169.254.169.254/32:443"]), "x.attacker.test", resolved, 443
    ) == [
        ip("169.254.169.254"),
        ip("10.0.0.7"),
    ]
    # A CIDR for the metadata address in one layer only is not enough.
    both = layers(["*.attacker.test", "169.254.0.0/16:443"], ["*.attacker.test"])
    assert name_addresses(both, "x.attacker.test", resolved, 443) == [ip("10.0.0.7")]


def test_metadata_ip_literal_is_denied_unless_a_cidr_allows_it() -> None:
    p = layers(["allowed.test", "10.0.0.0/8:*"])
    for literal in ("169.254.169.254", "::ffff:169.254.169.254", "[::ffff:a9fe:a9fe]"):
        assert not decide(p, destination_for(literal, 80)).allowed, literal


def test_mapped_addresses_are_judged_as_ipv4() -> None:
    assert parse_ip("::ffff:10.1.2.3") == ip("10.1.2.3")
    assert decide(layers(["10.0.0.0/8:443"]), destination_for("[::ffff:10.1.2.3]", 443)).allowed
    assert not decide(layers(["[::/0]:*"]), destination_for("[::ffff:10.1.2.3]", 443)).allowed


def test_zone_ids_do_not_change_the_address() -> None:
    assert parse_ip("fe80::1%eth0") == ip("fe80::1") and parse_ip("[fe80::1%25lo]") is not None


def test_a_cidr_layer_does_not_widen_a_name_layer() -> None:
    # Operator: only allowed.test. Narrowing (annotation/file): 10.0.0.0/8:443. A forged SNI
    # "allowed.test" sent to 10.9.9.9 matches both layers, yet 10.9.9.9 is no address of allowed.test:
    # the address itself is not allowed, so the enforcer must connect to allowed.test's resolution.
    p = layers(["allowed.test"], ["10.0.0.0/8:443"])
    dest = Destination(port=443, name="allowed.test", ip=ip("10.9.9.9"))
    assert decide(p, dest).allowed
    assert not address_allowed(p, ip("10.9.9.9"), 443)
    assert address_allowed(layers(["10.0.0.0/8:443"], ["10.9.0.0/16:443"]), ip("10.9.9.9"), 443)
    # The name's own addresses are then held to the CIDR-only layer too.
    resolved = [ip("10.1.1.1"), ip("192.0.2.7"), ip("fd00::1")]
    assert name_addresses(p, "allowed.test", resolved, 443) == [ip("10.1.1.1")]
    assert name_addresses(layers(["allowed.test"], ["10.9.0.0/16:443"]), "allowed.test", resolved, 443) == []


# --- policy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "name", "allowed"),
    [
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "example.com.evil.test", False),
        ("example.com", "a.example.com", False),
        ("example.com", "badexample.com", False),
        ("example.com", "EXAMPLE.com.", True),
        ("xn--pypal-4ve.com", "paypal.com", False),  # Cyrillic-a homograph rule does not allow the real one
        ("p\u0430ypal.com", "xn--pypal-4ve.com", True),  # the Unicode rule is the same A-label
        ("paypal.com", "p\u0430ypal.com", False),
    ],
)
def test_name_matching(rule: str, name: str, allowed: bool) -> None:
    assert decide(layers([rule]), destination_for(name, 443)).allowed is allowed


@pytest.mark.parametrize(
    "text",
    ["*", "*.", "*.com", "**.example.com", "*example.com", "a.*.example.com", "*.*.example.com", ".",
     "example.com:0", "example.com:65536", "example.com:443-80", "example.com:-1", "example.com:+443",
     "example.com:\u0664\u0664\u0663", "example.com:\u00b2", "example.com:443:80", "exa mple.com",
     "[::1", "10.0.0.0/33", "300.1.1.1/8", "", "   "],
)  # fmt: skip
def test_bad_rules_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rule(text)


def test_port_edges() -> None:
    assert parse_port_spec("1-65535") == ((1, 65535),) and parse_port_spec(65535) == ((65535, 65535),)
    with pytest.raises(ValueError):
        parse_port_spec(True)


def test_zero_prefix_cidrs_parse_but_are_reported_by_the_webhook() -> None:
    assert str(parse_rule("0.0.0.0/0:*").network) == "0.0.0.0/0"
    plan = plan_egress({"metadata": {}}, {}, {"allow": ["0.0.0.0/0:*", "[::/0]:443"]}, None)
    assert sum("every IPv4 address" in w or "every IPv6 address" in w for w in plan.warnings) == 2


NAMES = ["a.test", "b.test", "x.a.test", "c.other.test", "10.0.0.1", "10.9.0.1", "fd00::1"]
RULES = ["a.test", "*.a.test", "b.test:*", "*.other.test:443", "10.0.0.0/8:443", "10.0.0.0/24:*",
         "[fd00::/8]:443", "c.other.test:8000-9000", "0.0.0.0/0:*", "junk..", "*", "x.a.test:80"]  # fmt: skip


@given(
    operator=st.lists(st.sampled_from(RULES), max_size=5),
    annotation=st.lists(st.sampled_from(RULES), max_size=5),
    name=st.sampled_from(NAMES),
    port=st.sampled_from([80, 443, 8443, 8500]),
)
@settings(max_examples=400, deadline=None)
def test_the_annotation_can_never_widen(
    operator: list[str], annotation: list[str], name: str, port: int
) -> None:
    pod = {"metadata": {"annotations": {"outrider.dev/egress-allow": ",".join(annotation)}}}
    without = plan_egress({"metadata": {}}, {}, {"allow": operator}, None)
    narrowed = plan_egress(pod, {}, {"allow": operator}, None)
    base, _ = spec_policy(without.policy)
    both, _ = spec_policy(narrowed.policy)
    dest = destination_for(name, port, ip("10.0.0.1"))
    if decide(both, dest).allowed:
        assert decide(base, dest).allowed
    if dest.ip is not None and address_allowed(both, dest.ip, port):
        assert address_allowed(base, dest.ip, port)


@given(
    spec_rules=st.lists(st.sampled_from(RULES), max_size=5),
    file_rules=st.lists(st.sampled_from(RULES), max_size=5),
    name=st.sampled_from(NAMES),
    port=st.sampled_from([80, 443, 8443]),
)
@settings(max_examples=300, deadline=None)
def test_the_narrowing_file_can_never_widen(
    spec_rules: list[str], file_rules: list[str], name: str, port: int
) -> None:
    spec, _ = spec_policy({"allow": spec_rules})
    result = parse_policy_file(repr({"allow": file_rules}), "file")
    merged = effective(spec, result.policy)
    dest = destination_for(name, port, ip("10.0.0.1"))
    if decide(merged, dest).allowed:
        assert decide(spec, dest).allowed


@pytest.mark.parametrize(
    "text",
    ["allow: [a.test", "allow: 'a.test'", "- a.test", "allow: [{host: a.test, cidr: 10.0.0.0/8}]",
     "layers: {}", "\x00\x01binary", "allow: ['*']", "allow: [a.test, 'bad rule']"],
)  # fmt: skip
def test_malformed_narrowing_file_keeps_the_last_good_policy(text: str, tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "policy.yaml"
    spec, _ = spec_policy({"allow": ["a.test", "b.test"]})
    holder = PolicyHolder(spec=spec, path=path)
    path.write_text("allow: [a.test]\n")
    assert holder.check()
    good = holder.current
    path.write_text(text)
    assert not holder.check() and holder.current == good and holder.last_error
    assert not decide(holder.current, destination_for("b.test", 443)).allowed


def test_resolver_config() -> None:
    from outrider.sidecar.config import ConfigError
    from outrider.sidecar.egress.config import EgressConfig

    assert EgressConfig.from_mapping({}).resolver == "dns"  # never /etc/hosts by default
    assert EgressConfig.from_mapping({"resolver": "system", "idle_timeout_s": 0}).idle_timeout_s == 0
    for bad in ({"resolver": "hosts"}, {"resolv_conf": ""}, {"idle_timeout_s": -1}):
        with pytest.raises(ConfigError):
            EgressConfig.from_mapping(bad)


async def test_dns_resolver_never_asks_loopback_servers(tmp_path: object) -> None:
    from pathlib import Path

    from outrider.sidecar.egress.component import build_resolver
    from outrider.sidecar.egress.config import EgressConfig
    from outrider.sidecar.egress.resolver import DnsResolver, unresolvable

    conf = Path(str(tmp_path)) / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver 10.96.0.10\nsearch svc.cluster.local\n")
    assert DnsResolver(str(conf)).nameservers == ["10.96.0.10"]
    conf.write_text("nameserver 127.0.0.1\nnameserver ::1\n")  # e.g. rewritten by a root app
    with pytest.raises(OSError):
        DnsResolver(str(conf))
    resolver = build_resolver(EgressConfig(resolv_conf=str(conf)))
    assert resolver is unresolvable  # fails closed, never falls back to getaddrinfo and /etc/hosts
    with pytest.raises(OSError):
        await resolver("allowed.test", 443)
