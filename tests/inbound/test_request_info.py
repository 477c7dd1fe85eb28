"""The request facts the observer records: one `RequestInfo` per distinct facts, bounded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from outrider.sidecar.inbound import proxy
from outrider.sidecar.telemetry.observer import RequestInfo


def _info(owner: SimpleNamespace, headers: dict[str, str], remote: str = "10.0.0.9") -> RequestInfo:
    request = make_mocked_request("POST", "/mcp", headers=CIMultiDict(headers)).clone(remote=remote)
    return proxy.InboundProxy._request_info(owner, request)  # type: ignore[arg-type]


def _owner() -> SimpleNamespace:
    return SimpleNamespace(_request_infos={}, _transport=lambda request: "streamable-http")


def test_requests_with_the_same_facts_share_one_request_info() -> None:
    owner = _owner()
    first = _info(owner, {"MCP-Protocol-Version": "2025-06-18", "Mcp-Session-Id": "s-1"})
    assert first == RequestInfo("POST", "streamable-http", "2025-06-18", "s-1", "10.0.0.9", headers={})
    assert _info(owner, {"MCP-Protocol-Version": "2025-06-18", "Mcp-Session-Id": "s-1"}) is first
    # Any other fact: its own.
    others = [
        _info(owner, {"MCP-Protocol-Version": "2025-06-18", "Mcp-Session-Id": "s-2"}),
        _info(owner, {"MCP-Protocol-Version": "2025-03-26", "Mcp-Session-Id": "s-1"}),
        _info(owner, {"MCP-Protocol-Version": "2025-06-18", "Mcp-Session-Id": "s-1"}, remote="10.0.0.8"),
    ]
    assert [(o.session_id, o.protocol_version, o.client_address) for o in others] == [
        ("s-2", "2025-06-18", "10.0.0.9"),
        ("s-1", "2025-03-26", "10.0.0.9"),
        ("s-1", "2025-06-18", "10.0.0.8"),
    ]


def test_trace_headers_are_the_requests_own() -> None:
    owner = _owner()
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced = [_info(owner, {"traceparent": parent, "baggage": f"k={i}"}) for i in range(2)]
    assert [t.headers for t in traced] == [
        {"traceparent": parent, "baggage": "k=0"},
        {"traceparent": parent, "baggage": "k=1"},
    ]
    assert not owner._request_infos  # never kept: each request's context is its own
    assert _info(owner, {}).headers == {}


def test_the_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "_REQUEST_INFOS_MAX", 3)
    owner = _owner()
    for i in range(10):
        assert _info(owner, {"Mcp-Session-Id": f"s-{i}"}).session_id == f"s-{i}"
        assert len(owner._request_infos) <= 3
