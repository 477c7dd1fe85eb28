"""The `Observer` on lean span records: the same spans, metrics and audit lines, fewer objects per call.

Spans are `spans.SpanRecord`s exported by `span_export` as hand-written OTLP; metrics and the audit
log are those of `observer_otel.OtelObserver`, whose call bookkeeping this class shares.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

from opentelemetry import metrics, trace

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry import otlp_wire, semconv
from outrider.sidecar.telemetry.audit import AuditLog, LineBlocks, Workload
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.metric_points import LeanMeter
from outrider.sidecar.telemetry.observer import (
    CallScope,
    EgressDecision,
    ExchangeOutcome,
    PolicyOutcome,
    Principal,
    RequestInfo,
)
from outrider.sidecar.telemetry.observer_otel import FinalFacts, OtelObserver, _CallMetricKeys, _ScopeBase
from outrider.sidecar.telemetry.spans import (
    KIND_CLIENT,
    KIND_INTERNAL,
    KIND_SERVER,
    STATUS_ERROR,
    STATUS_UNSET,
    LeanTracer,
    SpanRecord,
    extract_parent,
    new_span_id,
)
from outrider.sidecar.telemetry.worker import Worker

EXCHANGE_SPAN_NAME = "outrider.token_exchange"
_EXCHANGE_NAME_KIND = otlp_wire.name_kind(EXCHANGE_SPAN_NAME, KIND_CLIENT)


class LeanObserver(OtelObserver):
    """Satisfies `outrider.sidecar.telemetry.observer.Observer`; spans go through a `LeanTracer`."""

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        tracer: LeanTracer,
        meter_provider: metrics.MeterProvider | LeanMeter,
        audit: AuditLog,
        workload: Callable[[], Workload] = Workload,
        flush: Callable[[], object] | None = None,
        worker: Worker | None = None,
    ) -> None:
        super().__init__(
            config,
            tracer_provider=trace.NoOpTracerProvider(),
            meter_provider=meter_provider,
            audit=audit,
            workload=workload,
            flush=flush,
            worker=worker,
        )
        self.lean = tracer
        # Per distinct request facts: the server span's request attributes but the JSON-RPC id,
        # encoded (the method's field, then the rest), and as the dict the metric points read.
        self.request_blocks: dict[tuple[object, ...], _RequestBlocks] = {}
        # Per distinct answer (status, outcome, error, principal, cached exchange): the final attributes,
        # their encoded fields and, per request blocks, the call's metric keys (`_FinalEntry`).
        self.final_entries: dict[tuple[object, ...], _FinalEntry] = {}
        # The server span's name per distinct method and target (bounded: tool names come from callers).
        self.span_names: dict[tuple[str | None, ...], str] = {}

    def mcp_call(self, message: McpMessage, request: RequestInfo) -> AbstractContextManager[CallScope]:
        # MCP conventions: the context in params._meta is the caller's MCP span and wins over the
        # HTTP headers.
        carrier = message.trace_context or request.headers
        parent = extract_parent(carrier) if carrier else None
        workload = self.workload()
        # The span's attributes are made on the telemetry thread when the call is recorded (nothing
        # reads them before: the lean tracer's sampler does not): the request path only starts it.
        names = self.span_names
        name_key = (
            message.method,
            message.kind,
            message.tool_name,
            message.prompt_name,
            message.resource_uri,
        )
        name = names.get(name_key)
        if name is None:
            name = semconv.mcp_span_name(message, self.config)
            if len(names) >= _SPAN_NAMES_MAX:
                names.clear()
            names[name_key] = name
        record = self.lean.start(name, KIND_SERVER, {}, parent=parent)
        # The scope is its own context manager: no generator-based wrapper per call.
        return _LeanScope(self, message, request, record, workload)

    def _egress_span(self, decision: EgressDecision, end_ns: int) -> tuple[str | None, str | None]:
        record = self.lean.start(
            semconv.egress_span_name(decision),
            KIND_INTERNAL,
            semconv.egress_attributes(decision),
            start_ns=end_ns,
        )
        if not decision.allowed:
            record.status_code, record.status_message = STATUS_ERROR, "egress denied"
        self.lean.end(record, end_ns)
        return record.ids()


_REQUEST_BLOCKS_MAX = 1024
_SPAN_NAMES_MAX = 1024
_REQUEST_ID = "jsonrpc.request.id"


class _RequestBlocks(NamedTuple):
    method_field: bytes  # `mcp.method.name`, the first attribute
    rest_fields: bytes  # the attributes after `jsonrpc.request.id`
    attributes: dict[str, semconv.AttributeValue]  # all but `jsonrpc.request.id` (never mutated)
    name_kind: bytes  # the server span's name and kind fields (its name follows from the same facts)


_FINAL_ENTRIES_MAX = 1024
_ANSWERED_PER_ENTRY_MAX = 64


class _Answered:
    """What a call with these request blocks and this answer records the same as the last one did:
    its metric keys and, once made, its audit line's blocks (for this workload object and transport)."""

    __slots__ = ("blocks", "line", "metric_keys")

    def __init__(self, blocks: _RequestBlocks, metric_keys: _CallMetricKeys) -> None:
        self.blocks = blocks  # kept: the table holds its id
        self.metric_keys = metric_keys
        # (workload object, transport, the line's blocks): replaced whole, so a job run on the
        # caller's thread (a full backlog) never reads one call's blocks with another's facts.
        self.line: tuple[Workload, str, LineBlocks | None] | None = None


class _FinalEntry(NamedTuple):
    principal: Principal | None  # the key holds its id: kept so the id stays its own
    facts: FinalFacts  # (its attributes never mutated)
    fields: bytes  # the attributes as span attribute fields
    answered: dict[int, _Answered]  # by id of the request blocks


class _LeanScope(_ScopeBase):
    """One MCP message as a span record."""

    __slots__ = ("_answered", "_blocks", "_final", "_lean", "_span")

    def __init__(
        self,
        observer: LeanObserver,
        message: McpMessage,
        request: RequestInfo,
        record: SpanRecord,
        workload: Workload,
    ) -> None:
        super().__init__(observer, message, request, None, workload)
        self._lean = observer.lean
        self._span = record
        self._blocks: _RequestBlocks | None = None
        self._final: _FinalEntry | None = None
        self._answered: _Answered | None = None  # set with the metric points when `_final` is

    def _request_blocks(self) -> _RequestBlocks:
        """The request attributes that repeat across calls, made and encoded once per distinct facts."""
        blocks = self._blocks
        if blocks is not None:
            return blocks
        message, request = self._message, self._request
        key = (
            message.method,
            message.kind,
            message.id is None,
            message.tool_name,
            message.prompt_name,
            message.resource_uri,
            request.protocol_version,
            request.session_id,
            request.client_address,
            self._workload.spiffe_id,
        )
        observer = self._observer
        assert isinstance(observer, LeanObserver)
        table = observer.request_blocks
        blocks = table.get(key)
        if blocks is None:
            attributes = dict(self._request_attributes())
            method = {"mcp.method.name": attributes.pop("mcp.method.name")}
            attributes.pop(_REQUEST_ID, None)
            blocks = _RequestBlocks(
                otlp_wire.span_attribute_fields(method),
                otlp_wire.span_attribute_fields(attributes),
                {**method, **attributes},
                otlp_wire.name_kind(self._span.name, self._span.kind),
            )
            if len(table) >= _REQUEST_BLOCKS_MAX:
                table.clear()
            table[key] = blocks
        self._blocks = blocks
        return blocks

    def _final_facts(
        self,
        http_status: int,
        outcome: str,
        error_type: str | None,
        reason: str | None,
        response: McpMessage | None,
        principal: Principal | None,
        exchange: str | None,
        policy: PolicyOutcome | None,
    ) -> FinalFacts:
        """The answer's facts, made and encoded once per distinct answer when spans are written from
        fields. Not kept: answers with a reason (free text from other components) or a policy verdict."""
        args = (http_status, outcome, error_type, reason, response, principal, exchange, policy)
        if self._lean.emit is None or reason is not None or policy is not None:
            return super()._final_facts(*args)
        key = (
            http_status,
            outcome,
            error_type,
            None if response is None else response.error_code,
            id(principal),
            exchange,
        )
        observer = self._observer
        assert isinstance(observer, LeanObserver)
        table = observer.final_entries
        entry = table.get(key)
        if entry is None or entry.principal is not principal:
            facts = super()._final_facts(*args)
            entry = _FinalEntry(principal, facts, otlp_wire.span_attribute_fields(facts.attributes), {})
            if len(table) >= _FINAL_ENTRIES_MAX:
                table.clear()
            table[key] = entry
        self._final = entry
        return entry.facts

    def _record_metrics(self, duration: float, facts: FinalFacts, outcome: str) -> None:
        entry = self._final
        if entry is None or entry.facts is not facts:
            super()._record_metrics(duration, facts, outcome)
            return
        blocks = self._request_blocks()
        answered = entry.answered.get(id(blocks))
        observer = self._observer
        if answered is None or answered.blocks is not blocks:
            keys = observer.call_metric_keys(blocks.attributes, facts.attributes, outcome)
            answered = _Answered(blocks, keys)
            if len(entry.answered) >= _ANSWERED_PER_ENTRY_MAX:
                entry.answered.clear()
            entry.answered[id(blocks)] = answered
        self._answered = answered
        observer.record_metric_keys(duration, answered.metric_keys)

    def _line_blocks(
        self,
        principal: Principal | None,
        outcome: str,
        reason: str | None,
        http_status: int,
        error_type: str | None,
        exchange: str | None,
    ) -> LineBlocks | None:
        """The line's blocks kept with the answer and request blocks (`_Answered`): every fact they
        hold is in those keys but the workload object and the transport, checked here."""
        answered = self._answered
        args = (principal, outcome, reason, http_status, error_type, exchange)
        if answered is None:
            return super()._line_blocks(*args)
        kept, workload, transport = answered.line, self._workload, self._request.transport
        if kept is None or kept[0] is not workload or kept[1] != transport or kept[2] is None:
            line = super()._line_blocks(*args)
            answered.line = (workload, transport, line)
            return line
        return kept[2]

    def _metric_attributes(self) -> dict[str, semconv.AttributeValue]:
        return (
            self._request_blocks().attributes if self._lean.emit is not None else self._request_attributes()
        )

    def _trace_headers(self) -> dict[str, str]:
        return self._span.trace_headers()

    def _exchange_span(
        self, outcome: ExchangeOutcome, start: int, end: int, ids: bool = True
    ) -> tuple[str | None, str | None]:
        lean = self._lean
        parent = self._span
        failed = outcome.outcome not in semconv.EXCHANGE_OK
        if lean.emit is not None and type(outcome.duration_s) is float:
            # Written from its fields: no record, no attribute dict (the same bytes, a test).
            span_id = new_span_id()
            if lean.child_sampled(parent):
                attributes = otlp_wire.exchange_attribute_fields(
                    outcome.outcome,
                    outcome.audience,
                    outcome.idp_status,
                    semconv.scrub(outcome.reason),
                    outcome.outcome if failed else None,
                    outcome.duration_s,
                )
                span = otlp_wire.span_of(
                    parent.trace_id,
                    span_id,
                    parent.span_id,
                    parent.trace_state,
                    _EXCHANGE_NAME_KIND,
                    start,
                    end,
                    attributes,
                    STATUS_ERROR if failed else STATUS_UNSET,
                    outcome.outcome if failed else "",
                    False,
                )
                lean.emit(otlp_wire.field_of(span))
            # (`%`, not a format spec: see `SpanRecord.trace_headers`.)
            return ("%032x" % parent.trace_id, "%016x" % span_id) if ids else (None, None)  # noqa: UP031
        record = lean.child(
            parent,
            EXCHANGE_SPAN_NAME,
            KIND_CLIENT,
            semconv.exchange_span_attributes(outcome),
            start,
        )
        if failed:
            record.status_code, record.status_message = STATUS_ERROR, outcome.outcome
        lean.end(record, end)
        return record.ids() if ids else (None, None)

    def _end_span(
        self, final: dict[str, semconv.AttributeValue], error: str | None, end: int
    ) -> tuple[str | None, str | None]:
        record = self._span
        lean = self._lean
        if lean.emit is not None:
            # Written from the request's cached blocks, the JSON-RPC id and the final attributes: no
            # attribute dict for the span (the same bytes, a test).
            if error is not None:
                record.status_code, record.status_message = STATUS_ERROR, error
            record.end_ns = end
            if record.sampled:
                blocks = self._request_blocks()
                request_id = self._message.id
                entry = self._final
                fields = b"".join(
                    (
                        blocks.method_field,
                        b"" if request_id is None else otlp_wire.request_id_field(str(request_id)),
                        blocks.rest_fields,
                        entry.fields
                        if entry is not None and entry.facts.attributes is final
                        else otlp_wire.span_attribute_fields(final),
                    )
                )
                span = otlp_wire.span_of(
                    record.trace_id,
                    record.span_id,
                    record.parent_span_id,
                    record.trace_state,
                    blocks.name_kind,
                    record.start_ns,
                    end,
                    fields,
                    record.status_code,
                    record.status_message,
                    record.remote_parent,
                )
                lean.emit(otlp_wire.field_of(span))
            return record.ids()
        # The scope's request attributes, made and read for the metrics before this: extended in place
        # (the same keys, in the same order, as a merged copy).
        attributes = self._request_attributes()
        attributes.update(final)
        record.attributes = attributes
        if error is not None:
            record.status_code, record.status_message = STATUS_ERROR, error
        self._lean.end(record, end)
        return record.ids()
