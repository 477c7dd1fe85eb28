"""OTLP/protobuf export requests written straight from span records and metric points, in one pass.

Pure: the protobuf wire format (varints, length-delimited fields, fixed64) for the few messages a
trace or metrics export needs, field for field what the SDK's encoder builds for the same spans.
Byte for byte what protobuf writes: a proto3 scalar without `optional` (times, counts, kind, name)
is left out when it holds its default (0, ""); `oneof` and `optional` fields are written whatever
they hold.
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

# Repeated attribute values (method, tool, transport, identities) are encoded once and reused: per
# field tag, per key, a bounded table of value -> (type, encoded field) (lookups only, no key tuple
# per attribute; the type checked on a hit, as True == 1 as dict keys).
_KV_PER_KEY_MAX = 512
_KV_CACHED_TYPES = (str, bool, int, tuple)
# Values unique to one span or point: encoded every time, never cached (they would only churn a table).
_UNCACHED_KEYS = frozenset({"jsonrpc.request.id"})
_NEW_KEY: dict[Any, tuple[type, bytes]] = {}  # marks a key not seen yet (never holds anything)


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
    if n < 128:
        return tag + _VARINT1[n] + payload
    if n < 16384:  # two bytes (a span's length): no call to `varint`
        return tag + bytes(((n & 0x7F) | 0x80, n >> 7)) + payload
    return tag + varint(n) + payload


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


class _AttributeFields:
    """Encodes attribute sets as repeated `KeyValue` fields under one tag, with the cache above."""

    __slots__ = ("_by_key", "_keys", "_tag")

    def __init__(self, tag: bytes) -> None:
        self._tag = tag
        # key -> {value: (its type, the encoded field)}, or None for a key whose values are not cached
        # (decided by its first value). The type is checked on a hit: True == 1 == 1.0 as dict keys.
        self._by_key: dict[str, dict[Any, tuple[type, bytes]] | None] = {}
        self._keys: dict[str, bytes] = {}  # key -> its encoded `KeyValue.key` field, for uncached values

    def encode(self, attrs: Mapping[str, Any]) -> bytes:
        by_key = self._by_key
        out = []
        for key, value in attrs.items():
            per_key = by_key.get(key, _NEW_KEY)
            if per_key is None:  # floats (durations), unique ids
                out.append(self._uncached(key, value))
                continue
            if per_key is _NEW_KEY:
                per_key = self._new_key(key, value)
                if per_key is None:
                    out.append(self._uncached(key, value))
                    continue
            entry = per_key.get(value)
            if entry is None or entry[0] is not type(value):
                entry = self._cache(per_key, key, value)
            out.append(entry[1])
        return b"".join(out)

    def _new_key(self, key: str, value: Any) -> dict[Any, tuple[type, bytes]] | None:
        if len(self._by_key) >= _KV_PER_KEY_MAX:
            self._by_key.clear()
        cached = type(value) in _KV_CACHED_TYPES and key not in _UNCACHED_KEYS
        per_key: dict[Any, tuple[type, bytes]] | None = {} if cached else None
        self._by_key[key] = per_key
        return per_key

    def _cache(self, per_key: dict[Any, tuple[type, bytes]], key: str, value: Any) -> tuple[type, bytes]:
        if type(value) not in _KV_CACHED_TYPES:  # a float where the first value was not one
            return (type(value), self._uncached(key, value))
        if len(per_key) >= _KV_PER_KEY_MAX:
            per_key.clear()
        entry = per_key[value] = (type(value), _field(self._tag, key_value(key, value)))
        return entry

    def _uncached(self, key: str, value: Any) -> bytes:
        prefix = self._keys.get(key)
        if prefix is None:
            if len(self._keys) >= _KV_PER_KEY_MAX:
                self._keys.clear()
            prefix = self._keys[key] = _field(b"\x0a", utf8(key))
        return _field(self._tag, prefix + _field(b"\x12", any_value(value)))


# One per field tag (Resource/InstrumentationScope 1, Span 9, NumberDataPoint 7, HistogramDataPoint 9);
# the span and metric threads may share one: each entry is written whole, and a lost race re-encodes.
_ATTRIBUTE_FIELDS: dict[bytes, _AttributeFields] = {}


def attributes(tag: bytes, attrs: Mapping[str, Any]) -> bytes:
    """Repeated `KeyValue` fields under `tag` (Resource/InstrumentationScope field 1, Span field 9)."""
    fields = _ATTRIBUTE_FIELDS.get(tag)
    if fields is None:
        fields = _ATTRIBUTE_FIELDS.setdefault(tag, _AttributeFields(tag))
    return fields.encode(attrs)


_FLAGS_TAG = b"\x85\x01"  # field 16, wire type 5 (fixed32)
_HAS_IS_REMOTE = struct.pack("<I", 0x100)
_HAS_IS_REMOTE_REMOTE = struct.pack("<I", 0x300)
# An unset status (the SDK always sends a Status, empty when unset), then the flags: most spans end so.
_UNSET_TAIL = (
    b"\x7a\x00" + _FLAGS_TAG + _HAS_IS_REMOTE,
    b"\x7a\x00" + _FLAGS_TAG + _HAS_IS_REMOTE_REMOTE,
)
_TIMES = struct.Struct("<BQBQ").pack  # start_time_unix_nano = 7, end_time_unix_nano = 8 (fixed64)
_SPAN_ATTRIBUTES = _AttributeFields(b"\x4a")
_ATTRIBUTE_FIELDS[b"\x4a"] = _SPAN_ATTRIBUTES
# name = 5 and kind = 6 of the span names seen (a few: method and tool), bounded as the attributes are.
_NAME_KIND: dict[tuple[str, int], bytes] = {}


def name_kind(name: str, kind: int) -> bytes:
    """A span's name (5) and kind (6) fields, cached per name and kind."""
    key = (name, kind)
    encoded = _NAME_KIND.get(key)
    if encoded is None:
        if len(_NAME_KIND) >= _KV_PER_KEY_MAX:
            _NAME_KIND.clear()
        encoded = _NAME_KIND[key] = (_field(b"\x2a", utf8(name)) if name else b"") + (
            b"\x30" + varint(kind) if kind else b""
        )
    return encoded


def span_attribute_fields(attrs: Mapping[str, Any]) -> bytes:
    """A span's attributes (field 9) as `span` writes them: fields of attribute sets can be joined."""
    return _SPAN_ATTRIBUTES.encode(attrs)


_REQUEST_ID_KEY = _field(b"\x0a", b"jsonrpc.request.id")


def request_id_field(request_id: str) -> bytes:
    """`span_attribute_fields({"jsonrpc.request.id": request_id})`, without the dict and the loop."""
    value = utf8(request_id)
    n = len(value)
    if n < 100:  # (every length inside is then one byte: written at once, no `_field` calls)
        # Span.attributes (9) { KeyValue.key, KeyValue.value (2) { AnyValue.string_value (1) } }
        return b"".join(
            (
                b"\x4a",
                _VARINT1[n + 24],
                _REQUEST_ID_KEY,
                b"\x12",
                _VARINT1[n + 2],
                b"\x0a",
                _VARINT1[n],
                value,
            )
        )
    return _field(b"\x4a", _REQUEST_ID_KEY + _field(b"\x12", _field(b"\x0a", value)))


def span(record: SpanRecord) -> bytes:
    """`Span` (trace.proto) for one record."""
    return span_of(
        record.trace_id,
        record.span_id,
        record.parent_span_id,
        record.trace_state,
        name_kind(record.name, record.kind),
        record.start_ns,
        record.end_ns,
        _SPAN_ATTRIBUTES.encode(record.attributes),
        record.status_code,
        record.status_message,
        record.remote_parent,
    )


def span_of(
    trace_id: int,
    span_id: int,
    parent_span_id: int,
    trace_state: str,
    name_kind: bytes,
    start_ns: int,
    end_ns: int,
    attribute_fields: bytes,
    status_code: int,
    status_message: str,
    remote_parent: bool,
) -> bytes:
    """`Span` from its fields, the attributes already written (`span` for a record)."""
    head = b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big")
    if trace_state:
        head += _field(b"\x1a", utf8(trace_state))
    if parent_span_id:
        head += b"\x22\x08" + parent_span_id.to_bytes(8, "big")
    if status_code or status_message:
        status = b""
        if status_message:
            status += _field(b"\x12", utf8(status_message))
        if status_code:
            status += b"\x18" + _VARINT1[status_code]
        tail = _field(b"\x7a", status) + _FLAGS_TAG
        tail += _HAS_IS_REMOTE_REMOTE if remote_parent else _HAS_IS_REMOTE
    else:
        tail = _UNSET_TAIL[remote_parent]
    if start_ns and end_ns:
        times = _TIMES(0x39, start_ns, 0x41, end_ns)
    else:  # a time of 0 is left out, as protobuf leaves out a default
        times = (b"\x39" + _FIXED64(start_ns) if start_ns else b"") + (
            b"\x41" + _FIXED64(end_ns) if end_ns else b""
        )
    return b"".join((head, name_kind, times, attribute_fields, tail))


# The token exchange's child span's attributes, written without an attribute dict: the fields around
# the duration (the one value unique to a span) once per distinct outcome, audience, IdP status and
# reason.
_EXCHANGE_DURATION_KEY = "outrider.token_exchange.duration_s"
_EXCHANGE_DURATION_KV = _field(b"\x0a", utf8(_EXCHANGE_DURATION_KEY))
# Span.attributes (9) { KeyValue.key, KeyValue.value (2) { AnyValue.double_value (4): fixed64 } }
_EXCHANGE_DURATION_HEAD = (
    b"\x4a" + _VARINT1[len(_EXCHANGE_DURATION_KV) + 11] + _EXCHANGE_DURATION_KV + b"\x12\x09\x21"
)
_EXCHANGE_FIELDS: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}


def exchange_attribute_fields(
    outcome: str,
    audience: str | None,
    idp_status: int | None,
    reason: str | None,
    error_type: str | None,
    duration_s: float,
) -> bytes:
    """The span attribute fields of `semconv.exchange_span_attributes` for a float `duration_s`.

    `reason` already scrubbed and `error_type` set for a failed exchange, as that function does.
    """
    key = (outcome, audience, idp_status, reason, error_type)
    fields = _EXCHANGE_FIELDS.get(key)
    if fields is None:
        after: dict[str, Any] = {}
        if audience:
            after["outrider.token_exchange.audience"] = audience
        if idp_status is not None:
            after["http.response.status_code"] = idp_status
        if reason:
            after["outrider.reason"] = reason
        if error_type:
            after["error.type"] = error_type
        before = {
            "outrider.token_exchange.outcome": outcome,
            "outrider.token_exchange.cache_hit": outcome == "cache_hit",
        }
        fields = (_SPAN_ATTRIBUTES.encode(before), _SPAN_ATTRIBUTES.encode(after))
        if len(_EXCHANGE_FIELDS) >= _KV_PER_KEY_MAX:
            _EXCHANGE_FIELDS.clear()
        _EXCHANGE_FIELDS[key] = fields
    return fields[0] + _EXCHANGE_DURATION_HEAD + _DOUBLE(duration_s) + fields[1]


def field_of(span_bytes: bytes) -> bytes:
    """A `Span` as a `ScopeSpans.spans` field (what `span_field` makes of a record)."""
    return _field(b"\x12", span_bytes)


def span_field(record: SpanRecord) -> bytes:
    """One record as a `ScopeSpans.spans` field (tag 2, length, `Span`): what `encode_fields` joins.

    Written when the span ends (on the telemetry thread), so the record dies then instead of waiting
    in the export queue, and the exporter thread only joins bytes and posts them.
    """
    return _field(b"\x12", span(record))


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
            return self.encode_fields([span_field(r) for r in records])
        fields: list[bytes] = []
        for start in range(0, len(records), every):
            if start:
                pause()
            fields.extend(span_field(r) for r in records[start : start + every])
        return self.encode_fields(fields)

    def encode_fields(self, fields: Sequence[bytes]) -> bytes:
        """The request for spans already written by `span_field`."""
        scope_spans = _field(b"\x12", self._scope + b"".join(fields))  # ScopeSpans {scope = 1, spans = 2}
        return _field(b"\x0a", self._resource + scope_spans)  # ResourceSpans {resource = 1, scope_spans = 2}


_PACKED_FIXED64: dict[int, struct.Struct] = {}
_PACKED_DOUBLE: dict[int, struct.Struct] = {}


def _packed(cache: dict[int, struct.Struct], code: str, values: Sequence[float]) -> bytes:
    packer = cache.get(len(values))
    if packer is None:
        packer = cache[len(values)] = struct.Struct(f"<{len(values)}{code}")
    return packer.pack(*values)


def number_point(point: NumberPoint) -> bytes:
    """`NumberDataPoint` (metrics.proto): start = 2, time = 3, as_double = 4, as_int = 6, attributes = 7
    (in field order, as protobuf writes them)."""
    out = b"\x11" + _FIXED64(point.start_ns) if point.start_ns else b""
    if point.time_ns:
        out += b"\x19" + _FIXED64(point.time_ns)
    value = point.value  # `oneof value`: written even when 0
    if isinstance(value, int) and not isinstance(value, bool):
        out += b"\x31" + _FIXED64(value & _MASK64)  # sfixed64
    else:
        out += b"\x21" + _DOUBLE(float(value))
    return out + attributes(b"\x3a", point.attributes)


def histogram_point(point: HistogramPoint) -> bytes:
    """`HistogramDataPoint`: start = 2, time = 3, count = 4, sum = 5, bucket_counts = 6,
    explicit_bounds = 7, attributes = 9, min = 11, max = 12, in field order. `sum`, `min` and `max`
    are `optional` (written, as the SDK sets them for a cumulative histogram); the times and the count
    are left out when 0."""
    return b"".join(
        (
            b"\x11" + _FIXED64(point.start_ns) if point.start_ns else b"",
            b"\x19" + _FIXED64(point.time_ns) if point.time_ns else b"",
            b"\x21" + _FIXED64(point.count) if point.count else b"",
            b"\x29" + _DOUBLE(float(point.sum)),
            _field(b"\x32", _packed(_PACKED_FIXED64, "Q", point.bucket_counts))
            if point.bucket_counts
            else b"",
            _field(b"\x3a", _packed(_PACKED_DOUBLE, "d", point.bounds)) if point.bounds else b"",
            attributes(b"\x4a", point.attributes),
            b"\x59" + _DOUBLE(float(point.min)),
            b"\x61" + _DOUBLE(float(point.max)),
        )
    )


_CUMULATIVE = b"\x10\x02"  # aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE


def metric(data: MetricData) -> bytes:
    """`Metric`: name = 1, description = 2, unit = 3, gauge = 5, sum = 7, histogram = 9."""
    out = _field(b"\x0a", utf8(data.name)) if data.name else b""
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
