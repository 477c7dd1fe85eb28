"""The OtelObserver against the SDK's in-memory exporter/reader: every MCP method kind and failure path."""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint
from opentelemetry.trace import SpanKind, StatusCode

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.observer import EgressDecision, ExchangeOutcome, Principal, RequestInfo
from outrider.sidecar.telemetry.semconv import MCP_DURATION_BUCKETS

from .harness import WORKLOAD, Harness, make_harness

ALICE = Principal(
    kind="oidc",
    subject="alice",
    issuer="https://idp.example.test",
    client_id="claude-desktop",
    delegation=("spiffe://cluster.local/ns/agents/sa/planner",),
)
REQUEST = RequestInfo(
    http_method="POST",
    transport="streamable-http",
    protocol_version="2025-06-18",
    session_id="sess-123",
    client_address="10.1.2.3:51234",
    headers={"Content-Type": "application/json", "Authorization": "Bearer not-a-real-token"},
)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def call(
    h: Harness,
    message: McpMessage,
    *,
    request: RequestInfo = REQUEST,
    principal: Principal | None = ALICE,
    http_status: int = 200,
    outcome: str = "ok",
    error_type: str | None = None,
    reason: str | None = None,
    response: McpMessage | None = None,
    exchange: ExchangeOutcome | None = None,
) -> None:
    with h.observer.mcp_call(message, request) as scope:
        if principal is not None:
            scope.set_principal(principal)
        if exchange is not None:
            scope.token_exchange(exchange)
        scope.finish(
            http_status=http_status, outcome=outcome, error_type=error_type, reason=reason, response=response
        )


CASES: list[tuple[McpMessage, str, dict[str, Any]]] = [
    (
        McpMessage(kind="request", method="initialize", id=1),
        "initialize",
        {"mcp.method.name": "initialize", "jsonrpc.request.id": "1"},
    ),
    (
        McpMessage(kind="request", method="tools/list", id="a-2"),
        "tools/list",
        {"mcp.method.name": "tools/list", "jsonrpc.request.id": "a-2"},
    ),
    (
        McpMessage(
            kind="request", method="tools/call", id=3, tool_name="get_weather", arguments={"city": "Oslo"}
        ),
        "tools/call get_weather",
        {"gen_ai.tool.name": "get_weather", "gen_ai.operation.name": "execute_tool"},
    ),
    (
        McpMessage(kind="request", method="prompts/get", id=4, prompt_name="summarise"),
        "prompts/get summarise",
        {"gen_ai.prompt.name": "summarise"},
    ),
    (
        McpMessage(kind="request", method="resources/read", id=5, resource_uri="file:///etc/motd"),
        "resources/read",
        {"mcp.method.name": "resources/read"},
    ),
    (
        McpMessage(kind="notification", method="notifications/initialized"),
        "notifications/initialized",
        {"mcp.method.name": "notifications/initialized"},
    ),
]


@pytest.mark.parametrize(("message", "span_name", "expected"), CASES, ids=[c[1] for c in CASES])
def test_every_method_kind_gets_a_server_span_metric_and_audit_line(
    harness: Harness, message: McpMessage, span_name: str, expected: dict[str, Any]
) -> None:
    call(harness, message)
    span = harness.span(span_name)
    assert span.kind is SpanKind.SERVER
    attrs = dict(span.attributes or {})
    for key, value in expected.items():
        assert attrs[key] == value
    assert attrs["mcp.protocol.version"] == "2025-06-18"
    assert attrs["mcp.session.id"] == "sess-123"
    assert attrs["network.transport"] == "tcp"
    assert attrs["client.address"] == "10.1.2.3"
    assert attrs["enduser.id"] == "alice"
    assert attrs["outrider.client.id"] == "claude-desktop"
    assert attrs["outrider.delegation.chain"] == ("spiffe://cluster.local/ns/agents/sa/planner",)
    assert attrs["outrider.workload.spiffe_id"] == WORKLOAD.spiffe_id
    assert "error.type" not in attrs
    assert "mcp.resource.uri" not in attrs  # opt-in only
    if message.method != "tools/call":
        assert "gen_ai.operation.name" not in attrs
    assert span.status.status_code is StatusCode.UNSET

    (point,) = harness.points("mcp.server.operation.duration")
    assert isinstance(point, HistogramDataPoint)
    assert tuple(point.explicit_bounds) == MCP_DURATION_BUCKETS
    assert point.count == 1
    assert point.attributes["mcp.method.name"] == attrs["mcp.method.name"]
    assert "enduser.id" not in point.attributes  # no per-user metric series
    assert "jsonrpc.request.id" not in point.attributes
    assert harness.counter("outrider.mcp.requests", outcome="ok") == 1

    (event,) = harness.audit()
    assert event["type"] == "mcp.call"
    assert event["outcome"] == "ok"
    assert event["user"] == {"kind": "oidc", "sub": "alice", "iss": "https://idp.example.test"}
    assert event["client_id"] == "claude-desktop"
    assert event["act"] == ["spiffe://cluster.local/ns/agents/sa/planner"]
    assert event["workload"] == WORKLOAD.as_json()
    assert event["mcp"]["method"] == attrs["mcp.method.name"]
    assert event["mcp"]["jsonrpc_id"] == message.id
    assert event["trace_id"] == format(span.context.trace_id, "032x")
    assert event["span_id"] == format(span.context.span_id, "016x")
    assert "arguments" not in event["mcp"]  # not recorded by default


def test_tool_error_result_sets_error_type_tool_error(harness: Harness) -> None:
    message = McpMessage(kind="request", method="tools/call", id=7, tool_name="fetch")
    response = McpMessage(kind="response", id=7, is_error=True)
    call(harness, message, outcome="tool_error", response=response)
    span = harness.span("tools/call fetch")
    assert span.attributes["error.type"] == "tool_error"
    assert span.status.status_code is StatusCode.ERROR
    (point,) = harness.points("mcp.server.operation.duration")
    assert point.attributes["error.type"] == "tool_error"
    assert (
        harness.counter("outrider.mcp.requests", outcome="tool_error", **{"gen_ai.tool.name": "fetch"}) == 1
    )
    (event,) = harness.audit()
    assert event["outcome"] == "tool_error"
    assert event["mcp"]["error_type"] == "tool_error"


def test_jsonrpc_error_response_sets_rpc_status_code(harness: Harness) -> None:
    message = McpMessage(kind="request", method="tools/call", id=8, tool_name="nope")
    response = McpMessage(kind="response", id=8, is_error=True, error_code=-32602)
    call(harness, message, outcome="error", response=response)
    attrs = harness.span("tools/call nope").attributes
    assert attrs["rpc.response.status_code"] == "-32602"
    assert attrs["error.type"] == "-32602"


def test_batch_gives_one_span_per_message_with_shared_parent(harness: Harness) -> None:
    batch = [
        McpMessage(kind="request", method="tools/call", id=1, tool_name="echo"),
        McpMessage(kind="request", method="tools/call", id=2, tool_name="whoami"),
        McpMessage(kind="notification", method="notifications/progress"),
    ]
    request = RequestInfo(
        http_method="POST", transport="streamable-http", headers={"traceparent": TRACEPARENT}
    )
    scopes = [harness.observer.mcp_call(m, request) for m in batch]
    entered = [s.__enter__() for s in scopes]
    for scope in entered:
        scope.set_principal(ALICE)
    for scope in reversed(entered):
        scope.finish(http_status=200, outcome="ok")
    for cm in reversed(scopes):
        cm.__exit__(None, None, None)
    names = sorted(s.name for s in harness.spans())
    assert names == ["notifications/progress", "tools/call echo", "tools/call whoami"]
    assert {s.context.trace_id for s in harness.spans()} == {0x0AF7651916CD43DD8448EB211C80319C}
    assert {s.parent.span_id for s in harness.spans() if s.parent} == {0xB7AD6B7169203331}
    assert len(harness.audit()) == 3
    assert harness.counter("outrider.mcp.requests") == 3


def test_continues_incoming_trace_and_injects_into_headers_and_meta(harness: Harness) -> None:
    request = RequestInfo(
        http_method="POST",
        transport="stateless",
        protocol_version="2026-07-28",
        session_id="ignored-in-stateless",
        headers={"TraceParent": TRACEPARENT, "tracestate": "vendor=1"},
    )
    message = McpMessage(kind="request", method="tools/call", id=9, tool_name="echo")
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "echo"}}
    upstream: dict[str, str] = {}
    with harness.observer.mcp_call(message, request) as scope:
        scope.set_principal(ALICE)
        scope.inject_context(upstream, body)
        scope.finish(http_status=200, outcome="ok")
    span = harness.span("tools/call echo")
    assert span.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331
    expected = f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"
    assert upstream["traceparent"] == expected
    assert upstream["tracestate"] == "vendor=1"
    assert body["params"]["_meta"] == {"traceparent": expected, "tracestate": "vendor=1"}
    assert body["params"]["name"] == "echo"
    # Stateless revisions have no session: the id must not be recorded.
    assert "mcp.session.id" not in span.attributes
    assert span.attributes["mcp.protocol.version"] == "2026-07-28"


def test_trace_context_in_params_meta_wins_over_headers(harness: Harness) -> None:
    meta_parent = "00-11111111111111111111111111111111-2222222222222222-01"
    message = McpMessage(
        kind="request",
        method="tools/call",
        id=1,
        tool_name="echo",
        trace_context={"traceparent": meta_parent},
    )
    request = RequestInfo(
        http_method="POST", transport="streamable-http", headers={"traceparent": TRACEPARENT}
    )
    call(harness, message, request=request)
    span = harness.span("tools/call echo")
    assert span.context.trace_id == 0x11111111111111111111111111111111
    assert span.parent is not None and span.parent.span_id == 0x2222222222222222


def test_trace_context_parsed_from_the_wire_body() -> None:
    from outrider.sidecar.inbound.jsonrpc import parse_message

    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "x", "_meta": {"traceparent": TRACEPARENT, "progressToken": 3}},
    }
    assert parse_message(body).trace_context == {"traceparent": TRACEPARENT}


def test_inject_context_adds_params_to_notifications_but_not_responses(harness: Harness) -> None:
    message = McpMessage(kind="notification", method="notifications/initialized")
    note: dict[str, Any] = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    reply: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "result": {}}
    with harness.observer.mcp_call(message, REQUEST) as scope:
        scope.inject_context({}, note)
        scope.inject_context({}, reply)
        scope.finish(http_status=202, outcome="ok")
    assert set(note["params"]["_meta"]) == {"traceparent"}
    assert reply == {"jsonrpc": "2.0", "id": 1, "result": {}}


def test_inject_context_says_whether_it_changed_the_message(harness: Harness) -> None:
    """The proxy re-encodes a body only when this says True: no copy of `_meta` to compare per call."""
    message = McpMessage(kind="request", method="tools/call", id=1, tool_name="echo")
    with harness.observer.mcp_call(message, REQUEST) as scope:
        fresh: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}
        assert scope.inject_context({}, fresh) is True
        assert scope.inject_context({}, fresh) is False  # the same context again: nothing changed
        bare: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
        assert scope.inject_context({}, bare) is True
        assert set(bare["params"]["_meta"]) == {"traceparent"}
        stale = "00-11111111111111111111111111111111-2222222222222222-01"
        held: dict[str, Any] = {
            "method": "tools/call",
            "params": {"_meta": {"progressToken": 3, "traceparent": stale}},
        }
        assert scope.inject_context({}, held) is True
        assert held["params"]["_meta"]["progressToken"] == 3
        assert held["params"]["_meta"]["traceparent"] == fresh["params"]["_meta"]["traceparent"]
        listed: dict[str, Any] = {"method": "tools/call", "params": [1, 2]}
        odd: dict[str, Any] = {"method": "tools/call", "params": {"_meta": "not an object"}}
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "result": {}}
        for untouched in (listed, odd, reply):
            before = json.dumps(untouched)
            assert scope.inject_context({}, untouched) is False
            assert json.dumps(untouched) == before
        assert scope.inject_context({}, None) is False
        scope.finish(http_status=200, outcome="ok")


def test_unauthenticated_call_401(harness: Harness) -> None:
    message = McpMessage(kind="request", method="tools/call", id=1, tool_name="echo")
    call(
        harness,
        message,
        principal=None,
        http_status=401,
        outcome="denied",
        error_type="invalid_token",
        reason="token expired",
    )
    span = harness.span("tools/call echo")
    assert span.attributes["error.type"] == "invalid_token"
    assert span.attributes["http.response.status_code"] == 401
    assert "enduser.id" not in span.attributes
    assert span.status.status_code is StatusCode.ERROR
    assert harness.counter("outrider.mcp.requests", outcome="denied") == 1
    (event,) = harness.audit()
    assert event["outcome"] == "denied"
    assert event["user"] is None
    assert event["reason"] == "token expired"
    assert event["mcp"]["http_status"] == 401


@pytest.mark.parametrize(
    ("outcome", "idp_status", "http_status"),
    [
        ("idp_error", 400, 403),
        ("idp_unavailable", None, 503),
        ("invalid_request", 400, 502),
        ("identity_unavailable", None, 503),
    ],
)
def test_exchange_failure_gives_child_span_metric_and_two_audit_lines(
    harness: Harness, outcome: str, idp_status: int | None, http_status: int
) -> None:
    message = McpMessage(kind="request", method="tools/call", id=2, tool_name="fetch")
    failed = ExchangeOutcome(
        outcome=outcome,
        audience="https://api.example.test",
        reason=f"IdP said {outcome}",
        idp_status=idp_status,
        duration_s=0.042,
    )
    call(
        harness,
        message,
        http_status=http_status,
        outcome="error",
        error_type="token_exchange",
        reason="token exchange failed",
        exchange=failed,
    )
    server = harness.span("tools/call fetch")
    child = harness.span("outrider.token_exchange")
    assert child.parent is not None and child.parent.span_id == server.context.span_id
    assert child.kind is SpanKind.CLIENT
    assert child.attributes["outrider.token_exchange.outcome"] == outcome
    assert child.attributes["outrider.token_exchange.cache_hit"] is False
    assert child.attributes["error.type"] == outcome
    assert child.status.status_code is StatusCode.ERROR
    assert child.end_time - child.start_time == pytest.approx(42_000_000, abs=2_000_000)
    if idp_status is not None:
        assert child.attributes["http.response.status_code"] == idp_status
    assert server.attributes["error.type"] == "token_exchange"
    assert harness.counter("outrider.token_exchanges", outcome=outcome) == 1
    (latency,) = harness.points("outrider.token_exchange.duration")
    assert latency.count == 1
    exchange_event, call_event = harness.audit()
    assert exchange_event["type"] == "token.exchange"
    assert exchange_event["outcome"] == "error"
    assert exchange_event["exchange"]["outcome"] == outcome
    assert exchange_event["user"]["sub"] == "alice"
    assert exchange_event["trace_id"] == call_event["trace_id"]
    assert call_event["outcome"] == "error"
    assert call_event["mcp"]["http_status"] == http_status


def test_exchange_issued_and_cache_hit(harness: Harness) -> None:
    message = McpMessage(kind="request", method="tools/call", id=3, tool_name="fetch")
    call(harness, message, exchange=ExchangeOutcome(outcome="issued", audience="api", duration_s=0.01))
    call(harness, message, exchange=ExchangeOutcome(outcome="cache_hit", audience="api", duration_s=0.0001))
    # Both get a child span (hit or miss), each under its own call span.
    child, hit = [s for s in harness.spans() if s.name == "outrider.token_exchange"]
    assert child.kind is SpanKind.CLIENT and hit.kind is SpanKind.CLIENT
    assert child.attributes["outrider.token_exchange.cache_hit"] is False
    assert hit.attributes["outrider.token_exchange.cache_hit"] is True
    assert child.status.status_code is StatusCode.UNSET
    first, second = [s for s in harness.spans() if s.name == "tools/call fetch"]
    assert child.parent.span_id == first.context.span_id and hit.parent.span_id == second.context.span_id
    assert "outrider.token_exchange.outcome" not in first.attributes
    assert second.attributes["outrider.token_exchange.outcome"] == "cache_hit"
    assert harness.counter("outrider.token_exchanges", cache_hit=True) == 1
    assert harness.counter("outrider.token_exchanges", outcome="issued") == 1
    # IdP latency is recorded for real round trips only.
    (latency,) = harness.points("outrider.token_exchange.duration")
    assert latency.count == 1
    events = harness.audit()
    assert [e["type"] for e in events] == ["token.exchange", "mcp.call", "mcp.call"]
    assert events[0]["exchange"]["outcome"] == "issued"
    assert [events[1]["mcp"]["token_exchange"], events[2]["mcp"]["token_exchange"]] == ["issued", "cache_hit"]


def test_upstream_error_502(harness: Harness) -> None:
    message = McpMessage(kind="request", method="tools/list", id=4)
    call(
        harness,
        message,
        http_status=502,
        outcome="error",
        error_type="upstream_unavailable",
        reason="connection refused by 127.0.0.1:8080",
    )
    span = harness.span("tools/list")
    assert span.attributes["error.type"] == "upstream_unavailable"
    assert span.attributes["http.response.status_code"] == 502
    (point,) = harness.points("mcp.server.operation.duration")
    assert point.attributes["error.type"] == "upstream_unavailable"
    (event,) = harness.audit()
    assert event["reason"] == "connection refused by 127.0.0.1:8080"


def test_exception_inside_scope_finishes_with_error_and_reraises(harness: Harness) -> None:
    message = McpMessage(kind="request", method="tools/list", id=5)
    with pytest.raises(RuntimeError), harness.observer.mcp_call(message, REQUEST):
        raise RuntimeError("boom with Bearer abc.def.ghi")
    span = harness.span("tools/list")
    assert span.attributes["error.type"] == "RuntimeError"
    assert span.attributes["http.response.status_code"] == 500
    assert not span.events  # the exception message is never recorded
    (event,) = harness.audit()
    assert "abc.def" not in str(event)


def test_scope_left_without_finish_is_recorded_as_unfinished(harness: Harness) -> None:
    with harness.observer.mcp_call(McpMessage(kind="request", method="ping", id=6), REQUEST):
        pass
    assert harness.span("ping").attributes["error.type"] == "unfinished"
    assert harness.audit()[0]["outcome"] == "error"


def test_finish_twice_records_once(harness: Harness) -> None:
    with harness.observer.mcp_call(McpMessage(kind="request", method="ping", id=6), REQUEST) as scope:
        scope.finish(http_status=200, outcome="ok")
        scope.finish(http_status=500, outcome="error")
    assert len(harness.spans()) == 1
    assert len(harness.audit()) == 1


def test_egress_decisions(harness: Harness) -> None:
    allowed = EgressDecision(
        allowed=True,
        mode="capture",
        protocol="tls",
        destination_ip="93.184.216.34",
        destination_port=443,
        name="api.github.com",
        rule="*.github.com",
        reason="matched *.github.com",
        source="namespace",
    )
    denied = EgressDecision(
        allowed=False,
        mode="explicit",
        protocol="connect",
        destination_ip=None,
        destination_port=443,
        name="evil.example",
        rule=None,
        reason="no rule matched",
    )
    harness.observer.egress(allowed)
    harness.observer.egress(denied)
    allow_span = harness.span("egress allow")
    deny_span = harness.span("egress deny")
    assert allow_span.attributes["server.address"] == "api.github.com"
    assert allow_span.attributes["outrider.egress.rule"] == "*.github.com"
    assert deny_span.status.status_code is StatusCode.ERROR
    assert harness.counter("outrider.egress.decisions", outcome="allowed") == 1
    assert harness.counter("outrider.egress.decisions", outcome="denied", mode="explicit") == 1
    events = harness.audit()
    assert [e["outcome"] for e in events] == ["allowed", "denied"]
    assert events[1]["egress"]["name"] == "evil.example"
    assert events[1]["user"] is None


def test_identity_events_count_and_health_gauge(harness: Harness) -> None:
    assert harness.points("outrider.identity.healthy") == []
    harness.observer.identity_event("healthy", "spiffe://cluster.local/ns/tools/sa/weather", "first SVID")
    harness.observer.identity_event("rotated", "spiffe://cluster.local/ns/tools/sa/weather", "new SVID")
    assert harness.counter("outrider.identity.events", event="rotated") == 1
    (gauge,) = harness.points("outrider.identity.healthy")
    assert gauge.value == 1
    harness.observer.identity_event("unhealthy", None, "workload API stream closed")
    (gauge,) = harness.points("outrider.identity.healthy")
    assert gauge.value == 0


def test_hash_user_and_opt_in_resource_uri() -> None:
    h = make_harness(TelemetryConfig(hash_user=True, hash_salt="pepper", record_resource_uri=True))
    message = McpMessage(
        kind="request", method="resources/read", id=1, resource_uri="file:///data/report.csv"
    )
    call(h, message)
    span = h.span("resources/read file:///data/report.csv")
    assert span.attributes["mcp.resource.uri"] == "file:///data/report.csv"
    user = span.attributes["enduser.id"]
    assert isinstance(user, str) and user.startswith("sha256:") and "alice" not in user
    other = make_harness(TelemetryConfig(hash_user=True, hash_salt="other"))
    call(other, message)
    assert other.spans()[0].attributes["enduser.id"] != user  # the salt keys the pseudonym
    # The audit log is the security record: it names the person regardless.
    assert h.audit()[0]["user"]["sub"] == "alice"
    assert h.audit()[0]["mcp"]["resource"] == "file:///data/report.csv"


def test_record_arguments_redacts_configured_keys() -> None:
    h = make_harness(TelemetryConfig(record_arguments=True, redact_keys=("password", "api-key")))
    message = McpMessage(
        kind="request",
        method="tools/call",
        id=1,
        tool_name="login",
        arguments={"user": "alice", "Password": "hunter2", "nested": {"API_KEY": "k-123", "n": 3}},
    )
    call(h, message)
    (event,) = h.audit()
    assert event["mcp"]["arguments"] == {
        "user": "alice",
        "Password": "[REDACTED]",
        "nested": {"API_KEY": "[REDACTED]", "n": 3},
    }
    assert "hunter2" not in h.audit_stream.getvalue()
    # Arguments never go onto spans.
    assert all("hunter2" not in str(s.attributes) for s in h.spans())


def test_workload_callback_failure_does_not_break_calls() -> None:
    h = make_harness()

    def broken() -> Any:
        raise RuntimeError("identity not ready")

    h.observer._workload = broken
    call(h, McpMessage(kind="request", method="ping", id=1))
    assert h.audit()[0]["workload"] == {"spiffe_id": None, "pod": None, "namespace": None}
