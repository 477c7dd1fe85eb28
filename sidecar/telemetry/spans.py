"""Lean spans: one slotted record per span, W3C trace context in and out, and the standard samplers.

The OpenTelemetry SDK builds several objects per span (context, span, attributes with checks); the
sidecar's spans are few and fixed, so the hot path keeps a record and `otlp_wire` encodes it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry.trace.propagation import tracecontext
from opentelemetry.trace.span import TraceState

from outrider.sidecar.telemetry.semconv import AttributeValue

# OTLP SpanKind and StatusCode values (opentelemetry/proto/trace/v1/trace.proto).
KIND_INTERNAL = 1
KIND_SERVER = 2
KIND_CLIENT = 3
STATUS_UNSET = 0
STATUS_ERROR = 2

# The W3C traceparent and tracestate, read with the SDK propagator's own pattern and limits.
_PROPAGATOR = tracecontext.TraceContextTextMapPropagator
_TRACEPARENT = _PROPAGATOR._TRACEPARENT_HEADER_FORMAT_RE
_TRACEPARENT_MAX = _PROPAGATOR._TRACEPARENT_MAXIMUM_LENGTH
_TRACESTATE_MAX: int = getattr(tracecontext, "_TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH", 8192)
_ID64 = (1 << 64) - 1
_ID128 = (1 << 128) - 1


@dataclass(frozen=True, slots=True)
class ParentContext:
    """The caller's span, from `traceparent` (and `tracestate`, as its header text)."""

    trace_id: int
    span_id: int
    sampled: bool
    trace_state: str = ""
    random_trace_id: bool = False  # W3C Trace Context level 2 flag 0x02


class SpanRecord:
    """One span as the exporter encodes it; `sampled` False means it is never exported."""

    __slots__ = (
        "attributes",
        "end_ns",
        "kind",
        "name",
        "parent_span_id",
        "remote_parent",
        "sampled",
        "span_id",
        "start_ns",
        "status_code",
        "status_message",
        "trace_flags",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        name: str,
        kind: int,
        trace_id: int,
        span_id: int,
        parent_span_id: int,
        remote_parent: bool,
        trace_state: str,
        sampled: bool,
        start_ns: int,
        attributes: dict[str, AttributeValue],
        random_trace_id: bool = True,
    ) -> None:
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id  # 0: a root span
        self.remote_parent = remote_parent
        self.trace_state = trace_state
        self.sampled = sampled
        # As the SDK sets them: sampled (0x01), and random trace id (0x02) for the traces it starts or
        # continues from a parent that had it.
        self.trace_flags = (1 if sampled else 0) | (2 if random_trace_id else 0)
        self.start_ns = start_ns
        self.end_ns = start_ns
        self.attributes = attributes
        self.status_code = STATUS_UNSET
        self.status_message = ""

    def trace_headers(self) -> dict[str, str]:
        """W3C `traceparent` (and `tracestate`) naming this span as the parent."""
        # (The flags are 0-3: one hex digit after a 0. `%` writes an int in hex with ~1,000 fewer
        # instructions than a format spec on CPython 3.11: `_PyLong_FormatAdvancedWriter`.)
        traceparent = "00-%032x-%016x-0%d" % (self.trace_id, self.span_id, self.trace_flags)  # noqa: UP031
        carrier = {"traceparent": traceparent}
        if self.trace_state:
            carrier["tracestate"] = self.trace_state
        return carrier

    def ids(self) -> tuple[str, str]:
        return "%032x" % self.trace_id, "%016x" % self.span_id  # noqa: UP031 (see trace_headers)


def _header(carrier: Mapping[str, str], key: str) -> str | None:
    value = carrier.get(key)
    if value is None:
        for name, candidate in carrier.items():
            if name.lower() == key:
                return candidate
    return value


def extract_parent(carrier: Mapping[str, str]) -> ParentContext | None:
    """The remote parent in a W3C carrier, or None when absent or invalid (as the SDK propagator decides)."""
    header = _header(carrier, "traceparent")
    if not header or len(header) > _TRACEPARENT_MAX:
        return None
    match = _TRACEPARENT.search(header)
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    state = _header(carrier, "tracestate")
    # Parsed and re-written by the API's TraceState, as the SDK does (an invalid list becomes empty).
    trace_state = ""
    if state and len(state) <= _TRACESTATE_MAX:
        trace_state = TraceState.from_header([state]).to_header()
    flags = int(flags_hex, 16)
    return ParentContext(trace_id, span_id, bool(flags & 1), trace_state, bool(flags & 2))


def new_trace_id() -> int:
    trace_id = random.getrandbits(128)
    while not trace_id:
        trace_id = random.getrandbits(128)
    return trace_id


def new_span_id() -> int:
    span_id = random.getrandbits(64)
    while not span_id:
        span_id = random.getrandbits(64)
    return span_id


def new_ids() -> tuple[int, int]:
    """A new trace id and span id, as `new_trace_id()` then `new_span_id()` draw them, in one call.

    `getrandbits` fills its result from the generator's 32-bit words lowest first, so the low 128
    bits of one 192-bit draw are the 128-bit draw and the high 64 the 64-bit draw that follows it.
    """
    bits = random.getrandbits(192)
    trace_id, span_id = bits & _ID128, bits >> 128
    if not trace_id:  # (one draw in 2**128: drawn again, as `new_trace_id` would)
        trace_id = new_trace_id()
    return trace_id, span_id or new_span_id()


@dataclass(frozen=True, slots=True)
class SamplerPlan:
    """The SDK's standard samplers as data: parent-based or not, and the trace-id ratio bound.

    `bound` follows `TraceIdRatioBased`: sampled when the trace id's low 64 bits are below it
    (2**64 for always-on, 0 for always-off).
    """

    parent_based: bool
    bound: int

    def sampled(self, trace_id: int, parent: ParentContext | None) -> bool:
        if parent is not None and self.parent_based:
            return parent.sampled
        return (trace_id & _ID64) < self.bound


ALWAYS_ON = SamplerPlan(parent_based=True, bound=1 << 64)


def sampler_plan(sampler: object) -> SamplerPlan | None:
    """The plan for an SDK sampler object, or None for a sampler the lean path cannot reproduce."""
    from opentelemetry.sdk.trace import sampling

    def root_bound(root: object) -> int | None:
        if root is sampling.ALWAYS_ON:
            return 1 << 64
        if root is sampling.ALWAYS_OFF:
            return 0
        if type(root) is sampling.TraceIdRatioBased:
            return int(root.bound)
        return None

    if isinstance(sampler, sampling.ParentBased):
        standard = (
            sampler._remote_parent_sampled is sampling.ALWAYS_ON
            and sampler._remote_parent_not_sampled is sampling.ALWAYS_OFF
            and sampler._local_parent_sampled is sampling.ALWAYS_ON
            and sampler._local_parent_not_sampled is sampling.ALWAYS_OFF
        )
        bound = root_bound(sampler._root)
        return SamplerPlan(True, bound) if standard and bound is not None else None
    bound = root_bound(sampler)
    return None if bound is None else SamplerPlan(False, bound)


class LeanTracer:
    """Starts and ends span records; ended sampled records go to `sink` (the exporter), if any."""

    def __init__(
        self,
        sampler: SamplerPlan,
        sink: Callable[[SpanRecord], None] | None,
        emit: Callable[[bytes], None] | None = None,
    ) -> None:
        self.sampler = sampler
        self.sink = sink
        # Where a span written without a record goes (`otlp_wire.field_of` bytes): the exporter's
        # queue, when `sink` is `otlp_wire.span_field` into it. None: spans end as records only.
        self.emit = emit

    def child_sampled(self, parent: SpanRecord) -> bool:
        """Whether a child of `parent` is sampled (as `child` decides)."""
        return parent.sampled if self.sampler.parent_based else self.sampler.sampled(parent.trace_id, None)

    def start(
        self,
        name: str,
        kind: int,
        attributes: dict[str, AttributeValue],
        *,
        parent: ParentContext | None = None,
        start_ns: int | None = None,
    ) -> SpanRecord:
        sampler = self.sampler
        if parent is None:
            trace_id, span_id = new_ids()
            parent_id, trace_state, random_id = 0, "", True
            sampled = (trace_id & _ID64) < sampler.bound  # `sampler.sampled(trace_id, None)`, inlined
        else:
            trace_id, parent_id, trace_state = parent.trace_id, parent.span_id, parent.trace_state
            span_id, random_id = new_span_id(), parent.random_trace_id
            sampled = sampler.sampled(trace_id, parent)
        return SpanRecord(
            name,
            kind,
            trace_id,
            span_id,
            parent_id,
            parent is not None,
            trace_state,
            sampled,
            time.time_ns() if start_ns is None else start_ns,
            attributes,
            random_id,
        )

    def child(
        self, parent: SpanRecord, name: str, kind: int, attributes: dict[str, AttributeValue], start_ns: int
    ) -> SpanRecord:
        """A span under a local parent: same trace and trace state, sampled as the parent is."""
        sampled = self.child_sampled(parent)
        return SpanRecord(
            name,
            kind,
            parent.trace_id,
            new_span_id(),
            parent.span_id,
            False,
            parent.trace_state,
            sampled,
            start_ns,
            attributes,
            bool(parent.trace_flags & 2),
        )

    def end(self, record: SpanRecord, end_ns: int) -> None:
        record.end_ns = end_ns
        if record.sampled and self.sink is not None:
            self.sink(record)
