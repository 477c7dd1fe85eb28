"""Explicit-proxy mode end to end in real network namespaces: no iptables, HTTP(S)_PROXY -> 15001.

The same allowlist and the same "reach the allowed name's own addresses" rule as capture mode; the
pod has no capture rules, so this mode cannot stop an app that ignores the proxy variables (shown last).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from .conftest import _require_netns
from .netlab import ALLOWED_V4, ALLOWED_V6, CIDR_HOST_V4, CIDR_HOST_V6, DENIED_V4, DENIED_V6, POLICY, Lab, lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

PROXY = "http://127.0.0.1:15001"
PROXY_ENV = {
    "HTTP_PROXY": PROXY,
    "HTTPS_PROXY": PROXY,
    "http_proxy": PROXY,
    "https_proxy": PROXY,
    "NO_PROXY": "localhost,127.0.0.1,::1",
    "no_proxy": "localhost,127.0.0.1,::1",
}


@pytest.fixture(scope="module")
def explicit_lab() -> Iterator[Lab]:
    _require_netns()
    config = {"egress": {"mode": "explicit", "policy": POLICY, "policy_file": None}}
    with lab(capture=False, sidecar_config=config, app_env=PROXY_ENV) as current:
        yield current


def served_by(result: dict[str, object]) -> str:
    assert result["ok"], result
    return str(json.loads(str(result["body"]))["served_by"])


def test_connect_to_allowed_name(explicit_lab: Lab) -> None:
    result = explicit_lab.app("https", host="allowed.test", proxy=PROXY)
    assert result["status"] == 200 and served_by(result) in (ALLOWED_V4, ALLOWED_V6)
    decision = explicit_lab.wait_decision(name="allowed.test", protocol="connect", allowed=True)
    assert decision["mode"] == "explicit" and decision["rule"] == "allowed.test"


def test_absolute_uri_http(explicit_lab: Lab) -> None:
    result = explicit_lab.app("http", host="allowed.test", proxy=PROXY)
    assert result["status"] == 200 and json.loads(result["body"])["host"] == "allowed.test:80"
    denied = explicit_lab.app("http", host="denied.test", proxy=PROXY)
    assert denied["status"] == 403 and denied["body"].startswith("outrider egress: denied denied.test:80")


def test_denied_name_and_other_port(explicit_lab: Lab) -> None:
    before = explicit_lab.hits(ip=DENIED_V4) + explicit_lab.hits(ip=DENIED_V6)
    denied = explicit_lab.app("https", host="denied.test", proxy=PROXY)
    assert not denied["ok"] and "403" in denied["error"]
    assert explicit_lab.hits(ip=DENIED_V4) + explicit_lab.hits(ip=DENIED_V6) == before
    other_port = explicit_lab.app("https", host="allowed.test", port=8443, proxy=PROXY)
    assert not other_port["ok"] and "403" in other_port["error"]
    explicit_lab.wait_decision(name="denied.test", protocol="connect", allowed=False)


def test_ip_literals_only_with_a_cidr(explicit_lab: Lab) -> None:
    assert "403" in explicit_lab.app("tcp", ip=ALLOWED_V4, port=7000, proxy=PROXY)["error"]
    assert "403" in explicit_lab.app("https", ip=ALLOWED_V4, sni="", proxy=PROXY)["error"]
    assert explicit_lab.app("tcp", ip=CIDR_HOST_V4, port=7000, proxy=PROXY)["ok"]
    assert explicit_lab.app("tcp", ip=CIDR_HOST_V6, port=7000, proxy=PROXY)["ok"]
    assert "403" in explicit_lab.app("tcp", ip=ALLOWED_V6, port=7000, proxy=PROXY)["error"]


def test_allowed_name_is_reached_at_its_own_addresses(explicit_lab: Lab) -> None:
    # CONNECT names the host; the proxy resolves it itself, so the client cannot pick the IP at all.
    before = explicit_lab.hits(ip=DENIED_V4)
    result = explicit_lab.app("https", host="allowed.test", sni="allowed.test", proxy=PROXY)
    assert served_by(result) in (ALLOWED_V4, ALLOWED_V6) and explicit_lab.hits(ip=DENIED_V4) == before


def test_a_real_mcp_server_fetch_uses_the_proxy(explicit_lab: Lab) -> None:
    allowed = explicit_lab.mcp_fetch("http://allowed.test/")
    assert allowed["status"] == 200 and "allowed.test" in allowed["body"]
    denied = explicit_lab.mcp_fetch("http://denied.test/")
    assert denied["status"] == 403 and "outrider egress: denied denied.test:80" in denied["body"]
    explicit_lab.wait_decision(name="denied.test", protocol="http", allowed=False)


def test_the_documented_gap_an_app_ignoring_the_proxy_goes_direct(explicit_lab: Lab) -> None:
    # Explicit mode has no capture rules: this is why capture is the default wherever NET_ADMIN is allowed.
    direct = explicit_lab.app("http", host="denied.test")
    assert direct["status"] == 200


def test_pypi_mcp_server_fetch_through_the_proxy(explicit_lab: Lab, mcp_server_fetch: str) -> None:
    allowed = explicit_lab.mcp_server_fetch(mcp_server_fetch, "https://allowed.test/")
    assert not allowed["is_error"] and '"sni": "allowed.test"' in allowed["text"]
    explicit_lab.wait_decision(name="allowed.test", protocol="connect", allowed=True)
    denied = explicit_lab.mcp_server_fetch(mcp_server_fetch, "https://denied.test/")
    assert denied["is_error"] and "served_by" not in denied["text"]
    explicit_lab.wait_decision(name="denied.test", protocol="connect", allowed=False)
