"""The allowlist model: rule parsing, name normalisation, decisions and intersection (pure, no sockets)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.sidecar.egress.policy import (
    Destination,
    Policy,
    PolicyError,
    RuleSet,
    Verdict,
    decide,
    destination_for,
    normalize_name,
    parse_ip,
    parse_policy,
    parse_rule,
    parse_rules,
)


def policy(*rules: object, source: str = "test") -> Policy:
    parsed, errors = parse_rules(rules, source)
    assert not errors, errors
    return Policy(layers=(RuleSet(source, parsed),))


def allowed(p: Policy, name_or_ip: str, port: int, original: str | None = None) -> bool:
    ip = ipaddress.ip_address(original) if original else None
    return decide(p, destination_for(name_or_ip, port, ip)).allowed


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        ("  API.example.com.  ", "api.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("my_service.internal", "my_service.internal"),
    ],
)
def test_normalize_name(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


@pytest.mark.parametrize(
    "raw", ["", ".", "10.0.0.1", "::1", "[::1]", "a..b", "-a.com", "a b.com", "xn--zz.com"]
)
def test_normalize_name_refuses(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_name(raw)


def test_exact_name_default_ports() -> None:
    p = policy("api.example.com")
    assert allowed(p, "api.example.com", 443)
    assert allowed(p, "API.Example.com.", 80)
    assert not allowed(p, "api.example.com", 8443)
    assert not allowed(p, "other.example.com", 443)
    assert not allowed(p, "x.api.example.com", 443)


def test_wildcard_matches_subdomains_only() -> None:
    p = policy("*.example.com:443")
    assert allowed(p, "a.example.com", 443)
    assert allowed(p, "a.b.example.com", 443)
    assert not allowed(p, "example.com", 443)
    assert not allowed(p, "badexample.com", 443)
    assert not allowed(p, "a.example.com", 80)


def test_idna_rule_matches_both_forms() -> None:
    p = policy("bücher.example:443")
    assert allowed(p, "xn--bcher-kva.example", 443)
    assert allowed(p, "BÜCHER.example.", 443)


def test_ip_literal_only_matches_cidr() -> None:
    p = policy("example.com", "10.0.0.0/8:5432", "[fd00::/8]:443")
    assert not allowed(p, "93.184.216.34", 443)
    assert allowed(p, "10.1.2.3", 5432)
    assert not allowed(p, "10.1.2.3", 443)
    assert allowed(p, "[fd00::1]", 443)
    assert not allowed(p, "fe80::1", 443)


def test_cidr_rule_never_matches_other_family() -> None:
    p = policy("0.0.0.0/0:*")
    assert allowed(p, "1.2.3.4", 22)
    # A mapped address travels as IPv4 (dual-stack sockets), so it is judged as the IPv4 address ...
    assert allowed(p, "::ffff:1.2.3.4", 22)
    # ... and an IPv6 rule never reaches IPv4 hosts through it.
    assert not allowed(policy("[::/0]:*"), "::ffff:1.2.3.4", 22)
    assert not decide(p, Destination(port=22, ip=ipaddress.ip_address("2001:db8::1"))).allowed


def test_ports_ranges_and_any() -> None:
    p = policy("a.test:8000-8100", "b.test:*", {"host": "c.test", "ports": [22, "30-31"]})
    assert allowed(p, "a.test", 8050) and not allowed(p, "a.test", 8101)
    assert allowed(p, "b.test", 1) and allowed(p, "b.test", 65535)
    assert allowed(p, "c.test", 22) and allowed(p, "c.test", 31) and not allowed(p, "c.test", 443)


def test_default_deny_and_empty_policy() -> None:
    assert decide(Policy(), Destination(port=443, name="a.test")).reason.startswith("default deny")
    empty = policy()
    verdict = decide(empty, Destination(port=443, name="a.test"))
    assert not verdict.allowed and verdict.rule is None


def test_intersection_only_narrows() -> None:
    operator = RuleSet("operator", parse_rules(["*.example.com", "10.0.0.0/8:*"], "operator")[0])
    team = RuleSet("annotation", parse_rules(["api.example.com:443", "evil.test", "10.0.0.0/8:5432"], "a")[0])
    p = Policy((operator, team))
    assert allowed(p, "api.example.com", 443)
    assert not allowed(p, "api.example.com", 80)  # the team narrowed the ports
    assert not allowed(p, "evil.test", 443)  # the team cannot add a name
    assert allowed(p, "10.1.1.1", 5432) and not allowed(p, "10.1.1.1", 22)
    verdict = decide(p, Destination(port=443, name="api.example.com"))
    assert verdict.rule == "api.example.com:443" and verdict.source == "annotation"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("*", "bare"),
        ("*.com", "two labels"),
        ("a.*.com", "first label"),
        ("a.test:0", "outside"),
        ("a.test:99999", "outside"),
        ("a.test:http", "not a number"),
        ("10.0.0.0/33", "CIDR"),
        ("[fd00::/8", "]"),
        ({"host": "10.0.0.1"}, "IP address"),
        ({"host": "a.test", "cidr": "10.0.0.0/8"}, "exactly one"),
        ({"host": "a.test", "prt": 1}, "unknown"),
        ({"host": "a.test", "ports": []}, "empty"),
        (42, "string or a mapping"),
    ],
)
def test_bad_rules_name_the_problem(rule: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rule(rule)


def test_bad_rule_reported_with_text_and_origin_and_left_out() -> None:
    p, errors = parse_policy({"allow": ["good.test", "bad..test", "*"]}, "namespace shop policy")
    assert [str(r) for r in p.layers[0].rules] == ["good.test"]
    assert [e.text for e in errors] == ["bad..test", "*"]
    assert errors[0].origin == "namespace shop policy [1]"
    assert "namespace shop policy [1]: egress rule 'bad..test'" in str(errors[0])


def test_policy_document_shapes() -> None:
    with pytest.raises(PolicyError):
        parse_policy({"allow": "a.test"}, "x")  # type: ignore[arg-type]
    with pytest.raises(PolicyError):
        parse_policy({"layers": {"source": "x"}}, "x")
    assert parse_policy(None, "x") == (Policy(), ())


def test_resolved_mapping_round_trips() -> None:
    p = Policy(
        (
            RuleSet("cluster default", parse_rules(["a.test", "*.b.test:443", "10.0.0.0/8:1-1024"], "c")[0]),
            RuleSet("annotation", parse_rules(["a.test:80", "[fd00::/8]:443"], "a")[0]),
        )
    )
    again, errors = parse_policy(p.to_mapping(), "pod spec")
    assert not errors
    assert again == p


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
# Dotted all-digit names such as 0.0.0.0 are IP literals, judged by CIDR rules: not names.
_names = st.lists(_label, min_size=2, max_size=4).map(".".join).filter(lambda n: parse_ip(n) is None)
_ports = st.integers(min_value=1, max_value=65535)


@given(name=_names, port=_ports, upper=st.booleans(), dot=st.booleans())
@settings(deadline=None)  # never fail on a busy machine's timing
def test_name_forms_agree(name: str, port: int, upper: bool, dot: bool) -> None:
    p = policy(f"{name}:{port}")
    spelled = (name.upper() if upper else name) + ("." if dot else "")
    assert allowed(p, spelled, port)
    assert not allowed(p, name, port % 65535 + 1)


@given(
    operator=st.lists(_names, max_size=4),
    team=st.lists(_names, max_size=4),
    probe=_names,
    port=st.sampled_from([80, 443, 8080]),
)
@settings(deadline=None)  # never fail on a busy machine's timing
def test_annotation_never_widens(operator: list[str], team: list[str], probe: str, port: int) -> None:
    base = policy(*operator, source="operator")
    narrowed = base.narrowed(RuleSet("annotation", parse_rules(team, "annotation")[0]))
    if allowed(narrowed, probe, port):
        assert allowed(base, probe, port)


@given(a=st.ip_addresses(v=4), prefix=st.integers(min_value=0, max_value=32), port=_ports)
@settings(deadline=None)  # never fail on a busy machine's timing
def test_cidr_membership_matches_ipaddress(a: ipaddress.IPv4Address, prefix: int, port: int) -> None:
    network = ipaddress.ip_network(f"{a}/{prefix}", strict=False)
    p = policy(f"{network}:*")
    inside = network.network_address + (network.num_addresses - 1)
    assert allowed(p, str(inside), port)
    if prefix > 0:
        outside = ipaddress.ip_address((int(network.network_address) + network.num_addresses) % 2**32)
        assert allowed(p, str(outside), port) == (outside in network)


# --- decisions pinned down by mutation testing (issue 17) --------------------------------------


def _ports(item: dict[str, object]) -> tuple[tuple[int, int], ...]:
    return parse_rule(item).ports


def _allowed_ports(item: dict[str, object], *ports: int) -> list[bool]:
    pol = policy(item)
    return [decide(pol, Destination(port=p, name="api.example.com")).allowed for p in ports]


@pytest.mark.parametrize(
    ("ports", "merged"),
    [
        (["8000-8100", "8050-8200"], ((8000, 8200),)),  # overlapping
        (["8101-8200", "8000-8100"], ((8000, 8200),)),  # adjacent, in any order
        (["8000-8200", "8050-8060"], ((8000, 8200),)),  # contained: the wider end is kept
        (["8000-8100", "8102-8200"], ((8000, 8100), (8102, 8200))),  # a one-port gap stays a gap
        ([443, "443"], ((443, 443),)),
    ],
)
def test_port_ranges_merge_without_widening(ports: list[object], merged: tuple[tuple[int, int], ...]) -> None:
    item: dict[str, object] = {"host": "api.example.com", "ports": ports}
    assert _ports(item) == merged
    lo, hi = merged[0][0], merged[-1][1]
    inside = [p for p in range(lo - 1, hi + 2) if any(a <= p <= b for a, b in merged)]
    judged = _allowed_ports(item, *range(lo - 1, hi + 2))
    assert [p for p, ok in zip(range(lo - 1, hi + 2), judged, strict=True) if ok] == inside


def test_singular_port_key_is_honoured() -> None:
    item: dict[str, object] = {"host": "api.example.com", "port": 8443}
    assert _ports(item) == ((8443, 8443),)
    assert _allowed_ports(item, 8443, 443, 80) == [True, False, False]
    assert _ports({"host": "api.example.com", "port": "9000-9001"}) == ((9000, 9001),)


def test_bare_string_ports_is_one_range_not_characters() -> None:
    item: dict[str, object] = {"host": "api.example.com", "ports": "8000-8100"}
    assert _ports(item) == ((8000, 8100),)
    assert _allowed_ports(item, 7999, 8000, 8100, 8101, 8) == [False, True, True, False, False]


@pytest.mark.parametrize("target", ["example.com", "api", "*.example.com"])
def test_cidr_key_holding_a_host_name_is_refused(target: str) -> None:
    with pytest.raises(ValueError, match="not a valid CIDR"):
        parse_rule({"cidr": target})
    _, errors = parse_rules([{"cidr": target}], "ns")
    assert [e.origin for e in errors] == ["ns [0]"]


def test_bracketed_ipv6_with_a_port() -> None:
    rule = parse_rule("[fd00::/8]:8443")
    assert rule.kind == "cidr" and rule.ports == ((8443, 8443),)
    assert str(rule) == "[fd00::/8]:8443"
    pol = policy("[fd00::/8]:8443")
    ip = ipaddress.ip_address("fd00::1")
    assert decide(pol, Destination(port=8443, ip=ip)).allowed
    assert not decide(pol, Destination(port=443, ip=ip)).allowed
    assert not decide(pol, Destination(port=8443, ip=ipaddress.ip_address("fe00::1"))).allowed
    assert str(parse_rule("[fd00::/8]")) == "fd00::/8"
    assert parse_rule("[fd00::1]:*").ports == ((1, 65535),)
    for bad in ("[fd00::/8]8443", "[fd00::/8:443"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_reload_keeps_open_only_the_tunnels_the_new_policy_allows() -> None:
    from outrider.sidecar.egress.policy import connection_allowed

    ip = ipaddress.ip_address("203.0.113.7")
    by_name = policy("api.example.com:443")
    assert connection_allowed(by_name, "api.example.com", ip, 443)  # a tunnel opened by name stays
    assert not connection_allowed(by_name, None, ip, 443)  # an IP-only tunnel has no name to match
    assert not connection_allowed(by_name, "api.example.com", ip, 8443)
    assert not connection_allowed(by_name, "other.example.com", ip, 443)
    by_cidr = policy("203.0.113.0/24:443")
    assert connection_allowed(by_cidr, None, ip, 443)
    assert connection_allowed(by_cidr, "anything.example", ip, 443)
    # a name may not keep a tunnel to a special address open without a CIDR rule for it
    assert not connection_allowed(by_name, "api.example.com", ipaddress.ip_address("169.254.169.254"), 443)
    assert not connection_allowed(Policy(), "api.example.com", ip, 443)


def test_resolved_form_is_exact() -> None:
    pol = policy({"host": "*.example.com", "ports": ["8000-8100", 443]}, "10.0.0.0/8:*", source="ns")
    assert pol.to_mapping() == {
        "version": 1,
        "layers": [
            {
                "source": "ns",
                "allow": [
                    {"host": "*.example.com", "ports": ["443", "8000-8100"]},
                    {"cidr": "10.0.0.0/8", "ports": ["*"]},
                ],
            }
        ],
    }


def test_name_addresses_skips_repeats_and_special_ones_but_keeps_going() -> None:
    from outrider.sidecar.egress.policy import name_addresses

    pol = policy("*.example.com:443")
    a, b = ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("203.0.113.8")
    metadata = ipaddress.ip_address("169.254.169.254")
    mapped = ipaddress.ip_address("::ffff:203.0.113.7")
    assert name_addresses(pol, "api.example.com", [a, mapped, metadata, b], 443) == [a, b]
    narrow = policy("api.example.com:443").narrowed(
        RuleSet("ns", parse_rules(["203.0.113.8/32:443"], "ns")[0])
    )
    assert name_addresses(narrow, "api.example.com", [a, b], 443) == [b]


def test_rule_errors_show_mappings_as_written() -> None:
    _, errors = parse_rules([{"host": "bad host", "ports": [443]}], "pod")
    assert [str(e) for e in errors] == [
        "pod [0]: egress rule 'host: bad host, ports: [443]': label 'bad host' is not a valid host name label"
    ]


@pytest.mark.parametrize(
    ("allow", "kind"), [("api.example.com", "str"), ({"host": "a.example"}, "dict"), (7, "int")]
)
def test_allow_must_be_a_list(allow: object, kind: str) -> None:
    with pytest.raises(PolicyError, match=rf"^ns: 'allow' must be a list of rules, not {kind}$"):
        parse_policy({"allow": allow}, "ns")
    with pytest.raises(PolicyError, match=rf"^L: 'allow' must be a list of rules, not {kind}$"):
        parse_policy({"layers": [{"source": "L", "allow": allow}]}, "ns")


def test_union_keeps_both_sides_once_under_the_new_source() -> None:
    from outrider.sidecar.egress.policy import union

    first = RuleSet("a", parse_rules(["a.example", "b.example"], "a")[0])
    second = RuleSet("b", parse_rules(["b.example", "c.example"], "b")[0])
    merged = union(first, second, "a+b")
    assert merged.source == "a+b"
    assert [str(r) for r in merged.rules] == ["a.example", "b.example", "c.example"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (["a.example"], "f: an egress policy must be a mapping, not list"),
        ({"layers": "a.example"}, "f: 'layers' must be a list"),
        ({"layers": {"source": "x"}}, "f: 'layers' must be a list"),
        (
            {"layers": [{"source": "x", "allow": []}, "a.example"]},
            "f: layers[1] must be a mapping with 'source' and 'allow'",
        ),
    ],
)
def test_malformed_documents_say_where(data: object, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(data, "f")  # type: ignore[arg-type]
    assert str(err.value) == message


def test_plain_and_layered_documents_name_their_sources() -> None:
    plain, _ = parse_policy({"allow": ["a.example"]}, "file")
    assert [layer.source for layer in plain.layers] == ["file"]
    verdict = decide(plain, Destination(port=443, name="a.example"))
    assert (verdict.allowed, verdict.source, verdict.rule) == (True, "file", "a.example")
    layered, _ = parse_policy(
        {"layers": [{"allow": ["a.example"]}, {"source": "ns", "allow": ["b.example"]}]}, "f"
    )
    assert [layer.source for layer in layered.layers] == ["f layer 0", "ns"]
    denied = decide(layered, Destination(port=443, name="a.example"))
    assert (denied.allowed, denied.source) == (False, "ns")
    assert denied.reason == "default deny: no rule in ns matches"
    assert parse_policy(None, "f") == (Policy(), ())
    assert (
        decide(Policy(), Destination(port=443, name="a.example")).reason == "default deny: no egress policy"
    )


def test_names_normalise_with_uts46_and_length_edges() -> None:
    assert normalize_name(" API.Example.COM. ") == "api.example.com"
    assert normalize_name("ｅｘａｍｐｌｅ.com") == "example.com"  # noqa: RUF001 (fullwidth, mapped by UTS 46)
    assert normalize_name("Bücher.example") == "xn--bcher-kva.example"
    label = "a" * 63
    exact = ".".join([label, label, label, "a" * 61])  # 253 characters
    assert normalize_name(exact) == exact
    with pytest.raises(ValueError, match=r"^host name longer than 253 characters$"):
        normalize_name(exact + "a")
    for raw, message in (
        ("  . ", "empty host name"),
        ("10.0.0.1", "an IP address is not a host name (use a CIDR rule)"),
        ("[::1]", "an IP address is not a host name (use a CIDR rule)"),
    ):
        with pytest.raises(ValueError) as err:
            normalize_name(raw)
        assert str(err.value) == message
    with pytest.raises(ValueError, match=r"^not a valid internationalised host name \("):
        normalize_name("a\u200db.example")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("*.example.com", "*.example.com"),
        ("*.example.com:8443", "*.example.com:8443"),
        ("api.example.com:*", "api.example.com:*"),
        ("api.example.com:80,443", "api.example.com"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("[fd00::/8]:443", "[fd00::/8]:443"),
    ],
)
def test_rules_print_as_written(text: str, shown: str) -> None:
    rule = (
        parse_rule(text) if "," not in text else parse_rule({"host": "api.example.com", "ports": [80, 443]})
    )
    assert str(rule) == shown


def test_destination_for_keeps_port_and_original_address() -> None:
    original = ipaddress.ip_address("203.0.113.9")
    assert destination_for(None, 8443, original) == Destination(port=8443, ip=original)
    assert destination_for("API.example.com", 443, original) == Destination(
        port=443, name="api.example.com", ip=original
    )
    assert destination_for("bad name!", 80, original) == Destination(port=80, ip=original)
    assert destination_for("[::1]", 80, original) == Destination(port=80, ip=ipaddress.ip_address("::1"))


def test_bad_labels_name_the_label() -> None:
    with pytest.raises(ValueError) as err:
        normalize_name("ok.-bad-.example")
    assert str(err.value) == "label '-bad-' is not a valid host name label"
    with pytest.raises(ValueError, match=r"^label 'xn--zz' is not a valid IDNA A-label \("):
        normalize_name("xn--zz.example")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("  ", "empty rule"),
        ("[fd00::/8", "missing ']' after an IPv6 address"),
        ("[fd00::/8]443", "expected ':port' after ']'"),
    ],
)
def test_rule_text_errors(text: str, message: str) -> None:
    _, errors = parse_rules([text], "pod")
    assert [e.message for e in errors] == [message]


def test_verdicts_in_full() -> None:
    assert decide(Policy(), Destination(port=443, name="a.example")).allowed is False
    pol = policy("a.example")
    assert decide(pol, Destination(port=443, name="a.example")) == Verdict(
        True, "a.example", "test", "allowed by a.example (test)"
    )
    assert decide(pol, Destination(port=443, name="b.example")) == Verdict(
        False, None, "test", "default deny: no rule in test matches"
    )


def test_a_trailing_capital_x_is_part_of_the_name() -> None:
    """Only trailing dots are dropped before lower-casing: `EXAMPLE.COMX` is not `example.com`."""
    from outrider.sidecar.egress.policy import normalize_name

    assert normalize_name("API.EXAMPLEX.") == "api.examplex"
    assert normalize_name("hostX") == "hostx"


def test_rule_errors_in_layers_name_their_layer() -> None:
    from outrider.sidecar.egress.policy import RuleError, parse_policy

    document = {"version": 1, "layers": [{"source": "team annotation", "allow": ["ok.example", "bad host!"]}]}
    _, errors = parse_policy(document, "pod")
    assert errors == (
        RuleError("bad host!", "team annotation [1]", "label 'bad host!' is not a valid host name label"),
    )


def test_port_lists_print_with_commas_and_bracket_errors_are_exact() -> None:
    from outrider.sidecar.egress.policy import parse_rule, parse_rules

    assert str(parse_rule({"host": "a.example", "ports": [80, "443-445"]})) == "a.example:80,443-445"
    _, errors = parse_rules(["[::1]:80]", "[::1]]:443"], "x")
    assert [e.message for e in errors] == [
        "port '80]' is not a number, a range like 8000-8100, or *",
        "expected ':port' after ']'",
    ]


def test_half_bracketed_cidrs_and_boolean_ports_are_refused() -> None:
    """`10.0.0.0/8]` must not lose its first and last character and become `0.0.0.0/8`."""
    from outrider.sidecar.egress.policy import parse_rule, parse_rules

    rules, errors = parse_rules(["10.0.0.0/8]", "fd00::/8]"], "x")
    assert (
        rules == () and [e.message for e in errors] == ["not a valid CIDR (like 10.0.0.0/8 or fd00::/8)"] * 2
    )
    with pytest.raises(ValueError, match=r"^port True is not a number$"):
        parse_rule({"host": "a.example", "ports": [True]})


def test_rule_refusals_in_full_and_host_bits_are_masked() -> None:
    from outrider.sidecar.egress.policy import parse_rules

    items: list[object] = [
        "10.0.0.1/8",
        "not/a/cidr",
        "*",
        "*.com",
        "a.*.example.com",
        {"host": "a.example", "cidr": "10.0.0.0/8"},
        {"cidr": "nope"},
        {"host": "10.0.0.0/8"},
    ]
    rules, errors = parse_rules(items, "x")
    assert [str(r) for r in rules] == ["10.0.0.0/8"]  # host bits set: the network it names
    assert [e.message for e in errors] == [
        "not a valid CIDR (like 10.0.0.0/8 or fd00::/8)",
        "a bare '*' would allow every name; name a suffix like *.example.com",
        "a wildcard needs at least two labels after '*.' (like *.example.com)",
        "'*' is only allowed as the whole first label (like *.example.com)",
        "a rule mapping needs exactly one of 'host' or 'cidr'",
        "not a valid CIDR (like 10.0.0.0/8 or fd00::/8)",
        "an IP address is not a host name (use a 'cidr' rule)",
    ]


def test_ip_literal_edges_and_mapping_rule_defaults() -> None:
    from outrider.sidecar.egress.policy import DEFAULT_PORTS, parse_ip, parse_rule

    assert str(parse_ip("fe80::1%eth0%odd")) == "fe80::1"  # everything after the first '%' is the zone
    assert parse_ip("10.0.0.1]") is None and parse_ip("[::1") is None  # half brackets: not an address
    assert str(parse_ip("[::1]")) == "::1"
    rule = parse_rule({"host": "a.example"})
    assert rule.ports == DEFAULT_PORTS and str(rule) == "a.example"
    for bad, message in (
        ({"host": "a.example", "ports": []}, "'ports' is empty; leave it out for 80 and 443, or use '*'"),
        (5, "a rule must be a string or a mapping, not int"),
    ):
        with pytest.raises(ValueError) as caught:
            parse_rule(bad)
        assert str(caught.value) == message


def _ip_oracle(raw: str) -> object:
    """What `parse_ip` means, spelt with `ipaddress` alone (no fast path for names)."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@pytest.mark.parametrize(
    "raw",
    [
        "10.0.0.1",
        " 10.0.0.1 ",
        "[10.0.0.1]",
        "10.0.0.1%eth0",
        "1.2.3",
        "1.2.3.4.5",
        "01.2.3.4",
        "256.1.1.1",
        "1..2.3",
        "....",
        "1234",
        "",
        "[]",
        "%",
        "\u0661.\u0662.\u0663.\u0664",  # Arabic-Indic digits: isdigit() says yes, ipaddress says no
        "\uff11.\uff12.\uff13.\uff14",  # full-width digits
        "\u00b21.2.3.4",
        "::",
        "::1",
        "[::ffff:10.1.2.3]",
        "fe80::1%eth0",
        "1:2",
        "a.example.com",
        "10.0.0.1a",
        "a10.0.0.1",
        "10.0.0.1/8",
    ],
)
def test_parse_ip_matches_ipaddress_on_every_shape(raw: str) -> None:
    # parse_ip skips ipaddress for text that can be neither form; the answer must be what it would say.
    assert parse_ip(raw) == _ip_oracle(raw)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.:abcdef[]%x \u0661\u00b2", max_size=20))
def test_parse_ip_matches_ipaddress_on_generated_text(raw: str) -> None:
    assert parse_ip(raw) == _ip_oracle(raw)


@pytest.mark.parametrize(
    "address",
    [
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "fd00:ec2::23",  # AWS EKS Pod Identity agent over IPv6
        "fd20:ce::254",  # Google Cloud metadata over IPv6
        "fd00:c1::a9fe:a9fe",  # Oracle Cloud metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata (in 100.64.0.0/10, not link-local)
        "168.63.129.16",  # Azure WireServer (goal state, extension settings)
        "::ffff:100.100.100.200",
    ],
)
def test_cloud_metadata_outside_link_local_needs_a_cidr_rule_too(address: str) -> None:
    """Only link-local metadata (169.254.169.254) was special: a name under a wildcard rule whose DNS
    an attacker controls could lead to the clouds' other metadata endpoints (IPv6 ULAs, Alibaba's
    100.100.100.200, Azure's WireServer), which hand out credentials as readily."""
    from outrider.sidecar.egress.policy import is_special, name_addresses, unmapped

    ip = ipaddress.ip_address(address)
    assert is_special(ip)
    assert name_addresses(policy("*.example.com:80"), "api.example.com", [ip], 80) == []
    # A CIDR rule still allows it explicitly, as it does 169.254.169.254.
    plain = unmapped(ip)
    explicit = policy({"cidr": f"{plain}/{plain.max_prefixlen}", "ports": [80]}, "*.example.com:80")
    assert name_addresses(explicit, "api.example.com", [ip], 80) == [plain]
    # Neighbours stay ordinary addresses.
    assert not is_special(ipaddress.ip_address("100.100.100.201"))
    assert not is_special(ipaddress.ip_address("fd00:ec3::254"))
