"""The telemetry component in a sidecar Runtime: observer set, /metrics text, audit file, clean shutdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from outrider.sidecar.config import parse
from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.runtime import Runtime
from outrider.sidecar.telemetry import component as telemetry
from outrider.sidecar.telemetry.observer import (
    EgressDecision,
    ExchangeOutcome,
    NullObserver,
    Principal,
    RequestInfo,
)
from outrider.sidecar.telemetry.observer_otel import OtelObserver
from outrider.sidecar.telemetry.prometheus import metric_name
from outrider.sidecar.telemetry.semconv import MCP_DURATION_BUCKETS

from .harness import validate_event

REQUEST = RequestInfo(http_method="POST", transport="streamable-http", protocol_version="2025-06-18")


class FakeIdentity:
    spiffe_id = "spiffe://example.org/ns/mcp/sa/weather"
    ready = True
    status = "ok"


def _runtime(tmp_path: Path) -> Runtime:
    config = parse(
        {
            "pod": {"name": "weather-0", "namespace": "mcp"},
            "telemetry": {"audit": str(tmp_path / "audit.jsonl")},
        }
    )
    return Runtime(config=config)


async def test_component_wires_observer_metrics_and_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    runtime = _runtime(tmp_path)
    async with telemetry.component(runtime):
        observer = runtime.observer
        assert isinstance(observer, OtelObserver)
        runtime.identity = FakeIdentity()  # type: ignore[assignment]  # the identity component comes later
        alice = Principal(kind="oidc", subject="alice", issuer="https://idp")
        for tool, outcome in (("echo", "ok"), ("echo", "ok"), ("fetch", "tool_error")):
            with observer.mcp_call(
                McpMessage(kind="request", method="tools/call", id=1, tool_name=tool), REQUEST
            ) as scope:
                scope.set_principal(alice)
                scope.token_exchange(ExchangeOutcome(outcome="cache_hit", audience="api"))
                scope.finish(http_status=200, outcome=outcome)
        observer.egress(EgressDecision(False, "capture", "tls", "192.0.2.1", 443, "evil.test", None, "deny"))
        observer.identity_event("rotated", FakeIdentity.spiffe_id, "new SVID")
        assert len(runtime.metrics) == 1
        observer.worker.drain()  # recording runs on the telemetry thread
        text = b"".join(produce() for produce in runtime.metrics).decode()
    assert isinstance(runtime.observer, NullObserver)
    assert runtime.metrics == []

    families = {f.name: f for f in text_string_to_metric_families(text)}
    duration = families["mcp_server_operation_duration_seconds"]
    assert duration.type == "histogram"
    buckets = {
        (s.labels["gen_ai_tool_name"], s.labels["le"]): s.value
        for s in duration.samples
        if s.name.endswith("_bucket")
    }
    assert {float(le) for (_, le) in buckets if le != "+Inf"} == set(MCP_DURATION_BUCKETS)
    assert buckets[("echo", "+Inf")] == 2
    assert buckets[("fetch", "+Inf")] == 1
    requests = families["outrider_mcp_requests"]
    assert requests.type == "counter"
    by_outcome = {
        (s.labels["gen_ai_tool_name"], s.labels["outcome"]): s.value
        for s in requests.samples
        if s.name.endswith("_total")
    }
    assert by_outcome == {("echo", "ok"): 2, ("fetch", "tool_error"): 1}
    assert any(
        s.labels.get("outcome") == "cache_hit" and s.value == 3
        for s in families["outrider_token_exchanges"].samples
    )
    assert any(s.labels.get("outcome") == "denied" for s in families["outrider_egress_decisions"].samples)
    assert families["outrider_identity_healthy"].samples[0].value == 1
    assert "enduser" not in text and "alice" not in text  # no per-user series

    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    for event in events:
        validate_event(event)
    assert [e["type"] for e in events].count("mcp.call") == 3
    call = next(e for e in events if e["type"] == "mcp.call")
    assert call["workload"] == {
        "spiffe_id": "spiffe://example.org/ns/mcp/sa/weather",
        "pod": "weather-0",
        "namespace": "mcp",
    }


@pytest.mark.parametrize(
    ("name", "unit", "expected"),
    [
        ("mcp.server.operation.duration", "s", "mcp_server_operation_duration_seconds"),
        ("outrider.mcp.requests", "{request}", "outrider_mcp_requests"),
        ("x.duration_seconds", "s", "x_duration_seconds"),
    ],
)
def test_metric_names(name: str, unit: str, expected: str) -> None:
    assert metric_name(name, unit) == expected


async def test_sdk_disabled_keeps_only_the_audit_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    runtime = _runtime(tmp_path)
    async with telemetry.component(runtime):
        observer = runtime.observer
        assert isinstance(observer, OtelObserver)
        assert runtime.metrics == []
        body: dict[str, object] = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        headers: dict[str, str] = {}
        with observer.mcp_call(McpMessage(kind="request", method="ping", id=1), REQUEST) as scope:
            scope.inject_context(headers, body)
            scope.finish(http_status=200, outcome="ok")
        assert headers == {}  # no spans, so no trace context to pass on
    (line,) = (tmp_path / "audit.jsonl").read_text().splitlines()
    event = json.loads(line)
    validate_event(event)
    assert event["trace_id"] is None


async def test_sdk_disabled_and_audit_off_is_the_null_observer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    runtime = Runtime(config=parse({"telemetry": {"audit": "off"}}))
    async with telemetry.component(runtime):
        assert isinstance(runtime.observer, NullObserver)
