"""The recording path's shortcuts give what the plain computations give.

The audit time text without a datetime, the `mcp.call` event in one literal, metric keys made once per
attribute set, a cache-hit exchange recorded in its call's worker job, and audit lines written to the
stream's binary layer.
"""

from __future__ import annotations

import io
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry import audit, observer_otel, semconv
from outrider.sidecar.telemetry.audit import AuditLog, EventStamp, mcp_call_event, time_text_ns
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.metric_points import HistogramPoint, LeanMeter, NumberPoint
from outrider.sidecar.telemetry.observer import ExchangeOutcome, PolicyOutcome, Principal, RequestInfo
from outrider.sidecar.telemetry.observer_otel import OtelObserver
from outrider.sidecar.telemetry.worker import Job, Worker

from .harness import WORKLOAD, validate_event

ALICE = Principal(kind="oidc", subject="alice", issuer="https://idp.test", client_id="cli", delegation=("a",))
REQUEST = RequestInfo(
    http_method="POST",
    transport="streamable-http",
    protocol_version="2025-06-18",
    session_id="s-1",
    client_address="10.0.0.9:5000",
)
CALL = McpMessage(kind="request", method="tools/call", id=7, tool_name="echo", arguments={"text": "hi"})
HIT = ExchangeOutcome(outcome="cache_hit", audience="https://api", duration_s=0.00002)


@given(st.integers(min_value=0, max_value=4 * 10**18))
@example(999_999_500)
@example(1_999_999_999)
@example(1_764_000_000_999_999_499)
@example(1_764_000_000_999_500_000)
def test_time_text_of_a_nanosecond_clock_is_the_datetime_text(time_ns: int) -> None:
    expected = datetime.fromtimestamp(time_ns / 1e9, UTC).isoformat(timespec="milliseconds")
    assert time_text_ns(time_ns) == expected.replace("+00:00", "Z")
    assert EventStamp.at_ns(time_ns).time == expected.replace("+00:00", "Z")


def _reference_mcp_call_event(stamp: EventStamp, **kw: Any) -> dict[str, Any]:
    """The event as `_base` and `_mcp` compose it (how `mcp_call_event` built it before)."""
    event = audit._base(
        "mcp.call",
        stamp,
        outcome=kw["outcome"],
        reason=kw["reason"],
        workload=kw["workload"],
        principal=kw["principal"],
        duration_s=kw["duration_s"],
    )
    mcp = audit._mcp(kw["message"], kw["request"])
    mcp["http_status"] = kw["http_status"]
    mcp["error_type"] = kw["error_type"]
    mcp["token_exchange"] = kw.get("token_exchange")
    config: TelemetryConfig = kw["config"]
    if config.record_arguments and kw["message"].arguments is not None:
        mcp["arguments"] = audit.redact_arguments(kw["message"].arguments, config.redact_keys)
    event["mcp"] = mcp
    policy: PolicyOutcome | None = kw.get("policy")
    if policy is not None:
        event["policy"] = {
            "decision": policy.decision,
            "policies": list(policy.policies),
            "rate_limit": policy.rate_limit,
            "retry_after_s": policy.retry_after_s,
        }
    return event


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"principal": None, "reason": None, "token_exchange": None},
        {"reason": "upstream said Bearer abc.def.ghi", "outcome": "error", "error_type": "502"},
        {"policy": PolicyOutcome("deny", ("p1", "p2"), "ok", None), "outcome": "denied"},
        {"config": TelemetryConfig(record_arguments=True)},
        {"message": McpMessage(kind="response", id=3), "request": RequestInfo("POST", "stateless")},
        {"message": McpMessage(kind="invalid")},
        {"message": McpMessage(kind="request", method="prompts/get", id="x", prompt_name="p")},
    ],
)
def test_the_mcp_call_event_is_the_composed_event(variant: dict[str, Any]) -> None:
    stamp = EventStamp.at_ns(
        1_764_000_000_123_456_789, "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    )
    args: dict[str, Any] = {
        "message": CALL,
        "request": REQUEST,
        "principal": ALICE,
        "workload": WORKLOAD,
        "outcome": "ok",
        "reason": None,
        "http_status": 200,
        "error_type": None,
        "duration_s": 0.0123456,
        "config": TelemetryConfig(),
        "token_exchange": "cache_hit",
    } | variant
    event = mcp_call_event(stamp, **args)
    expected = _reference_mcp_call_event(stamp, **args)
    assert event == expected
    # Same key order too: the audit line's bytes are unchanged.
    assert audit.encode(event) == audit.encode(expected)
    validate_event(event)


class CountingWorker(Worker):
    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.jobs = 0

    def submit(self, job: Job) -> None:
        self.jobs += 1
        super().submit(job)


def _sdk_observer(
    meter: LeanMeter | None = None,
) -> tuple[OtelObserver, InMemorySpanExporter, CountingWorker]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker = CountingWorker()
    observer = OtelObserver(
        TelemetryConfig(),
        tracer_provider=tracer_provider,
        meter_provider=meter or LeanMeter(),
        audit=AuditLog(io.StringIO()),
        workload=lambda: WORKLOAD,
        worker=worker,
    )
    return observer, exporter, worker


def test_a_cache_hit_is_recorded_in_its_calls_job_just_before_the_call() -> None:
    observer, exporter, worker = _sdk_observer()
    with observer.mcp_call(CALL, REQUEST) as scope:
        scope.set_principal(ALICE)
        scope.token_exchange(HIT)
        assert worker.jobs == 0 and not exporter.get_finished_spans()
        scope.finish(http_status=200, outcome="ok")
    assert worker.jobs == 1
    # The order a job of its own gave: the exchange span ends before the call's.
    assert [s.kind for s in exporter.get_finished_spans()] == [SpanKind.CLIENT, SpanKind.SERVER]
    observer.worker.drain()
    assert observer.exchanges._counts == {(("cache_hit", True), ("outcome", "cache_hit")): 1}


def test_an_issued_exchange_and_a_second_hit_are_jobs_of_their_own() -> None:
    observer, exporter, worker = _sdk_observer()
    with observer.mcp_call(CALL, REQUEST) as scope:
        scope.token_exchange(
            ExchangeOutcome("issued", audience="https://api", idp_status=200, duration_s=0.01)
        )
        assert worker.jobs == 1  # its audit line is written at once
        scope.token_exchange(HIT)
        scope.token_exchange(HIT)
        assert worker.jobs == 2  # the first hit goes when a second one comes
        scope.finish(http_status=200, outcome="ok")
    assert worker.jobs == 3
    kinds = [s.kind for s in exporter.get_finished_spans()]
    assert kinds == [SpanKind.CLIENT, SpanKind.CLIENT, SpanKind.CLIENT, SpanKind.SERVER]


def test_a_hit_after_the_call_finished_is_still_recorded() -> None:
    observer, exporter, worker = _sdk_observer()
    with observer.mcp_call(CALL, REQUEST) as scope:
        scope.finish(http_status=200, outcome="ok")
        scope.token_exchange(HIT)
    assert worker.jobs == 2
    assert [s.kind for s in exporter.get_finished_spans()] == [SpanKind.SERVER, SpanKind.CLIENT]


def _series(meter: LeanMeter, name: str) -> Counter[frozenset[tuple[str, Any]]]:
    out: Counter[frozenset[tuple[str, Any]]] = Counter()
    for metric in meter.collect():
        if metric.name != name:
            continue
        for point in metric.points:
            if isinstance(point, HistogramPoint):
                out[frozenset(point.attributes.items())] += point.count
            else:
                assert isinstance(point, NumberPoint)
                out[frozenset(point.attributes.items())] += int(point.value)
    return out


def test_call_metrics_per_attribute_set_through_a_small_key_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observer_otel, "_CALL_METRIC_KEYS_MAX", 2)  # cleared again and again
    meter = LeanMeter()
    observer, exporter, _ = _sdk_observer(meter)
    error = McpMessage(kind="response", id=1, is_error=True, error_code=-32000)
    calls: list[tuple[McpMessage, RequestInfo, dict[str, Any]]] = [
        (CALL, REQUEST, {"http_status": 200, "outcome": "ok"}),
        (CALL, REQUEST, {"http_status": 200, "outcome": "error", "error_type": "-32000", "response": error}),
        (CALL, REQUEST, {"http_status": 200, "outcome": "tool_error"}),
        (CALL, REQUEST, {"http_status": 502, "outcome": "error"}),
        (CALL, REQUEST, {"http_status": 504, "outcome": "error", "error_type": "timeout"}),
        (
            McpMessage(kind="request", method="tools/call", id=2, tool_name="other"),
            REQUEST,
            {"http_status": 200, "outcome": "ok"},
        ),
        (
            McpMessage(kind="request", method="prompts/get", id=3, prompt_name="p"),
            REQUEST,
            {"http_status": 200, "outcome": "ok"},
        ),
        (
            CALL,
            RequestInfo("POST", "stateless", protocol_version="2026-07-28"),
            {"http_status": 200, "outcome": "ok"},
        ),
        (
            McpMessage(kind="notification", method="notifications/initialized"),
            REQUEST,
            {"http_status": 202, "outcome": "ok"},
        ),
    ]
    expected_durations: Counter[frozenset[tuple[str, Any]]] = Counter()
    expected_requests: Counter[frozenset[tuple[str, Any]]] = Counter()
    for _ in range(3):
        for message, request, finish in calls:
            exporter.clear()
            with observer.mcp_call(message, request) as scope:
                scope.finish(**finish)
            (span,) = exporter.get_finished_spans()
            attrs = dict(span.attributes or {})
            expected_durations[frozenset(semconv.duration_metric_attributes(attrs).items())] += 1
            counted = semconv.request_counter_attributes(attrs, finish["outcome"])
            expected_requests[frozenset(counted.items())] += 1
    assert len(expected_durations) == len(calls)
    assert _series(meter, "mcp.server.operation.duration") == expected_durations
    assert _series(meter, "outrider.mcp.requests") == expected_requests


class _TextCalls(io.TextIOWrapper):
    """A UTF-8 text stream over bytes that counts what reaches its text layer."""

    text_writes = 0

    def write(self, text: str) -> int:
        self.text_writes += 1
        return super().write(text)


def test_audit_lines_go_to_the_binary_layer_with_the_text_paths_bytes_and_order() -> None:
    """orjson's UTF-8 is written as is (no decode and re-encode), after text others wrote to the stream."""
    events: list[dict[str, Any]] = [
        {"type": "mcp.call", "n": 1, "tool": "météo"},
        {"type": "mcp.call", "n": 2, "big": 1 << 70},  # orjson refuses it: the json module's line
        {"type": "mcp.call", "n": 3, "odd": "\ud800"},  # a lone surrogate: escaped, never lost
    ]
    raw = io.BytesIO()
    stream = _TextCalls(raw, encoding="utf-8", write_through=False)
    stream.write("someone else's text first\n")
    log = AuditLog(stream)
    log.write(events[0])
    for event in events[1:]:
        log.write(event, hold=True)
    log.flush_held()
    assert stream.text_writes == 1  # only the other writer's
    expected = "someone else's text first\n" + "".join(audit.encode_line(e) for e in events)
    assert raw.getvalue() == expected.encode()

    text = io.StringIO()  # no binary layer: text, the same lines
    other = AuditLog(text)
    for event in events:
        other.write(event)
    assert text.getvalue() == "".join(audit.encode_line(e) for e in events)

    latin = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")  # not UTF-8: through the text layer
    AuditLog(latin).write({"type": "x", "s": "é"})
    latin.flush()
    assert latin.buffer.getvalue() == '{"type":"x","s":"é"}\n'.encode("latin-1")  # type: ignore[attr-defined]
