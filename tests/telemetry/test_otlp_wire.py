"""`otlp_wire`'s span encoding against protobuf's own: the same bytes for any span record.

The lean path writes each span when it ends (`span_field`) and joins them per request
(`encode_fields`), with encoded attribute fields cached across spans: every request must be the
`ExportTraceServiceRequest` the `opentelemetry-proto` classes serialize for the same spans, whatever
the cache held before.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from outrider.sidecar.telemetry.metric_points import HistogramPoint, MetricData, NumberPoint
from outrider.sidecar.telemetry.otlp_wire import (
    TraceRequestEncoder,
    attributes,
    histogram_point,
    metric,
    number_point,
    request_id_field,
    span,
    span_field,
)
from outrider.sidecar.telemetry.spans import SpanRecord

RESOURCE = {"service.name": "outrider-proxy", "k8s.pod.name": "pod-0"}
SCOPE = "outrider.sidecar"

# Keys the sidecar uses (cached, and `jsonrpc.request.id`, never cached) and a few others.
KEYS = st.sampled_from(
    [
        "mcp.method.name",
        "jsonrpc.request.id",
        "gen_ai.tool.name",
        "http.response.status_code",
        "outrider.token_exchange.cache_hit",
        "outrider.token_exchange.duration_s",
        "outrider.delegation.chain",
        "k",
    ]
)
TEXT = st.text(max_size=12)
VALUES = st.one_of(
    TEXT,
    st.sampled_from(["tools/call", "echo", "tcp", "\ud800"]),  # repeats, and a lone surrogate
    st.booleans(),
    st.sampled_from([0, 1, 200]),  # equal to False / True as dict keys: the cache must tell them apart
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.tuples(TEXT, TEXT),
)
IDS64 = st.integers(min_value=1, max_value=2**64 - 1)
RECORDS = st.builds(
    lambda name, kind, trace_id, span_id, parent, remote, state, start, length, attrs, status, no_end: (
        _record(name, kind, trace_id, span_id, parent, remote, state, start, length, attrs, status, no_end)
    ),
    # "" and kind 0 (unspecified): proto3 defaults, which protobuf leaves out.
    st.sampled_from(["tools/call echo", "outrider.token_exchange", "initialize", "é", ""]),
    st.sampled_from([0, 1, 2, 3, 4, 5]),
    st.integers(min_value=1, max_value=2**128 - 1),
    IDS64,
    st.one_of(st.just(0), IDS64),
    st.booleans(),
    st.sampled_from(["", "vendor=x", "a=1,b=2"]),
    # Times from a real clock, and 0 (a default protobuf leaves out) for the start, the end or both.
    st.one_of(st.just(0), st.integers(min_value=1, max_value=2**63)),
    st.integers(min_value=0, max_value=10**9),
    st.dictionaries(KEYS, VALUES, max_size=8),
    st.sampled_from([(0, ""), (2, "egress denied"), (2, "")]),
    st.booleans(),
)


def _record(
    name: str,
    kind: int,
    trace_id: int,
    span_id: int,
    parent: int,
    remote: bool,
    state: str,
    start: int,
    length: int,
    attrs: dict[str, Any],
    status: tuple[int, str],
    no_end: bool = False,
) -> SpanRecord:
    record = SpanRecord(
        name, kind, trace_id, span_id, parent, remote and bool(parent), state, True, start, attrs
    )
    record.end_ns = 0 if no_end else start + length
    record.status_code, record.status_message = status
    return record


def _text(value: str) -> str:
    return value.encode("utf-8", "replace").decode()  # a lone surrogate goes out as "?"


def _any(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=_text(value))
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    out = AnyValue()
    out.array_value.values.extend(_any(v) for v in value)
    return out


def _key_values(attrs: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_any(v)) for k, v in attrs.items()]


def _expected(records: list[SpanRecord]) -> bytes:
    """The request as `opentelemetry-proto` serializes it (what the SDK's encoder builds)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend(_key_values(RESOURCE))
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = SCOPE
    for r in records:
        span = Span(
            trace_id=r.trace_id.to_bytes(16, "big"),
            span_id=r.span_id.to_bytes(8, "big"),
            trace_state=r.trace_state,
            parent_span_id=r.parent_span_id.to_bytes(8, "big") if r.parent_span_id else b"",
            name=_text(r.name),
            kind=r.kind,  # type: ignore[arg-type]
            start_time_unix_nano=r.start_ns,
            end_time_unix_nano=r.end_ns,
            status=Status(message=r.status_message, code=r.status_code),  # type: ignore[arg-type]
            flags=0x300 if r.remote_parent else 0x100,
        )
        span.attributes.extend(_key_values(r.attributes))
        scope_spans.spans.append(span)
    return request.SerializeToString()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORDS, max_size=6), st.lists(RECORDS, max_size=6))
def test_spans_written_as_they_end_are_the_bytes_protobuf_writes(
    first: list[SpanRecord], second: list[SpanRecord]
) -> None:
    encoder = TraceRequestEncoder(RESOURCE, SCOPE)
    # Two requests in a row: the second meets a cache the first (and earlier examples) filled.
    for records in (first, second):
        written = encoder.encode_fields([span_field(r) for r in records])
        assert written == _expected(records)
        assert encoder.encode(records) == written  # the batch form writes the same request


def test_equal_values_of_another_type_are_not_taken_from_the_cache() -> None:
    # True == 1 and hash(True) == hash(1): a cache keyed by value alone would send a bool as an int.
    key = "outrider.test.flag"
    as_bool, as_int, again = (attributes(b"\x4a", {key: v}) for v in (True, 1, True))
    assert as_bool != as_int
    assert as_bool == again
    assert as_int == _field_of(key, AnyValue(int_value=1))
    assert as_bool == _field_of(key, AnyValue(bool_value=True))


def _field_of(key: str, value: AnyValue) -> bytes:
    """One attribute as the `Span.attributes` field (tag 9) protobuf writes."""
    span = Span()
    span.attributes.append(KeyValue(key=key, value=value))
    return span.SerializeToString()


def test_zero_times_kind_and_name_are_left_out_as_protobuf_leaves_them_out() -> None:
    # The hand-decoded reading of the example the property test covers: a span that never started or
    # ended (times 0), of kind unspecified (0) and without a name holds none of those fields.
    record = _record("", 0, 1, 2, 0, False, "", 0, 0, {}, (0, ""))
    written = span(record)
    assert written == _expected_span(record)
    assert written == (
        b"\x0a\x10" + (1).to_bytes(16, "big") + b"\x12\x08" + (2).to_bytes(8, "big") + b"\x7a\x00"
        b"\x85\x01" + (0x100).to_bytes(4, "little")
    )
    # One time set: only that one (tag 7 or 8, fixed64).
    only_end = _record("x", 1, 1, 2, 0, False, "", 0, 5, {}, (0, ""))
    assert b"\x41" + (5).to_bytes(8, "little") in span(only_end) and b"\x39" not in span(only_end)
    assert span(only_end) == _expected_span(only_end)


def _expected_span(record: SpanRecord) -> bytes:
    request = ExportTraceServiceRequest.FromString(_expected([record]))
    return request.resource_spans[0].scope_spans[0].spans[0].SerializeToString()


POINT_TIMES = st.one_of(st.just(0), st.integers(min_value=1, max_value=2**64 - 1))
NUMBER_POINTS = st.builds(
    NumberPoint,
    st.dictionaries(KEYS, st.sampled_from(["a", 1, True]), max_size=2),
    POINT_TIMES,
    POINT_TIMES,
    st.one_of(st.just(0), st.just(0.0), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats()),
)
HISTOGRAM_POINTS = st.builds(
    lambda attrs, start, time, count, total, counts, low, high: HistogramPoint(
        attrs, start, time, count, total, tuple(counts), tuple(range(len(counts) - 1)), low, high
    ),
    st.dictionaries(KEYS, st.sampled_from(["a", 1]), max_size=2),
    POINT_TIMES,
    POINT_TIMES,
    st.one_of(st.just(0), st.integers(min_value=1, max_value=2**64 - 1)),
    st.sampled_from([0.0, 1.5]),
    st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=4),
    st.sampled_from([0.0, -1.0]),
    st.sampled_from([0.0, 7.0]),
)
METRICS = st.one_of(
    st.builds(
        MetricData,
        st.sampled_from(["", "outrider_x"]),
        st.sampled_from(["", "s"]),
        st.sampled_from(["", "d"]),
        st.sampled_from(["sum", "gauge"]),
        st.lists(NUMBER_POINTS, max_size=3).map(tuple),
    ),
    st.builds(
        MetricData,
        st.sampled_from(["", "mcp.server.operation.duration"]),
        st.just("s"),
        st.just(""),
        st.just("histogram"),
        st.lists(HISTOGRAM_POINTS, max_size=3).map(tuple),
    ),
)


def _expected_metric(data: MetricData) -> bytes:
    out = Metric(name=data.name, unit=data.unit, description=data.description)
    if data.kind == "histogram":
        out.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
        for h in data.points:
            assert isinstance(h, HistogramPoint)
            point = out.histogram.data_points.add(
                start_time_unix_nano=h.start_ns,
                time_unix_nano=h.time_ns,
                count=h.count,
                sum=h.sum,
                bucket_counts=h.bucket_counts,
                explicit_bounds=h.bounds,
                min=h.min,
                max=h.max,
            )
            point.attributes.extend(_key_values(dict(h.attributes)))
        return out.SerializeToString()
    if data.kind == "sum":
        out.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
        out.sum.is_monotonic = True
        points = out.sum.data_points
    else:
        out.gauge.SetInParent()
        points = out.gauge.data_points
    for n in data.points:
        assert isinstance(n, NumberPoint)
        number = points.add(start_time_unix_nano=n.start_ns, time_unix_nano=n.time_ns)
        if isinstance(n.value, int):
            number.as_int = n.value
        else:
            number.as_double = n.value
        number.attributes.extend(_key_values(dict(n.attributes)))
    return out.SerializeToString()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(METRICS)
def test_metrics_are_the_bytes_protobuf_writes(data: MetricData) -> None:
    assert metric(data) == _expected_metric(data)


def test_a_point_at_time_0_holds_no_time_field_and_a_zero_value_is_still_written() -> None:
    # Hand-decoded: NumberDataPoint { as_int (6, sfixed64) = 0 } only: the times (2, 3) are defaults
    # and left out; the value is in a `oneof`, so a 0 is written.
    assert number_point(NumberPoint({}, 0, 0, 0)) == b"\x31" + bytes(8)
    empty = HistogramPoint({}, 0, 0, 0, 0.0, (), (), 0.0, 0.0)
    # Only the `optional` sum (5), min (11) and max (12), each a double 0.0.
    assert histogram_point(empty) == b"\x29" + bytes(8) + b"\x59" + bytes(8) + b"\x61" + bytes(8)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_the_request_id_field_is_the_attribute_protobuf_writes(request_id: str) -> None:
    """Short ids are written at once (every length one byte), long ones field by field: both as
    protobuf writes `KeyValue("jsonrpc.request.id", request_id)` under `Span.attributes`."""
    value = request_id.encode("utf-8", "replace")  # (a lone surrogate is sent as "?", as `utf8` does)
    expected = Span(
        attributes=[KeyValue(key="jsonrpc.request.id", value=AnyValue(string_value=value.decode()))]
    ).SerializeToString()
    assert request_id_field(request_id) == expected
