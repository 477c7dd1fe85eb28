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
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from outrider.sidecar.telemetry.otlp_wire import TraceRequestEncoder, attributes, span_field
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
    lambda name, kind, trace_id, span_id, parent, remote, state, start, length, attrs, status: _record(
        name, kind, trace_id, span_id, parent, remote, state, start, length, attrs, status
    ),
    st.sampled_from(["tools/call echo", "outrider.token_exchange", "initialize", "é"]),
    st.sampled_from([1, 2, 3]),
    st.integers(min_value=1, max_value=2**128 - 1),
    IDS64,
    st.one_of(st.just(0), IDS64),
    st.booleans(),
    st.sampled_from(["", "vendor=x", "a=1,b=2"]),
    # Times from a real clock: never 0, which protobuf would leave out and the encoder writes.
    st.integers(min_value=1, max_value=2**63),
    st.integers(min_value=0, max_value=10**9),
    st.dictionaries(KEYS, VALUES, max_size=8),
    st.sampled_from([(0, ""), (2, "egress denied"), (2, "")]),
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
) -> SpanRecord:
    record = SpanRecord(
        name, kind, trace_id, span_id, parent, remote and bool(parent), state, True, start, attrs
    )
    record.end_ns = start + length
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
