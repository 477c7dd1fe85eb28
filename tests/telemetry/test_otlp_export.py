"""Spans and metrics over real OTLP (HTTP/protobuf and gRPC) to local receivers that decode the payload."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry.audit import AuditLog
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.observer import ExchangeOutcome, Principal, RequestInfo
from outrider.sidecar.telemetry.observer_otel import OtelObserver
from outrider.sidecar.telemetry.setup import build_providers

from .harness import WORKLOAD
from .otlp_receiver import Received, attributes_of, otlp_http_receiver

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
async def http_receiver() -> AsyncIterator[tuple[str, Received]]:
    async with otlp_http_receiver() as receiver:
        yield receiver


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    async def Export(self, request: Any, context: Any) -> Any:
        self.received.traces.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    async def Export(self, request: Any, context: Any) -> Any:
        self.received.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
async def grpc_receiver() -> AsyncIterator[tuple[str, Received]]:
    received = Received()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(received), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(received), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await server.stop(None)


def _drive(observer: OtelObserver) -> None:
    request = RequestInfo(
        http_method="POST",
        transport="streamable-http",
        protocol_version="2025-11-25",
        session_id="s-1",
        client_address="127.0.0.1:40000",
        headers={"traceparent": TRACEPARENT},
    )
    alice = Principal(kind="oidc", subject="alice", issuer="https://idp.test", client_id="cli")
    with observer.mcp_call(
        McpMessage(kind="request", method="tools/call", id=1, tool_name="echo"), request
    ) as s:
        s.set_principal(alice)
        s.token_exchange(ExchangeOutcome(outcome="issued", audience="api", idp_status=200, duration_s=0.02))
        s.finish(http_status=200, outcome="ok")
    with observer.mcp_call(
        McpMessage(kind="request", method="tools/call", id=2, tool_name="fetch"), request
    ) as s:
        s.set_principal(alice)
        s.finish(
            http_status=200, outcome="tool_error", response=McpMessage(kind="response", id=2, is_error=True)
        )


async def _export_and_check(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, received: Received, protocol: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    providers = build_providers(
        "outrider-proxy", resource_attributes={"k8s.pod.name": "weather-0", "k8s.namespace.name": "tools"}
    )
    assert providers.plan.traces == protocol
    # HTTP/protobuf takes the lean span path, gRPC the SDK's.
    assert (providers.lean is not None) == (protocol == "http/protobuf")
    observer = providers.observer(TelemetryConfig(), AuditLog(io.StringIO()), lambda: WORKLOAD)
    _drive(observer)
    # The exporters are blocking: flush from a thread while this loop serves the receiver.
    await asyncio.wait_for(asyncio.to_thread(providers.shutdown), timeout=30)

    spans = received.spans()
    assert set(spans) == {"tools/call echo", "tools/call fetch", "outrider.token_exchange"}
    echo = spans["tools/call echo"]
    assert echo.kind == echo.SPAN_KIND_SERVER
    assert echo.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert echo.parent_span_id.hex() == "00f067aa0ba902b7"
    attrs = attributes_of(echo)
    assert attrs["mcp.method.name"] == "tools/call"
    assert attrs["gen_ai.tool.name"] == "echo"
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert attrs["jsonrpc.request.id"] == "1"
    assert attrs["mcp.session.id"] == "s-1"
    assert attrs["mcp.protocol.version"] == "2025-11-25"
    assert attrs["enduser.id"] == "alice"
    assert attrs["outrider.workload.spiffe_id"] == WORKLOAD.spiffe_id
    assert attributes_of(spans["tools/call fetch"])["error.type"] == "tool_error"
    assert spans["outrider.token_exchange"].parent_span_id == echo.span_id
    resource = received.resource()
    assert resource["service.name"] == "outrider-proxy"
    assert resource["k8s.pod.name"] == "weather-0"
    assert {"mcp.server.operation.duration", "outrider.mcp.requests", "outrider.token_exchanges"} <= (
        received.metric_names()
    )


async def test_otlp_http_protobuf_to_local_receiver(
    monkeypatch: pytest.MonkeyPatch, http_receiver: tuple[str, Received]
) -> None:
    endpoint, received = http_receiver
    await _export_and_check(monkeypatch, endpoint, received, "http/protobuf")
    assert set(received.content_types) == {"application/x-protobuf"}


async def test_otlp_grpc_to_local_receiver(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: tuple[str, Received]
) -> None:
    endpoint, received = grpc_receiver
    await _export_and_check(monkeypatch, endpoint, received, "grpc")


def _requests_points(received: Received) -> float:
    """The last exported cumulative value of `outrider.mcp.requests`, summed over its points."""
    total = 0.0
    for request in received.metrics[-1:]:
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == "outrider.mcp.requests":
                        total += sum(p.as_int or p.as_double for p in metric.sum.data_points)
    return total


@pytest.mark.parametrize(
    ("preference", "lean", "readers"), [("cumulative", True, 0), ("cumulative", False, 1), ("delta", True, 2)]
)
async def test_metrics_and_otlp_share_one_aggregation_when_both_are_cumulative(
    monkeypatch: pytest.MonkeyPatch,
    http_receiver: tuple[str, Received],
    preference: str,
    lean: bool,
    readers: int,
) -> None:
    """One aggregation per measurement feeds OTLP and /metrics (the lean meter, or one SDK reader);
    delta needs the SDK and a reader of its own for /metrics."""
    endpoint, received = http_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", preference)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # only the flushes below export
    providers = build_providers("outrider-proxy", lean_metrics=lean)
    if readers:
        assert providers.meter is None and providers.meter_provider is not None
        assert len(providers.meter_provider._metric_readers) == readers
    else:
        assert providers.meter is not None and providers.meter_provider is None
    observer = providers.observer(TelemetryConfig(), AuditLog(io.StringIO()), lambda: WORKLOAD)
    _drive(observer)
    text = providers.prometheus().decode()
    # Scraping twice changes nothing the exporter sends (a scrape never exports, never resets).
    assert providers.prometheus().decode().count("outrider_mcp_requests_total{") == text.count(
        "outrider_mcp_requests_total{"
    )
    await asyncio.sleep(0.2)
    assert received.metrics == []  # scrapes exported nothing
    await asyncio.wait_for(asyncio.to_thread(providers.force_flush), timeout=30)
    assert len(received.metrics) == 1
    assert _requests_points(received) == 2  # both calls, whatever /metrics did in between
    scraped = sum(
        float(line.rsplit(" ", 1)[1])
        for line in providers.prometheus().decode().splitlines()
        if line.startswith("outrider_mcp_requests_total{")
    )
    assert scraped == 2
    await asyncio.wait_for(asyncio.to_thread(providers.shutdown), timeout=30)
