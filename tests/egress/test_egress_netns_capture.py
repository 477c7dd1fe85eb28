"""Capture mode end to end in real network namespaces: iptables REDIRECT -> 15001 enforcer -> internet.

The app runs as UID 1000, the sidecar as UID 15337; every case of issue 5 is asserted against what
the client saw, what the internet servers saw (the hit log) and the sidecar's decision (audit) record.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from .netlab import (
    ALLOWED_V4,
    ALLOWED_V6,
    CIDR_HOST_V4,
    CIDR_HOST_V6,
    DENIED_V4,
    DENIED_V6,
    DNS_LISTED,
    DNS_UNLISTED,
    SIDECAR_UID,
    Lab,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]


def served_by(result: dict[str, object]) -> str:
    assert result["ok"], result
    return str(json.loads(str(result["body"]))["served_by"])


def test_allowed_name_over_https_and_http(capture_lab: Lab) -> None:
    result = capture_lab.app("https", host="allowed.test")
    assert result["status"] == 200 and served_by(result) in (ALLOWED_V4, ALLOWED_V6)
    decision = capture_lab.wait_decision(name="allowed.test", protocol="tls", allowed=True)
    assert decision["rule"] == "allowed.test" and decision["mode"] == "capture"
    result = capture_lab.app("http", host="allowed.test")
    assert result["status"] == 200 and json.loads(result["body"])["host"] == "allowed.test"
    capture_lab.wait_decision(name="allowed.test", protocol="http", allowed=True)


def test_wildcard_rule(capture_lab: Lab) -> None:
    assert capture_lab.app("https", host="a.wild.test")["status"] == 200
    assert not capture_lab.app("https", host="wild.test")["ok"]  # the apex is not under *.wild.test


def test_denied_name_is_blocked(capture_lab: Lab) -> None:
    before = len(capture_lab.hits(ip=DENIED_V4)) + len(capture_lab.hits(ip=DENIED_V6))
    tls = capture_lab.app("https", host="denied.test")
    assert not tls["ok"]
    plain = capture_lab.app("http", host="denied.test")
    assert plain["status"] == 403 and plain["body"].startswith(
        "outrider egress: denied denied.test:80: default deny"
    )
    assert plain["body"].count("\n") == 1
    assert len(capture_lab.hits(ip=DENIED_V4)) + len(capture_lab.hits(ip=DENIED_V6)) == before
    decision = capture_lab.wait_decision(name="denied.test", protocol="tls", allowed=False)
    assert decision["rule"] is None and decision["reason"].startswith("default deny")


def test_allowed_sni_to_denied_ip_never_reaches_it(capture_lab: Lab) -> None:
    before = capture_lab.hits(ip=DENIED_V4)
    result = capture_lab.app("https", host="allowed.test", ip=DENIED_V4, sni="allowed.test")
    # The enforcer connected to allowed.test's own address instead; the forged target saw nothing.
    assert result["ok"] and served_by(result) in (ALLOWED_V4, ALLOWED_V6)
    assert capture_lab.hits(ip=DENIED_V4) == before
    decision = capture_lab.wait_decision(name="allowed.test", allowed=True, destination_port=443)
    assert "is not an address of allowed.test" in decision["reason"]
    forged_host = capture_lab.app("http", host="allowed.test", ip=DENIED_V4)
    assert served_by(forged_host) in (ALLOWED_V4, ALLOWED_V6) and capture_lab.hits(ip=DENIED_V4) == before


def test_ip_literal_blocked_unless_a_cidr_allows_it(capture_lab: Lab) -> None:
    assert not capture_lab.app("https", ip=ALLOWED_V4, sni="")["ok"]  # no SNI: judged by IP, no CIDR
    literal_host = capture_lab.app("http", ip=ALLOWED_V4)  # Host: 10.200.1.10
    assert literal_host["status"] == 403
    assert not capture_lab.app("tcp", ip=ALLOWED_V4, port=7000)["ok"]
    echoed = capture_lab.app("tcp", ip=CIDR_HOST_V4, port=7000)
    assert echoed["ok"] and echoed["data"].startswith(f"hello from {CIDR_HOST_V4}:7000")
    decision = capture_lab.wait_decision(destination_ip=CIDR_HOST_V4, allowed=True)
    assert decision["rule"] == "10.200.2.0/24:7000" and decision["name"] is None


def test_allowed_name_on_another_port_is_blocked(capture_lab: Lab) -> None:
    before = capture_lab.hits(ip=ALLOWED_V4, port=8443) + capture_lab.hits(ip=ALLOWED_V6, port=8443)
    assert not capture_lab.app("https", host="allowed.test", port=8443)["ok"]
    capture_lab.wait_decision(name="allowed.test", destination_port=8443, allowed=False)
    assert capture_lab.hits(ip=ALLOWED_V4, port=8443) + capture_lab.hits(ip=ALLOWED_V6, port=8443) == before


def test_ipv6_is_enforced_the_same_way(capture_lab: Lab) -> None:
    result = capture_lab.app("https", host="allowed.test", ip=ALLOWED_V6)
    assert result["status"] == 200
    before = capture_lab.hits(ip=DENIED_V6)
    assert not capture_lab.app("https", host="denied.test", ip=DENIED_V6)["ok"]
    forged = capture_lab.app("https", host="allowed.test", ip=DENIED_V6, sni="allowed.test")
    assert served_by(forged) in (ALLOWED_V4, ALLOWED_V6)
    assert capture_lab.hits(ip=DENIED_V6) == before
    assert capture_lab.app("tcp", ip=CIDR_HOST_V6, port=7000)["ok"]
    assert not capture_lab.app("tcp", ip=ALLOWED_V6, port=7000)["ok"]
    capture_lab.wait_decision(destination_ip=DENIED_V6, name="denied.test", allowed=False)


def test_udp_other_than_dns_is_dropped(capture_lab: Lab) -> None:
    result = capture_lab.app("udp", ip=ALLOWED_V4, port=9999)
    assert not result["ok"]
    assert not capture_lab.app("udp", ip=ALLOWED_V6, port=9999)["ok"]
    assert capture_lab.hits(kind="udp") == []


def test_dns_only_to_the_pod_resolver(capture_lab: Lab) -> None:
    listed = capture_lab.app("dns", host="allowed.test", ip=DNS_LISTED)
    assert listed["ok"] and listed["address"] == ALLOWED_V4
    assert not capture_lab.app("dns", host="allowed.test", ip=DNS_UNLISTED)["ok"]
    assert capture_lab.hits(kind="dns", ip=DNS_UNLISTED) == []


def test_sidecar_uid_is_not_captured(capture_lab: Lab) -> None:
    count = len(capture_lab.decision_lines)
    result = capture_lab.app("http", host="denied.test", uid=SIDECAR_UID)
    assert result["status"] == 200 and served_by(result) in (DENIED_V4, DENIED_V6)
    assert len(capture_lab.decision_lines) == count  # never went through the enforcer


def test_a_real_mcp_server_fetch_goes_through_the_enforcer(capture_lab: Lab) -> None:
    allowed = capture_lab.mcp_fetch("http://allowed.test/")
    assert allowed["status"] == 200 and "allowed.test" in allowed["body"]
    denied = capture_lab.mcp_fetch("http://denied.test/")
    assert denied["status"] == 403 and "outrider egress: denied denied.test:80" in denied["body"]


def test_iptables_apply_is_idempotent_and_cleanup_removes_everything(bare_lab: Lab) -> None:
    empty = bare_lab.iptables_save()
    first = bare_lab.iptables("--inbound-ports", "8080")
    assert "applied" in first.stdout and "outrider" in bare_lab.iptables_save()
    installed = bare_lab.iptables_save()
    for line in installed.splitlines():
        if line.startswith("-A"):
            assert '--comment "outrider: ' in line, line
    second = bare_lab.iptables("--inbound-ports", "8080")
    assert second.stdout.strip() == "outrider iptables: applied 0 change(s)"
    assert bare_lab.iptables_save() == installed
    changed = bare_lab.iptables("--inbound-ports", "9090")  # different options: brought in line
    assert "--dport 9090" in bare_lab.iptables_save() and "--dport 8080" not in bare_lab.iptables_save()
    assert "applied 0" not in changed.stdout
    bare_lab.iptables("--cleanup")
    assert bare_lab.iptables_save() == empty
    assert bare_lab.iptables("--cleanup").stdout.strip() == "outrider iptables: removed 0 change(s)"


def test_ipv6_drop_mode_drops_all_ipv6_egress(bare_lab: Lab) -> None:
    assert bare_lab.app("http", host="allowed.test", ip=ALLOWED_V6, uid=SIDECAR_UID)["ok"]  # before: open
    bare_lab.iptables("--ipv6", "drop")
    assert "OUTRIDER_V6_DROP" in bare_lab.iptables_save()
    for uid in (1000, SIDECAR_UID):  # nobody, not even the sidecar, gets IPv6 out
        assert not bare_lab.app("http", host="allowed.test", ip=ALLOWED_V6, uid=uid)["ok"]
    assert not bare_lab.app("udp", ip=ALLOWED_V6, port=9999)["ok"]
    # IPv4 is still captured (nothing listens on 15001 in this lab: refused, not passed through).
    assert "Refused" in bare_lab.app("http", host="allowed.test", ip=ALLOWED_V4)["error"]
    assert bare_lab.app("http", host="allowed.test", ip=ALLOWED_V4, uid=SIDECAR_UID)["ok"]
    bare_lab.iptables("--cleanup")
    assert "OUTRIDER" not in bare_lab.iptables_save()


def test_icmp_and_other_protocols_are_dropped_but_ipv6_still_works(bare_lab: Lab) -> None:
    assert bare_lab.app("icmp", ip=ALLOWED_V4)["ok"]  # before: a ping socket reaches the internet
    assert bare_lab.app("icmp", ip=ALLOWED_V6)["ok"]
    bare_lab.iptables("--ipv6", "capture")
    assert not bare_lab.app("icmp", ip=ALLOWED_V4)["ok"]
    assert not bare_lab.app("icmp", ip=ALLOWED_V6)["ok"]
    assert not bare_lab.app("icmp", ip=ALLOWED_V4, uid=SIDECAR_UID)["ok"]
    # Neighbour discovery still passes: forget the neighbours, then the sidecar's IPv6 TCP still works.
    subprocess.run(["ip", "-n", bare_lab.pod, "-6", "neigh", "flush", "all"], check=True)
    assert bare_lab.app("http", host="allowed.test", ip=ALLOWED_V6, uid=SIDECAR_UID)["ok"]
    bare_lab.iptables("--cleanup")


def test_a_client_that_never_sends_a_client_hello_is_cut_off(capture_lab: Lab) -> None:
    result = capture_lab.app("silent", ip=ALLOWED_V4, port=443)  # hello_timeout_s is 1 s in this lab
    assert result["ok"] and result["data"] == ""  # closed by the sidecar, nothing forwarded
    decision = capture_lab.wait_decision(destination_ip=ALLOWED_V4, destination_port=443, allowed=False)
    assert "no bytes before the timeout" in decision["reason"]


def test_pypi_mcp_server_fetch_is_held_to_the_allowlist(capture_lab: Lab, mcp_server_fetch: str) -> None:
    allowed = capture_lab.mcp_server_fetch(mcp_server_fetch, "http://allowed.test/")
    assert not allowed["is_error"] and '"host": "allowed.test"' in allowed["text"]
    secure = capture_lab.mcp_server_fetch(mcp_server_fetch, "https://allowed.test/")
    assert not secure["is_error"] and '"sni": "allowed.test"' in secure["text"]
    denied = capture_lab.mcp_server_fetch(mcp_server_fetch, "http://denied.test/")
    assert denied["is_error"] and "403" in denied["text"]
    assert not capture_lab.mcp_server_fetch(mcp_server_fetch, "https://denied.test/")["text"].count(
        "served_by"
    )
