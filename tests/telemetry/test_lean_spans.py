"""The lean span path against the OpenTelemetry SDK path: the same OTLP, field for field, and nothing lost.

Both paths export over real OTLP/HTTP to a local receiver that decodes the payloads with the official
`opentelemetry-proto` messages; the same calls are driven through each, with the same random seed.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry import spans
from outrider.sidecar.telemetry.audit import AuditLog
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.observer import (
    EgressDecision,
    ExchangeOutcome,
    PolicyOutcome,
    Principal,
    RequestInfo,
)
from outrider.sidecar.telemetry.observer_lean import LeanObserver
from outrider.sidecar.telemetry.observer_otel import OtelObserver
from outrider.sidecar.telemetry.setup import ExportPlan, build_providers, lean_spans_blocker
from outrider.sidecar.telemetry.span_export import BatchSettings, SpanBatcher
from outrider.sidecar.telemetry.spans import (
    KIND_SERVER,
    SamplerPlan,
    SpanRecord,
    extract_parent,
    sampler_plan,
)
from outrider.sidecar.telemetry.worker import Worker

from .harness import WORKLOAD, validate_event
from .otlp_receiver import Received, otlp_http_receiver

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ALICE = Principal(
    kind="oidc", subject="alice", issuer="https://idp.test", client_id="cli", delegation=("spiffe://a/b",)
)
SPIFFE_CALLER = Principal(kind="spiffe", subject="spiffe://cluster.local/ns/agents/sa/planner")


def _request(headers: Mapping[str, str] | None = None, version: str = "2025-06-18") -> RequestInfo:
    return RequestInfo(
        http_method="POST",
        transport="streamable-http",
        protocol_version=version,
        session_id="s-1",
        client_address="10.0.0.9:50123",
        headers=dict(headers or {}),
    )


def _drive(observer: OtelObserver) -> list[dict[str, str]]:
    """Calls covering every span shape the proxy makes; returns the trace headers sent upstream."""
    sent: list[dict[str, str]] = []

    def inject(scope: Any, method: str = "tools/call") -> None:
        headers: dict[str, str] = {}
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}
        scope.inject_context(headers, body)
        assert body["params"]["_meta"] == headers  # the MCP conventions' carrier too
        sent.append(headers)

    # 1. A continued trace with tracestate; exchange from the IdP; policy; ok.
    with observer.mcp_call(
        McpMessage(kind="request", method="tools/call", id=1, tool_name="echo"),
        _request({"Traceparent": PARENT, "tracestate": "vendor=abc,other=1"}),
    ) as s:
        s.set_principal(ALICE)
        s.policy(PolicyOutcome("allow", ("p-1", "p-2"), rate_limit="ok"))
        s.token_exchange(ExchangeOutcome("issued", audience="https://api", idp_status=200, duration_s=0.0123))
        inject(s)
        s.finish(http_status=200, outcome="ok", response=McpMessage(kind="response", id=1))
    # 2. A new trace; cached exchange; the tool reports an error.
    with observer.mcp_call(
        McpMessage(kind="request", method="tools/call", id=2, tool_name="fetch"), _request()
    ) as s:
        s.set_principal(ALICE)
        s.token_exchange(ExchangeOutcome("cache_hit", audience="https://api", duration_s=0.00002))
        inject(s)
        s.finish(
            http_status=200, outcome="tool_error", response=McpMessage(kind="response", id=2, is_error=True)
        )
    # 3. The IdP refuses, with the token echoed in its reason (scrubbed); a JSON-RPC error.
    with observer.mcp_call(
        McpMessage(kind="request", method="prompts/get", id="p", prompt_name="summarise"), _request()
    ) as s:
        s.set_principal(SPIFFE_CALLER)
        s.token_exchange(
            ExchangeOutcome("idp_error", audience="x", reason=f"invalid_grant for {TOKEN}", idp_status=400)
        )
        s.finish(
            http_status=200,
            outcome="error",
            reason=f"Bearer {TOKEN} refused",
            response=McpMessage(kind="response", id="p", error_code=-32603),
        )
    # 4. Sampled out by the caller (flags 00): no span exported, the context still propagates.
    with observer.mcp_call(
        McpMessage(
            kind="request",
            method="tools/call",
            id=4,
            tool_name="echo",
            trace_context={"traceparent": "00-11111111111111111111111111111111-2222222222222222-00"},
        ),
        _request(),
    ) as s:
        inject(s)
        s.finish(http_status=200, outcome="ok")
    # 5. A notification, refused before authentication; a stateless revision (no session id).
    with observer.mcp_call(
        McpMessage(kind="notification", method="notifications/initialized"), _request(version="2026-07-28")
    ) as s:
        s.finish(http_status=401, outcome="denied", error_type="invalid_token", reason="no bearer token")
    # 6. An exception inside the call, and a call left unanswered.
    with (
        pytest.raises(RuntimeError),
        observer.mcp_call(McpMessage(kind="request", method="tools/list", id=6), _request()),
    ):
        raise RuntimeError("boom")
    with observer.mcp_call(McpMessage(kind="request", method="resources/read", id=7), _request()):
        pass
    # 7. Egress decisions.
    observer.egress(
        EgressDecision(True, "capture", "tls", "10.1.1.1", 443, "api.example.com", "r1", "allowed", "ns")
    )
    observer.egress(EgressDecision(False, "explicit", "connect", None, 22, "evil.example", None, "no rule"))
    return sent


def _normalise(received: Received) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Spans as dicts (in export order by name and id); times replaced by their difference."""
    spans: list[dict[str, Any]] = []
    resource: dict[str, Any] = {}
    for request in received.traces:
        for rs in request.resource_spans:
            resource = MessageToDict(rs.resource)
            assert not rs.schema_url
            for ss in rs.scope_spans:
                assert MessageToDict(ss.scope) == {"name": "outrider.sidecar"}
                for span in ss.spans:
                    d = MessageToDict(span)
                    # A server span lasts as long as the call took; exchange and egress spans are
                    # placed from the facts reported, so their durations must match exactly.
                    duration = span.end_time_unix_nano - span.start_time_unix_nano
                    assert duration >= 0
                    if span.kind != KIND_SERVER:
                        d["duration"] = duration
                    assert span.start_time_unix_nano > 1_600_000_000 * 10**9
                    del d["startTimeUnixNano"], d["endTimeUnixNano"]
                    # Attribute order is not meaningful in OTLP; compare them as a set of entries.
                    d["attributes"] = sorted(json.dumps(a, sort_keys=True) for a in d.get("attributes", []))
                    spans.append(d)
    spans.sort(key=lambda d: (d["name"], d["spanId"]))
    return spans, resource


async def _run(monkeypatch: pytest.MonkeyPatch, *, lean: bool) -> dict[str, Any]:
    async with otlp_http_receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
        providers = build_providers(
            "outrider-proxy",
            resource_attributes={"k8s.pod.name": "weather-0", "k8s.namespace.name": "tools"},
            lean_spans=lean,
        )
        assert (providers.lean is not None) == lean
        stream = io.StringIO()
        observer = providers.observer(
            TelemetryConfig(record_resource_uri=True),
            AuditLog(stream),
            lambda: WORKLOAD,
            Worker(enabled=False),
        )
        assert isinstance(observer, LeanObserver) == lean
        random.seed(1234)  # both paths draw their ids (and the audit event ids) from `random`
        sent = _drive(observer)
        await asyncio.wait_for(asyncio.to_thread(providers.shutdown), timeout=30)
        spans, resource = _normalise(received)
        audit = [json.loads(line) for line in stream.getvalue().splitlines()]
        for event in audit:
            validate_event(event)
            event.pop("time")
            if event["type"] == "mcp.call":
                assert event.pop("duration_ms") >= 0  # how long the call took
        return {
            "spans": spans,
            "resource": resource,
            "sent": sent,
            "audit": audit,
            "metrics": providers.prometheus().decode(),
            "raw": b"".join(received.raw),
        }


async def test_lean_spans_equal_the_sdk_spans_field_for_field(monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = await _run(monkeypatch, lean=False)
    lean = await _run(monkeypatch, lean=True)
    # Two server spans sampled out or not exported: 1-3, 5, 6, 7 server spans, 3 exchanges, 2 egress.
    assert len(sdk["spans"]) == 11
    assert lean["spans"] == sdk["spans"]
    assert lean["resource"] == sdk["resource"]
    assert lean["sent"] == sdk["sent"]
    assert lean["sent"][0]["tracestate"] == "vendor=abc,other=1"
    assert lean["sent"][0]["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert lean["sent"][2]["traceparent"].endswith("-00")  # sampled out, still propagated
    assert lean["audit"] == sdk["audit"]
    assert len(lean["audit"]) == 11  # 7 calls, 2 exchanges that asked the IdP, 2 egress decisions
    # The metrics are the SDK's on both paths; /metrics matches apart from histogram sums of durations.
    assert _metric_lines(lean["metrics"]) == _metric_lines(sdk["metrics"])
    for raw in (lean["raw"], sdk["raw"]):
        assert TOKEN.encode() not in raw and b"eyJ" not in raw
    by_name = {s["name"]: s for s in lean["spans"]}
    server = by_name["tools/call echo"]
    assert server["kind"] == "SPAN_KIND_SERVER"
    assert server["parentSpanId"] and server["traceState"] == "vendor=abc,other=1"
    assert server["flags"] == 0x300  # the parent was remote
    refused = by_name["prompts/get summarise"]
    assert refused["status"] == {"code": "STATUS_CODE_ERROR", "message": "-32603"}


def _metric_lines(text: str) -> list[str]:
    """/metrics without the values that depend on timing (histogram sums and bucket spreads)."""
    return [
        line
        for line in text.splitlines()
        if "_sum{" not in line
        and "_bucket{" not in line
        and not line.startswith("outrider_token_exchange_dur")
    ]


TRACEPARENT_CASES = [
    {"traceparent": PARENT},
    {"TRACEPARENT": PARENT, "TraceState": "a=1,b=2"},
    {"traceparent": PARENT.replace("-01", "-00")},
    {"traceparent": " " + PARENT + "\t"},
    {"traceparent": PARENT + "-extra"},
    {"traceparent": "01" + PARENT[2:] + "-extra"},
    {"traceparent": "ff" + PARENT[2:]},
    {"traceparent": PARENT.upper()},
    {"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"},
    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"},
    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"},
    {"traceparent": PARENT + "x" * 600},
    {"traceparent": PARENT, "tracestate": "not a valid list!!"},
    {"traceparent": PARENT, "tracestate": "k=" + "v" * 9000},
    {"traceparent": PARENT, "tracestate": ""},
    {"traceparent": ""},
    {"tracestate": "a=1"},
    {},
]


@pytest.mark.parametrize("carrier", TRACEPARENT_CASES)
def test_trace_context_is_read_as_the_sdk_propagator_reads_it(carrier: dict[str, str]) -> None:
    from outrider.sidecar.telemetry.observer_otel import _GETTER

    ctx = trace.get_current_span(TraceContextTextMapPropagator().extract(carrier, getter=_GETTER))
    expected = ctx.get_span_context()
    parent = extract_parent(carrier)
    if not expected.is_valid:
        assert parent is None
        return
    assert parent is not None
    assert (parent.trace_id, parent.span_id, parent.sampled) == (
        expected.trace_id,
        expected.span_id,
        expected.trace_flags.sampled,
    )
    assert parent.trace_state == (expected.trace_state.to_header() if expected.trace_state else "")


@pytest.mark.parametrize(
    ("name", "arg"),
    [
        ("parentbased_always_on", None),
        ("always_on", None),
        ("always_off", None),
        ("parentbased_always_off", None),
        ("traceidratio", "0.25"),
        ("parentbased_traceidratio", "0.5"),
        ("parentbased_traceidratio", "not a number"),
    ],
)
def test_sampling_decisions_match_the_sdk_samplers(
    monkeypatch: pytest.MonkeyPatch, name: str, arg: str | None
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    if arg is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    provider = TracerProvider()
    plan = sampler_plan(provider.sampler)
    assert plan is not None
    tracer = provider.get_tracer("t")
    rng = random.Random(7)
    for i in range(300):
        flags = "01" if i % 2 else "00"
        carrier = (
            {}
            if i % 3 == 0
            else {"traceparent": f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-{flags}"}
        )
        parent = extract_parent(carrier)
        context = TraceContextTextMapPropagator().extract(carrier)
        span = tracer.start_span("x", context=context)
        sdk_sampled = span.get_span_context().trace_flags.sampled
        assert plan.sampled(span.get_span_context().trace_id, parent) == sdk_sampled


def test_a_custom_sampler_or_grpc_keeps_the_sdk_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        sampler_plan(sampling.ParentBased(sampling.ALWAYS_ON, remote_parent_not_sampled=sampling.ALWAYS_ON))
        is None
    )
    assert lean_spans_blocker(ExportPlan(traces="grpc"), {}) == "traces are exported over OTLP/gRPC"
    assert lean_spans_blocker(ExportPlan(traces="http/protobuf"), {"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "3"})
    assert lean_spans_blocker(ExportPlan(traces="http/protobuf"), {}) is None
    assert lean_spans_blocker(ExportPlan(), {}) is None  # spans made for propagation, not exported
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    providers = build_providers("outrider-proxy")
    assert providers.lean is None
    providers.shutdown()


async def test_every_span_audit_line_and_metric_point_arrives_under_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four threads, 2,000 calls with background recording and small batches: no span, audit line or
    metric point is lost (on /metrics and in the OTLP metrics export)."""
    calls, threads = 2000, 4
    async with otlp_http_receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "64")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "100000")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
        providers = build_providers("outrider-proxy")
        assert providers.batcher is not None and providers.batcher.settings.max_export_batch_size == 64
        stream = io.StringIO()
        worker = Worker(enabled=True)
        observer = providers.observer(TelemetryConfig(), AuditLog(stream), lambda: WORKLOAD, worker)

        def client(n: int) -> None:
            for i in range(n):
                with observer.mcp_call(
                    McpMessage(kind="request", method="tools/call", id=i, tool_name="echo"), _request()
                ) as s:
                    s.set_principal(ALICE)
                    s.token_exchange(ExchangeOutcome("cache_hit", audience="a"))
                    s.finish(http_status=200, outcome="ok")

        def load() -> None:
            pool = [threading.Thread(target=client, args=(calls // threads,)) for _ in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            worker.close()

        await asyncio.to_thread(load)
        metrics = providers.prometheus().decode()
        await asyncio.wait_for(asyncio.to_thread(providers.shutdown), timeout=60)
        kinds = [
            span.kind
            for r in received.traces
            for rs in r.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]
        assert kinds.count(KIND_SERVER) == calls
        assert len(kinds) == 2 * calls  # each with its exchange span
        assert len({len(r.resource_spans[0].scope_spans[0].spans) for r in received.traces} - {64}) <= 1
        assert providers.batcher.dropped == 0 and providers.batcher.exported == 2 * calls
        assert len(stream.getvalue().splitlines()) == calls
        counted = (
            'outrider_mcp_requests_total{gen_ai_tool_name="echo",mcp_method_name="tools/call",outcome="ok"}'
        )
        assert f"{counted} {calls}.0" in metrics.splitlines()
        durations = next(
            m for m in metrics.splitlines() if m.startswith("mcp_server_operation_duration_seconds_count")
        )
        assert durations.endswith(f" {calls}.0")
        # The OTLP metrics the shutdown exported (lean metrics) count every call too.
        assert providers.meter is not None and received.metrics
        exported = {
            m.name: m
            for rm in received.metrics[-1].resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }
        assert sum(p.as_int for p in exported["outrider.mcp.requests"].sum.data_points) == calls
        assert sum(p.count for p in exported["mcp.server.operation.duration"].histogram.data_points) == calls
        assert sum(p.as_int for p in exported["outrider.token_exchanges"].sum.data_points) == calls


def _record(i: int) -> SpanRecord:
    return SpanRecord("s", KIND_SERVER, i + 1, i + 1, 0, False, "", True, 1, {"i": i})


def test_a_full_queue_drops_the_oldest_spans_and_counts_them() -> None:
    sent: list[list[int]] = []
    in_send, release = threading.Event(), threading.Event()

    def encode(batch: Any) -> bytes:
        sent.append([r.attributes["i"] for r in batch])
        in_send.set()
        assert release.wait(10)
        return b""

    batcher = SpanBatcher(encode, lambda data: True, BatchSettings(10, 10, 60.0), lambda: None)
    for i in range(10):  # a full batch wakes the exporter thread, which blocks in `encode`
        batcher.add(_record(i))
    assert in_send.wait(10)
    for i in range(10, 25):  # 15 more into a queue of 10: the 5 oldest of them are dropped
        batcher.add(_record(i))
    assert batcher.dropped == 5
    release.set()
    batcher.shutdown()
    assert sent[0] == list(range(10))
    assert [i for batch in sent[1:] for i in batch] == list(range(15, 25))
    assert batcher.exported == 20
    batcher.add(_record(99))  # after shutdown: dropped, counted, never sent
    assert batcher.dropped == 6


def test_invalid_batch_settings_are_refused_as_the_sdk_refuses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "10")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "20")
    with pytest.raises(ValueError, match="max_export_batch_size"):
        BatchSettings.from_env()


def test_a_failing_receiver_counts_failed_spans_and_keeps_exporting() -> None:
    results = iter([False, True])
    batcher = SpanBatcher(
        lambda batch: b"x", lambda data: next(results), BatchSettings(100, 5, 60.0), lambda: None
    )
    for i in range(10):
        batcher.add(_record(i))
    batcher.force_flush()
    batcher.shutdown()
    assert (batcher.failed, batcher.exported) == (5, 5)


def test_sampler_plan_bounds() -> None:
    always = SamplerPlan(parent_based=False, bound=1 << 64)
    never = SamplerPlan(parent_based=True, bound=0)
    assert always.sampled((1 << 128) - 1, None)
    assert not never.sampled(0, None)
    time.sleep(0)


def test_sdk_export_is_named_for_the_switch_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    lean = build_providers("outrider-proxy")
    assert not lean.sdk_export()  # lean spans and metrics: their threads yield the GIL themselves
    lean.shutdown()
    sdk = build_providers("outrider-proxy", lean_spans=False)
    assert sdk.sdk_export()
    sdk.shutdown()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    metrics_sdk = build_providers("outrider-proxy")
    assert metrics_sdk.lean is not None and metrics_sdk.meter is None and metrics_sdk.sdk_export()
    metrics_sdk.shutdown()


def test_chunked_encoding_pauses_between_chunks_and_writes_the_same_bytes() -> None:
    from outrider.sidecar.telemetry.otlp_wire import TraceRequestEncoder

    encoder = TraceRequestEncoder({"service.name": "s"}, "outrider.sidecar")
    records = [_record(i) for i in range(200)]
    pauses: list[int] = []
    chunked = encoder.encode(records, pause=lambda: pauses.append(1), every=64)
    assert chunked == encoder.encode(records)
    assert len(pauses) == 3  # between 4 chunks (64, 64, 64, 8)


def test_a_root_spans_ids_come_from_one_draw_as_from_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """`new_ids` gives what `new_trace_id` then `new_span_id` gave (the SDK's order of draws)."""
    for seed in range(64):
        random.seed(seed)
        expected = (spans.new_trace_id(), spans.new_span_id())
        random.seed(seed)
        assert spans.new_ids() == expected
    # A zero id (one draw in 2**128 or 2**64) is drawn again.
    for draws, ids in (([7 << 128, 9], (9, 7)), ([5, 0, 11], (5, 11))):
        values = iter(draws)
        monkeypatch.setattr(random, "getrandbits", lambda k, values=values: next(values))
        assert spans.new_ids() == ids
