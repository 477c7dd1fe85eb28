"""Telemetry written from the call's fields gives the bytes the general path gives.

The `mcp.call` audit line from cached blocks (`audit.CallLines`) against the event's line, the line's
way past the denial aggregator (`AuditLog.write_line`), and the token exchange's span written without
a record (`LeanTracer.emit`) against the record's encoding: byte for byte, on whole calls too.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry import audit, observer_lean, otlp_wire, semconv
from outrider.sidecar.telemetry.audit import (
    AuditLog,
    CallLines,
    EventStamp,
    Workload,
    encode_line_bytes,
    mcp_call_event,
)
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.metric_points import LeanMeter
from outrider.sidecar.telemetry.observer import ExchangeOutcome, PolicyOutcome, Principal, RequestInfo
from outrider.sidecar.telemetry.observer_lean import LeanObserver
from outrider.sidecar.telemetry.spans import ALWAYS_ON, LeanTracer, ParentContext, SamplerPlan, SpanRecord
from outrider.sidecar.telemetry.worker import Worker

from .harness import WORKLOAD

ALICE = Principal(kind="oidc", subject="alice", issuer="https://idp.test", client_id="cli", delegation=("a",))
REQUEST = RequestInfo("POST", "streamable-http", "2025-06-18", "s-1", "10.0.0.9:5000")
CALL = McpMessage(kind="request", method="tools/call", id=7, tool_name="echo")
STATELESS = RequestInfo("POST", "stateless", "2025-06-18", "s-1", "10.0.0.9:5000")

# Text with what JSON escapes (quotes, backslashes, controls), non-ASCII and lone surrogates
# (orjson refuses those: the line falls back to the event path).
_TEXT = st.text(max_size=12)
_OPT_TEXT = st.none() | _TEXT
_IDS = st.none() | st.integers(min_value=-(2**70), max_value=2**70) | _TEXT | st.floats(allow_nan=False)
_PRINCIPALS = st.none() | st.builds(
    Principal,
    kind=st.sampled_from(["oidc", "spiffe", "anonymous"]),
    subject=_TEXT,
    issuer=_OPT_TEXT,
    client_id=_OPT_TEXT,
    delegation=st.lists(_TEXT, max_size=2).map(tuple),
)
_MESSAGES = st.builds(
    McpMessage,
    kind=st.sampled_from(["request", "notification", "response", "invalid"]),
    method=_OPT_TEXT,
    id=_IDS,
    tool_name=_OPT_TEXT,
    prompt_name=_OPT_TEXT,
    resource_uri=_OPT_TEXT,
)
_REQUESTS = st.builds(
    RequestInfo,
    http_method=st.just("POST"),
    transport=st.sampled_from(["streamable-http", "stateless", "sse-legacy"]),
    protocol_version=_OPT_TEXT,
    session_id=_OPT_TEXT,
    client_address=_OPT_TEXT,
)
_POLICIES = st.none() | st.builds(
    PolicyOutcome,
    decision=st.sampled_from(["allow", "deny", "rate_limited"]),
    policies=st.lists(_TEXT, max_size=2).map(tuple),
    rate_limit=st.sampled_from([None, "ok", "limited", "store_unavailable"]),
    retry_after_s=st.none() | st.floats(min_value=0, max_value=100),
)
_CALLS = st.fixed_dictionaries(
    {
        "message": _MESSAGES,
        "request": _REQUESTS,
        "principal": _PRINCIPALS,
        "outcome": st.sampled_from(["ok", "error", "denied", "tool_error"]),
        "reason": st.none() | st.sampled_from(["upstream said Bearer abc.def.ghi", "no"]) | _TEXT,
        "http_status": st.sampled_from([0, 200, 403, 502]),
        "error_type": st.none() | st.sampled_from(["tool_error", "-32000", "timeout"]),
        "duration_s": st.floats(min_value=0, max_value=1e4),
        "token_exchange": st.sampled_from([None, "cache_hit", "issued"]),
        "policy": _POLICIES,
    }
)


def _event_line(
    event_id: str, time_text: str, trace: str | None, span: str | None, call: dict[str, Any]
) -> bytes:
    stamp = EventStamp(event_id, time_text, trace, span)
    return encode_line_bytes(mcp_call_event(stamp, workload=WORKLOAD, config=TelemetryConfig(), **call))


@settings(max_examples=300, deadline=None)  # no timing assert: a loaded machine took 281 ms once
@given(st.lists(_CALLS, min_size=1, max_size=4), st.data())
def test_call_lines_are_the_event_lines(calls: list[dict[str, Any]], data: st.DataObject) -> None:
    lines = CallLines()
    for call in calls * 2:  # the second time round from cached blocks
        trace = data.draw(st.none() | st.just("0af7651916cd43dd8448eb211c80319c"))
        span = data.draw(st.none() | st.just("b7ad6b7169203331"))
        event_id, time_text = audit.random_uuid4(), audit.time_text_ns(data.draw(st.integers(0, 4 * 10**18)))
        line = lines.line(event_id, time_text, trace, span, workload=WORKLOAD, **call)
        expected = _event_line(event_id, time_text, trace, span, call)
        if line is None:
            # Only where orjson refuses a value: the event path writes the json module's line.
            with pytest.raises(TypeError):
                audit.orjson.dumps(
                    mcp_call_event(
                        EventStamp(event_id, time_text), workload=WORKLOAD, config=TelemetryConfig(), **call
                    ),
                    default=str,
                )
        else:
            assert line == expected


def test_call_line_blocks_are_per_object_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_LINE_BLOCKS_MAX", 2)
    lines = CallLines()
    call: dict[str, Any] = {
        "message": CALL,
        "request": REQUEST,
        "outcome": "ok",
        "reason": None,
        "http_status": 200,
        "error_type": None,
        "duration_s": 0.01,
        "token_exchange": "cache_hit",
        "policy": None,
    }
    # Equal principals and workloads that are other objects, and many of them past the bound: each
    # line still names its own caller and workload.
    for n in range(6):
        principal = Principal(kind="oidc", subject=f"user-{n % 3}", issuer="https://idp.test")
        workload = Workload(f"spiffe://td/ns/n/sa/{n % 2}", "pod", "ns")
        line = lines.line("e", "t", None, None, principal=principal, workload=workload, **call)
        stamp = EventStamp("e", "t")
        event = mcp_call_event(
            stamp, principal=principal, workload=workload, config=TelemetryConfig(), **call
        )
        assert line == encode_line_bytes(event)
    assert len(lines._who) <= 2 and len(lines._names) <= 2 and len(lines._answers) <= 2


_STREAMS: list[io.TextIOWrapper] = []  # kept open: a collected wrapper closes its bytes


def _log() -> tuple[AuditLog, io.BytesIO]:
    raw = io.BytesIO()
    _STREAMS.append(io.TextIOWrapper(raw, encoding="utf-8"))
    return AuditLog(_STREAMS[-1]), raw


def test_write_line_writes_what_write_writes_and_holds_as_it_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MAX_HELD", 3)
    events = [{"type": "mcp.call", "outcome": "ok", "n": n} for n in range(8)]
    by_event, raw_event = _log()
    by_line, raw_line = _log()
    for n, event in enumerate(events):
        hold = n != 6
        by_event.write(event, hold=hold)
        assert by_line.write_line(encode_line_bytes(event), "ok", hold=hold)
        assert raw_line.getvalue() == raw_event.getvalue()  # written at the same moments
        assert by_line._held == by_event._held
    by_event.flush_held()
    by_line.flush_held()
    assert raw_line.getvalue() == raw_event.getvalue()
    assert raw_line.getvalue().count(b"\n") == 8


def test_write_line_leaves_denials_and_open_windows_to_the_aggregator() -> None:
    log, raw = _log()
    log.aggregator.window_s = 60.0
    denied = mcp_call_event(
        EventStamp("e", "t"),
        message=CALL,
        request=REQUEST,
        principal=ALICE,
        workload=WORKLOAD,
        outcome="denied",
        reason="policy",
        http_status=403,
        error_type="forbidden",
        duration_s=0.0,
        config=TelemetryConfig(),
    )
    assert log.write_line(b"x\n", "ok")  # no window open, no denial: written
    assert not log.write_line(encode_line_bytes(denied), "denied")  # a denial: the event's way
    log.write(denied)  # opens a window
    assert not log.write_line(b"y\n", "ok")  # a window is open: the event's way (to close it in time)
    log.aggregator.window_s = 0.0
    log.close()
    assert raw.getvalue().startswith(b"x\n")
    assert b"y\n" not in raw.getvalue()
    assert AuditLog(None).write_line(b"z\n", "ok")  # audit off: nothing to write


_OUTCOMES = [
    ExchangeOutcome("cache_hit", audience="https://api", duration_s=0.00002),
    ExchangeOutcome("cache_hit", duration_s=0.0),
    ExchangeOutcome("issued", audience="https://api", idp_status=200, duration_s=0.25),
    ExchangeOutcome("idp_error", reason="IdP said Bearer eyJabcdefgh.x.y", idp_status=400, duration_s=1.5),
    ExchangeOutcome("idp_unavailable", reason="connection refused", duration_s=3.0),
    ExchangeOutcome("cache_hit", duration_s=0),  # an int: the record's way (no float to write)
]
_PARENTS = [
    None,
    ParentContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True, "vendor=abc", True),
    ParentContext(5, 6, False, "", False),
]
_PLANS = [ALWAYS_ON, SamplerPlan(False, 1 << 63), SamplerPlan(True, 0), SamplerPlan(False, 0)]


@pytest.mark.parametrize("plan", _PLANS)
@pytest.mark.parametrize("parent", _PARENTS)
@pytest.mark.parametrize("outcome", _OUTCOMES)
def test_the_exchange_span_from_its_fields_is_the_records(
    plan: SamplerPlan, parent: ParentContext | None, outcome: ExchangeOutcome
) -> None:
    results = []
    for emit in (True, False):
        random.seed(7)
        out: list[bytes] = []
        records: list[SpanRecord] = []

        def sink(record: SpanRecord, out: list[bytes] = out, records: list[SpanRecord] = records) -> None:
            records.append(record)
            out.append(otlp_wire.span_field(record))

        tracer = LeanTracer(plan, sink, out.append if emit else None)
        observer = LeanObserver(
            TelemetryConfig(),
            tracer=tracer,
            meter_provider=LeanMeter(),
            audit=AuditLog(None),
            workload=lambda: WORKLOAD,
            worker=Worker(enabled=False),
        )
        scope = observer.mcp_call(CALL, RequestInfo("POST", "streamable-http"))
        if parent is not None:
            scope._span = tracer.start("tools/call echo", 2, {}, parent=parent)
        ids = scope._exchange_span(outcome, 1_764_000_000_000_000_000, 1_764_000_000_250_000_000)
        no_ids = scope._exchange_span(outcome, 1, 2, ids=False)
        assert no_ids == (None, None)
        results.append((out, ids))
        if not emit and records:
            assert ids == records[0].ids()  # the ids name the span the exporter gets
        assert len(out) == (2 if tracer.child_sampled(scope._span) else 0)
    assert results[0] == results[1]


class _NoLines(CallLines):
    """Every line the event's way (the general path)."""

    def line(self, *args: Any, **kwargs: Any) -> None:
        return None

    def blocks(self, *args: Any, **kwargs: Any) -> None:
        return None


def _drive(observer: LeanObserver) -> None:
    """Calls of every shape the scope records: hits, issued and failed exchanges, policy, errors."""
    error = McpMessage(kind="response", id=1, is_error=True, error_code=-32000)
    parent = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "v=1"}
    traced = RequestInfo("POST", "streamable-http", "2025-06-18", None, "10.0.0.9:5000", headers=parent)
    shapes: list[
        tuple[McpMessage, RequestInfo, list[ExchangeOutcome], PolicyOutcome | None, dict[str, Any]]
    ] = [
        (CALL, REQUEST, [_OUTCOMES[0]], None, {"http_status": 200, "outcome": "ok"}),
        (CALL, traced, [_OUTCOMES[0], _OUTCOMES[0]], None, {"http_status": 200, "outcome": "ok"}),
        (
            CALL,
            REQUEST,
            [_OUTCOMES[2]],
            PolicyOutcome("allow", ("p",)),
            {"http_status": 200, "outcome": "ok"},
        ),
        (CALL, REQUEST, [_OUTCOMES[3]], None, {"http_status": 502, "outcome": "error", "reason": "idp"}),
        (CALL, REQUEST, [], PolicyOutcome("deny", ("p",)), {"http_status": 403, "outcome": "denied"}),
        (CALL, REQUEST, [_OUTCOMES[0]], None, {"http_status": 200, "outcome": "error", "response": error}),
        (
            McpMessage(kind="request", method="tools/call", id=9, tool_name="\ud800"),
            REQUEST,
            [],
            None,
            {"http_status": 200, "outcome": "ok"},
        ),
        (
            McpMessage(kind="notification", method="notifications/initialized"),
            REQUEST,
            [],
            None,
            {"http_status": 202, "outcome": "ok"},
        ),
    ]
    for _ in range(2):
        for message, request, exchanges, policy, finish in shapes:
            with observer.mcp_call(message, request) as scope:
                scope.set_principal(ALICE)
                if policy is not None:
                    scope.policy(policy)
                for outcome in exchanges:
                    scope.token_exchange(outcome)
                scope.finish(**finish)


def _both_ways(
    monkeypatch: pytest.MonkeyPatch,
    drive: Callable[[LeanObserver], None],
    config: TelemetryConfig,
    workloads: Callable[[], Callable[[], Workload]] = lambda: lambda: WORKLOAD,
) -> tuple[list[bytes], bytes]:
    """The span and audit bytes of `drive`, from fields and the general way (asserted equal)."""
    written = []
    for shortcuts in (True, False):
        random.seed(1234)  # the span ids and audit event ids come from `random`
        # The clocks too: the same times and durations on both runs.
        ticks = iter(range(1_764_000_000_000_000_000, 1_764_000_100_000_000_000, 1_234_567))
        monkeypatch.setattr(time, "time_ns", lambda ticks=ticks: next(ticks))
        counts = iter(range(10**6))
        monkeypatch.setattr(time, "perf_counter", lambda counts=counts: next(counts) / 1024)
        spans: list[bytes] = []
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="utf-8")
        tracer = LeanTracer(ALWAYS_ON, lambda r, spans=spans: spans.append(otlp_wire.span_field(r)))
        if shortcuts:
            tracer.emit = spans.append
        meter = LeanMeter()
        observer = LeanObserver(
            config,
            tracer=tracer,
            meter_provider=meter,
            audit=AuditLog(stream),
            workload=workloads(),
            worker=Worker(enabled=False),
        )
        if not shortcuts:
            observer.call_lines = _NoLines()
        drive(observer)
        stream.flush()
        points = [(m.name, sorted(str(p) for p in m.points)) for m in meter.collect()]
        written.append((spans, raw.getvalue(), points))
    assert written[0] == written[1]
    return written[0][0], written[0][1]


@pytest.mark.parametrize("record_arguments", [False, True])
def test_whole_calls_write_the_general_paths_bytes(
    record_arguments: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans, audit lines and metric points of whole calls are the same written from fields and the
    general way."""
    spans, lines = _both_ways(monkeypatch, _drive, TelemetryConfig(record_arguments=record_arguments))
    assert len(spans) == 2 * (8 + 6)  # every call's span, every exchange's
    assert lines.count(b'"type":"mcp.call"') == 16


def test_request_blocks_are_per_distinct_facts_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observer_lean, "_REQUEST_BLOCKS_MAX", 2)  # cleared again and again

    def drive(observer: LeanObserver) -> None:
        for n in range(12):
            message = McpMessage(
                kind="request" if n % 4 else "notification",
                method="tools/call" if n % 3 else "resources/read",
                id=None if n % 4 == 0 else n,
                tool_name=f"tool-{n % 3}" if n % 3 else None,
                resource_uri=None if n % 3 else f"file:///{n}",
            )
            request = RequestInfo(
                "POST", "streamable-http", "2025-06-18", f"s-{n % 2}", f"10.0.0.{n % 5}:{n}"
            )
            with observer.mcp_call(message, request) as scope:
                scope.set_principal(ALICE)
                scope.finish(http_status=200, outcome="ok")
        assert len(observer.request_blocks) <= 2

    spans, lines = _both_ways(monkeypatch, drive, TelemetryConfig(record_resource_uri=True))
    assert len(spans) == 12 and lines.count(b"\n") == 12


@pytest.mark.parametrize("hash_user", [False, True])
def test_final_entries_are_per_distinct_answer_and_principal_and_bounded(
    hash_user: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer's attributes, their fields and the metric keys are made once per distinct answer
    and principal *object* (an equal principal made anew, or a new one at a recycled address, gets
    its own), and the same bytes and points come out with the tables cleared again and again."""
    monkeypatch.setattr(observer_lean, "_FINAL_ENTRIES_MAX", 2)
    monkeypatch.setattr(observer_lean, "_ANSWERED_PER_ENTRY_MAX", 1)
    error = McpMessage(kind="response", id=1, is_error=True, error_code=-32601)

    def drive(observer: LeanObserver) -> None:
        for n in range(24):
            principal = (
                None
                if n % 5 == 0
                else Principal(
                    kind="oidc" if n % 2 else "spiffe", subject=f"user-{n % 3}", issuer="https://i"
                )
            )
            message = McpMessage(kind="request", method="tools/call", id=n, tool_name=f"tool-{n % 2}")
            # The same request blocks (the transport is not among their facts), another line block.
            request = REQUEST if n % 7 < 4 else STATELESS
            with observer.mcp_call(message, request) as scope:
                if principal is not None:
                    scope.set_principal(principal)
                if n % 4 == 1:
                    scope.token_exchange(_OUTCOMES[0])
                finish: dict[str, Any] = [
                    {"http_status": 200, "outcome": "ok"},
                    {"http_status": 200, "outcome": "error", "response": error},
                    {"http_status": 401, "outcome": "unauthenticated", "error_type": "invalid_token"},
                ][n % 3]
                scope.finish(**finish)
            del principal  # its address may come back for the next one
        assert len(observer.final_entries) <= 2

    def workloads() -> Callable[[], Workload]:
        # Equal workloads as distinct objects (as the identity component makes a new one on rotation),
        # and one with another SPIFFE ID: each line names the one its call saw.
        made = iter(
            [Workload(WORKLOAD.spiffe_id, WORKLOAD.pod, WORKLOAD.namespace) for _ in range(12)]
            + [Workload("spiffe://other.test/x", WORKLOAD.pod, WORKLOAD.namespace)] * 12
        )
        return lambda: next(made)

    config = TelemetryConfig(hash_user=hash_user, hash_salt="s" if hash_user else "")
    spans, lines = _both_ways(monkeypatch, drive, config, workloads)
    assert len(spans) == 24 + 6 and lines.count(b"\n") == 24
    assert lines.count(b'"transport":"stateless"') == 9 and lines.count(b"spiffe://other.test/x") == 12


def test_repeated_answers_share_one_final_entry() -> None:
    tracer = LeanTracer(ALWAYS_ON, lambda r: None, lambda b: None)
    observer = LeanObserver(
        TelemetryConfig(),
        tracer=tracer,
        meter_provider=LeanMeter(),
        audit=AuditLog(io.StringIO()),
        workload=lambda: WORKLOAD,
        worker=Worker(enabled=False),
    )
    for n in range(5):
        with observer.mcp_call(
            McpMessage(kind="request", method="tools/call", id=n, tool_name="echo"), REQUEST
        ) as scope:
            scope.set_principal(ALICE)
            scope.token_exchange(_OUTCOMES[0])
            scope.finish(http_status=200, outcome="ok")
    (entry,) = observer.final_entries.values()
    assert entry.principal is ALICE and len(entry.answered) == 1
    (answered,) = entry.answered.values()
    assert answered.line is not None and answered.line[0] is WORKLOAD  # the audit line's blocks too
    # A reason (free text) or a policy verdict is never kept.
    with observer.mcp_call(CALL, REQUEST) as scope:
        scope.policy(PolicyOutcome("allow", ("p",)))
        scope.finish(http_status=200, outcome="ok", reason="upstream said so")
    assert len(observer.final_entries) == 1


@pytest.mark.parametrize("record_resource_uri", [False, True])
def test_server_span_names_are_kept_per_method_and_target_and_bounded(
    record_resource_uri: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(observer_lean, "_SPAN_NAMES_MAX", 2)
    config = TelemetryConfig(record_resource_uri=record_resource_uri)
    observer = LeanObserver(
        config,
        tracer=LeanTracer(ALWAYS_ON, None),
        meter_provider=LeanMeter(),
        audit=AuditLog(None),
        workload=lambda: WORKLOAD,
        worker=Worker(enabled=False),
    )
    messages = [
        McpMessage(kind="request", method="tools/call", id=1, tool_name="echo"),
        McpMessage(kind="request", method="tools/call", id=2, tool_name="other"),
        McpMessage(kind="request", method="prompts/get", id=3, prompt_name="echo"),
        McpMessage(kind="request", method="resources/read", id=4, resource_uri="file:///a"),
        McpMessage(kind="notification", method="notifications/initialized"),
        McpMessage(kind="response", id=5),
        McpMessage(kind="invalid"),
    ]
    for message in messages * 3:
        with observer.mcp_call(message, REQUEST) as scope:
            assert scope._span.name == semconv.mcp_span_name(message, config)
            scope.finish(http_status=200, outcome="ok")
        assert 0 < len(observer.span_names) <= 2


def test_kept_line_blocks_follow_the_transport_and_the_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same answer and request blocks with another transport (not a request-block fact) or
    another workload object (a pod name the identity component changed) write their own lines."""

    def workloads() -> Callable[[], Workload]:
        # Four calls per object: pod-a, an equal pod-a made anew, pod-b.
        objects = [
            Workload(WORKLOAD.spiffe_id, pod, WORKLOAD.namespace) for pod in ("pod-a", "pod-a", "pod-b")
        ]
        made = (objects[(n // 4) % 3] for n in range(10**6))
        return lambda: next(made)

    def drive(observer: LeanObserver) -> None:
        for n in range(12):
            message = McpMessage(kind="request", method="tools/call", id=n, tool_name="echo")
            with observer.mcp_call(message, STATELESS if n % 4 == 1 else REQUEST) as scope:
                scope.set_principal(ALICE)
                scope.finish(http_status=200, outcome="ok")
        assert len(observer.final_entries) <= 1  # (none on the general path)

    _spans, lines = _both_ways(monkeypatch, drive, TelemetryConfig(), workloads)
    assert lines.count(b'"transport":"stateless"') == 3 and lines.count(b'"pod":"pod-b"') == 4
