"""OTLP/protobuf export requests written straight from span records and metric points, in one pass.

Pure: the protobuf wire format (varints, length-delimited fields, fixed64) for the few messages a
trace or metrics export needs, field for field what the SDK's encoder builds for the same spans.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from outrider.sidecar.telemetry.metric_points import HistogramPoint, MetricData, NumberPoint
from outrider.sidecar.telemetry.spans import SpanRecord

_VARINT1 = [bytes((i,)) for i in range(128)]
_FIXED64 = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack
_MASK64 = (1 << 64) - 1

# Repeated attribute values (method, tool, transport, identities) are encoded once and reused.
_KV_CACHE: dict[tuple[bytes, str, type, Any], bytes] = {}
_KV_CACHE_MAX = 4096


def utf8(text: str) -> bytes:
    """UTF-8 for a protobuf string; a lone surrogate (a caller's tool name) becomes "?", as a receiver
    rejects invalid UTF-8 and one such value must not fail a whole export request."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def varint(value: int) -> bytes:
    if value < 128:
        return _VARINT1[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (_VARINT1[n] if n < 128 else varint(n)) + payload


def any_value(value: Any) -> bytes:
    """`AnyValue` (common.proto), as the SDK's `_encode_value` maps Python values."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", utf8(value))
    if isinstance(value, int):
        return b"\x18" + varint(value & _MASK64)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join(_field(b"\x0a", key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"cannot encode an attribute of type {type(value).__name__}")


def key_value(key: str, value: Any) -> bytes:
    """`KeyValue`: key = 1, value = 2."""
    return _field(b"\x0a", utf8(key)) + _field(b"\x12", any_value(value))


def attributes(tag: bytes, attrs: Mapping[str, Any]) -> bytes:
    """Repeated `KeyValue` fields under `tag` (Resource/InstrumentationScope field 1, Span field 9)."""
    cache = _KV_CACHE
    out = []
    for key, value in attrs.items():
        if isinstance(value, float):  # durations: unique per span, not worth caching
            out.append(_field(tag, key_value(key, value)))
            continue
        cache_key = (tag, key, type(value), value)  # the type too: True == 1 as dict keys
        encoded = cache.get(cache_key)
        if encoded is None:
            if len(cache) >= _KV_CACHE_MAX:
                cache.clear()
            encoded = cache[cache_key] = _field(tag, key_value(key, value))
        out.append(encoded)
    return b"".join(out)


_FLAGS_TAG = b"\x85\x01"  # field 16, wire type 5 (fixed32)
_HAS_IS_REMOTE = struct.pack("<I", 0x100)
_HAS_IS_REMOTE_REMOTE = struct.pack("<I", 0x300)


def span(record: SpanRecord) -> bytes:
    """`Span` (trace.proto) for one record."""
    parts = [
        b"\x0a\x10" + record.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + record.span_id.to_bytes(8, "big"),
    ]
    if record.trace_state:
        parts.append(_field(b"\x1a", utf8(record.trace_state)))
    if record.parent_span_id:
        parts.append(b"\x22\x08" + record.parent_span_id.to_bytes(8, "big"))
    parts.append(_field(b"\x2a", utf8(record.name)))
    parts.append(b"\x30" + _VARINT1[record.kind])
    parts.append(b"\x39" + _FIXED64(record.start_ns))
    parts.append(b"\x41" + _FIXED64(record.end_ns))
    parts.append(attributes(b"\x4a", record.attributes))
    status = b""
    if record.status_message:
        status += _field(b"\x12", utf8(record.status_message))
    if record.status_code:
        status += b"\x18" + _VARINT1[record.status_code]
    parts.append(_field(b"\x7a", status))  # the SDK always sends a Status, empty when unset
    parts.append(_FLAGS_TAG + (_HAS_IS_REMOTE_REMOTE if record.remote_parent else _HAS_IS_REMOTE))
    return b"".join(parts)


class TraceRequestEncoder:
    """Writes `ExportTraceServiceRequest` bytes for batches of records from one resource and scope."""

    def __init__(
        self, resource: Mapping[str, Any], scope_name: str, scope_version: str | None = None
    ) -> None:
        # Resource {attributes = 1}; InstrumentationScope {name = 1, version = 2}: encoded once.
        self._resource = _field(b"\x0a", attributes(b"\x0a", resource))
        scope = _field(b"\x0a", utf8(scope_name))
        if scope_version:
            scope += _field(b"\x12", utf8(scope_version))
        self._scope = _field(b"\x0a", scope)

    def encode(
        self, records: Sequence[SpanRecord], pause: Callable[[], object] | None = None, every: int = 64
    ) -> bytes:
        """The request for `records`; `pause` (if given) is called between chunks of `every` spans."""
        if pause is None or len(records) <= every:
            spans = b"".join(_field(b"\x12", span(r)) for r in records)
        else:
            chunks = []
            for start in range(0, len(records), every):
                if start:
                    pause()
                chunks.append(b"".join(_field(b"\x12", span(r)) for r in records[start : start + every]))
            spans = b"".join(chunks)
        scope_spans = _field(b"\x12", self._scope + spans)  # ScopeSpans {scope = 1, spans = 2}
        return _field(b"\x0a", self._resource + scope_spans)  # ResourceSpans {resource = 1, scope_spans = 2}


_PACKED_FIXED64: dict[int, struct.Struct] = {}
_PACKED_DOUBLE: dict[int, struct.Struct] = {}


def _packed(cache: dict[int, struct.Struct], code: str, values: Sequence[float]) -> bytes:
    packer = cache.get(len(values))
    if packer is None:
        packer = cache[len(values)] = struct.Struct(f"<{len(values)}{code}")
    return packer.pack(*values)


def number_point(point: NumberPoint) -> bytes:
    """`NumberDataPoint` (metrics.proto): attributes = 7, start = 2, time = 3, as_double = 4, as_int = 6."""
    out = attributes(b"\x3a", point.attributes)
    if point.start_ns:
        out += b"\x11" + _FIXED64(point.start_ns)
    out += b"\x19" + _FIXED64(point.time_ns)
    value = point.value
    if isinstance(value, int) and not isinstance(value, bool):
        return out + b"\x31" + _FIXED64(value & _MASK64)  # sfixed64
    return out + b"\x21" + _DOUBLE(float(value))


def histogram_point(point: HistogramPoint) -> bytes:
    """`HistogramDataPoint`: attributes = 9, start = 2, time = 3, count = 4, sum = 5, bucket_counts = 6,
    explicit_bounds = 7, min = 11, max = 12 (all set, as the SDK sets them for a cumulative histogram)."""
    return b"".join(
        (
            attributes(b"\x4a", point.attributes),
            b"\x11" + _FIXED64(point.start_ns),
            b"\x19" + _FIXED64(point.time_ns),
            b"\x21" + _FIXED64(point.count),
            b"\x29" + _DOUBLE(float(point.sum)),
            _field(b"\x32", _packed(_PACKED_FIXED64, "Q", point.bucket_counts)),
            _field(b"\x3a", _packed(_PACKED_DOUBLE, "d", point.bounds)) if point.bounds else b"",
            b"\x59" + _DOUBLE(float(point.min)),
            b"\x61" + _DOUBLE(float(point.max)),
        )
    )


_CUMULATIVE = b"\x10\x02"  # aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE


def metric(data: MetricData) -> bytes:
    """`Metric`: name = 1, description = 2, unit = 3, gauge = 5, sum = 7, histogram = 9."""
    out = _field(b"\x0a", utf8(data.name))
    if data.description:
        out += _field(b"\x12", utf8(data.description))
    if data.unit:
        out += _field(b"\x1a", utf8(data.unit))
    if data.kind == "histogram":
        points = b"".join(
            _field(b"\x0a", histogram_point(p)) for p in data.points if isinstance(p, HistogramPoint)
        )
        return out + _field(b"\x4a", points + _CUMULATIVE)
    numbers = b"".join(_field(b"\x0a", number_point(p)) for p in data.points if isinstance(p, NumberPoint))
    if data.kind == "sum":
        return out + _field(b"\x3a", numbers + _CUMULATIVE + b"\x18\x01")  # is_monotonic = 3
    return out + _field(b"\x2a", numbers)


class MetricsRequestEncoder(TraceRequestEncoder):
    """Writes `ExportMetricsServiceRequest` bytes: ResourceMetrics {resource = 1, scope_metrics = 2}."""

    def encode_metrics(self, data: Iterable[MetricData]) -> bytes:
        metrics = b"".join(_field(b"\x12", metric(m)) for m in data)
        scope_metrics = _field(b"\x12", self._scope + metrics)  # ScopeMetrics {scope = 1, metrics = 2}
        return _field(b"\x0a", self._resource + scope_metrics)
