"""The real `Observer`: OpenTelemetry spans and metrics plus the JSON audit log for every MCP call.

Uses `opentelemetry-api` only; the process hands in the providers (see `outrider.sidecar.telemetry.setup`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from contextlib import AbstractContextManager
from functools import partial
from typing import Any, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry import semconv
from outrider.sidecar.telemetry.audit import (
    AuditLog,
    CallLines,
    EventStamp,
    LineBlocks,
    Workload,
    assemble_line,
    egress_event,
    exchange_event,
    mcp_call_event,
    random_uuid4,
    time_text_ns,
)
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
from outrider.sidecar.telemetry.worker import Worker

log = logging.getLogger("outrider.telemetry")

INSTRUMENTATION = "outrider.sidecar"
_PROPAGATOR = TraceContextTextMapPropagator()
_OK_OUTCOMES = frozenset({"ok"})


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Reads trace headers case-insensitively from any mapping (plain dicts keep the wire's case)."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            for name, candidate in carrier.items():
                if name.lower() == key:
                    value = candidate
                    break
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()


def trace_headers(span: Span) -> dict[str, str]:
    """W3C `traceparent` (and `tracestate`) for a span; formatted directly, the propagator is slower."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return {}
    carrier = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
    if ctx.trace_state:
        carrier["tracestate"] = ctx.trace_state.to_header()
    return carrier


def _ids(span: Span) -> tuple[str | None, str | None]:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


TallyKey = tuple[tuple[str, semconv.AttributeValue], ...]


def tally_key(attributes: Mapping[str, semconv.AttributeValue]) -> TallyKey:
    return tuple(sorted(attributes.items()))


class Tally:
    """A monotonic counter kept as a dict of attribute sets, reported through an ObservableCounter.

    Attribute values can come from callers (tool names): past `limit` series, new ones are counted
    under `otel.metric.overflow=true`, as the SDK does for its own instruments.
    """

    def __init__(
        self,
        meter: metrics.Meter | LeanMeter,
        name: str,
        *,
        unit: str,
        description: str,
        limit: int = 2000,
    ) -> None:
        self._counts: dict[TallyKey, int] = {}
        self._lock = threading.Lock()
        self._limit = limit
        meter.create_observable_counter(name, callbacks=[self._observe], unit=unit, description=description)

    def add(self, attributes: Mapping[str, semconv.AttributeValue]) -> None:
        self.add_key(tally_key(attributes))

    def add_key(self, key: TallyKey) -> None:
        """`add` for a key `tally_key` made (callers that see the same attribute sets keep theirs)."""
        with self._lock:
            count = self._counts.get(key)
            if count is None and len(self._counts) >= self._limit:
                key = (("otel.metric.overflow", True),)
                count = self._counts.get(key)
            self._counts[key] = (count or 0) + 1

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._counts.items())
        return [Observation(count, dict(key)) for key, count in items]


_CALL_METRIC_KEYS_MAX = 1024


class _CallMetricKeys(NamedTuple):
    duration_attributes: dict[str, semconv.AttributeValue]
    duration_series: frozenset[tuple[str, semconv.AttributeValue]]
    requests: TallyKey


# The exchange counter's keys by outcome (a handful of fixed values).
_EXCHANGE_KEYS: dict[str, TallyKey] = {}


def _exchange_key(outcome: str) -> TallyKey:
    key = _EXCHANGE_KEYS.get(outcome)
    if key is None:
        key = tally_key({"outcome": outcome, "cache_hit": outcome == "cache_hit"})
        if len(_EXCHANGE_KEYS) < 64:
            _EXCHANGE_KEYS[outcome] = key
    return key


class OtelObserver:
    """Spans, metrics and audit events for the data paths.

    Satisfies `outrider.sidecar.telemetry.observer.Observer`.
    """

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        tracer_provider: trace.TracerProvider,
        meter_provider: metrics.MeterProvider | LeanMeter,
        audit: AuditLog,
        workload: Callable[[], Workload] = Workload,
        flush: Callable[[], object] | None = None,
        worker: Worker | None = None,
    ) -> None:
        self.config = config
        self._flush = flush
        # Span end, metric points and audit lines run here; disabled: on the caller's thread.
        self.worker = worker or Worker(enabled=False)
        self.audit = audit
        self.call_lines = CallLines()  # `mcp.call` lines from cached blocks (the telemetry thread's)
        # On the worker, a batch of calls' audit lines is written at the batch's end, in one write.
        self.hold_audit = self.worker.enabled
        if self.hold_audit:
            self.worker.after_batch(audit.flush_held)
        self._workload = workload
        self.tracer = tracer_provider.get_tracer(INSTRUMENTATION)
        meter = meter_provider.get_meter(INSTRUMENTATION)
        self.operation_duration = meter.create_histogram(
            "mcp.server.operation.duration",
            unit="s",
            description="MCP request or notification duration as observed by the sidecar, "
            "from receipt until the result or ack is sent.",
            explicit_bucket_boundaries_advisory=list(semconv.MCP_DURATION_BUCKETS),
        )
        # Counters are tallied in plain dicts and read by the SDK at collection time: a synchronous
        # counter costs tens of microseconds per add (per reader), a tally well under one.
        self.requests = Tally(
            meter,
            "outrider.mcp.requests",
            unit="{request}",
            description="MCP messages by method, tool and outcome.",
        )
        self.exchanges = Tally(
            meter,
            "outrider.token_exchanges",
            unit="{exchange}",
            description="Token exchanges by outcome (cache_hit counts cache hits).",
        )
        self.exchange_duration = meter.create_histogram(
            "outrider.token_exchange.duration",
            unit="s",
            description="Token exchange latency including the IdP round trip (cache misses).",
            explicit_bucket_boundaries_advisory=list(semconv.MCP_DURATION_BUCKETS),
        )
        self.egress_decisions = Tally(
            meter,
            "outrider.egress.decisions",
            unit="{decision}",
            description="Egress allowlist decisions by outcome, mode and protocol.",
        )
        self.identity_events = Tally(
            meter,
            "outrider.identity.events",
            unit="{event}",
            description="Workload identity events: SVID rotations and health changes.",
        )
        # Per distinct (method, tool, ..., outcome): the duration histogram's attributes and series key
        # and the request counter's key, made once instead of per call (bounded: tool names come
        # from callers).
        self._call_metric_keys: dict[tuple[object, ...], _CallMetricKeys] = {}
        self._record_series = getattr(self.operation_duration, "record_series", None)
        self._identity_lock = threading.Lock()
        self._identity_healthy: int | None = None
        meter.create_observable_gauge(
            "outrider.identity.healthy",
            callbacks=[self._observe_identity],
            unit="1",
            description="1 while the sidecar holds a valid SVID and the Workload API stream is healthy.",
        )

    def record_call_metrics(
        self,
        duration: float,
        attributes: Mapping[str, semconv.AttributeValue],
        final: Mapping[str, semconv.AttributeValue],
        outcome: str,
    ) -> None:
        """The duration histogram and request counter points of one call (`attributes` + `final`)."""
        self.record_metric_keys(duration, self.call_metric_keys(attributes, final, outcome))

    def call_metric_keys(
        self,
        attributes: Mapping[str, semconv.AttributeValue],
        final: Mapping[str, semconv.AttributeValue],
        outcome: str,
    ) -> _CallMetricKeys:
        """The call's metric attributes and series (`attributes` + `final`), made once per distinct set."""
        key = (
            attributes.get("mcp.method.name"),
            attributes.get("gen_ai.tool.name"),
            attributes.get("gen_ai.prompt.name"),
            attributes.get("gen_ai.operation.name"),
            attributes.get("network.transport"),
            attributes.get("mcp.protocol.version"),
            final.get("error.type"),
            final.get("rpc.response.status_code"),
            outcome,
        )
        keys = self._call_metric_keys.get(key)
        if keys is None:
            all_attrs = {**attributes, **final}
            duration_attrs = semconv.duration_metric_attributes(all_attrs)
            keys = _CallMetricKeys(
                duration_attrs,
                frozenset(duration_attrs.items()),
                tally_key(semconv.request_counter_attributes(all_attrs, outcome)),
            )
            if len(self._call_metric_keys) >= _CALL_METRIC_KEYS_MAX:
                self._call_metric_keys.clear()
            self._call_metric_keys[key] = keys
        return keys

    def record_metric_keys(self, duration: float, keys: _CallMetricKeys) -> None:
        """The duration histogram and request counter points of one call."""
        if self._record_series is not None:
            self._record_series(duration, keys.duration_series, keys.duration_attributes)
        else:
            self.operation_duration.record(duration, keys.duration_attributes)
        self.requests.add_key(keys.requests)

    def force_flush(self) -> None:
        """Record what is queued, then export pending spans and metrics (blocking: use a thread)."""
        self.worker.drain()
        if self._flush is not None:
            self._flush()

    def workload(self) -> Workload:
        try:
            return self._workload()
        except Exception:  # the identity component may not be up yet; never fail a call over telemetry
            return Workload()

    def mcp_call(self, message: McpMessage, request: RequestInfo) -> AbstractContextManager[CallScope]:
        # MCP conventions: the context in params._meta is the caller's MCP span and wins over the
        # HTTP headers. Most callers send neither: skip the propagator's parsing then (hot path).
        carrier = message.trace_context or request.headers
        parent = _PROPAGATOR.extract(carrier, getter=_GETTER) if carrier else None
        workload = self.workload()
        attributes = semconv.mcp_request_attributes(
            message, request, self.config, workload_id=workload.spiffe_id
        )
        span = self.tracer.start_span(
            semconv.mcp_span_name(message, self.config),
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        # The scope is its own context manager: it records a call left unanswered or failed.
        return _OtelScope(self, message, request, span, attributes, workload)

    def egress(self, decision: EgressDecision) -> None:
        end_ns = time.time_ns()
        self.worker.submit(partial(self._record_egress, decision, end_ns))

    def _record_egress(self, decision: EgressDecision, end_ns: int) -> None:
        trace_id, span_id = self._egress_span(decision, end_ns)
        self.egress_decisions.add(
            {
                "outcome": "allowed" if decision.allowed else "denied",
                "mode": decision.mode,
                "protocol": decision.protocol,
            },
        )
        self.audit.write(
            egress_event(
                EventStamp.at_ns(end_ns, trace_id, span_id), decision=decision, workload=self.workload()
            ),
            hold=self.hold_audit,
        )

    def _egress_span(self, decision: EgressDecision, end_ns: int) -> tuple[str | None, str | None]:
        span = self.tracer.start_span(
            semconv.egress_span_name(decision),
            kind=SpanKind.INTERNAL,
            attributes=semconv.egress_attributes(decision),
            start_time=end_ns,
        )
        if not decision.allowed:
            span.set_status(Status(StatusCode.ERROR, "egress denied"))
        span.end(end_time=end_ns)
        return _ids(span)

    def identity_event(self, event: str, spiffe_id: str | None, detail: str) -> None:
        self.identity_events.add({"event": event})
        with self._identity_lock:
            if event in ("healthy", "rotated"):
                self._identity_healthy = 1
            elif event == "unhealthy":
                self._identity_healthy = 0
        log.info("identity %s: %s (%s)", event, spiffe_id or "no SPIFFE ID yet", semconv.scrub(detail))

    def _observe_identity(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._identity_lock:
            value = self._identity_healthy
        return [] if value is None else [Observation(value)]


class FinalFacts(NamedTuple):
    """The attributes a call's answer adds to its span, its `error.type` and its span's ERROR status."""

    attributes: dict[str, semconv.AttributeValue]  # read only: the lean path shares one per distinct answer
    error_type: str | None
    status_error: str | None  # the span's ERROR status message; None: the status stays unset


def final_facts(
    config: TelemetryConfig,
    http_status: int,
    outcome: str,
    error_type: str | None,
    reason: str | None,
    response: McpMessage | None,
    principal: Principal | None,
    exchange: str | None,
    policy: PolicyOutcome | None,
) -> FinalFacts:
    """Pure: the final attributes, `error.type` and ERROR status of a call that ended so."""
    error = semconv.error_type(outcome, error_type, response, http_status)
    final = semconv.mcp_response_attributes(
        http_status=http_status, outcome=outcome, error_type_value=error, response=response
    )
    if principal is not None:
        final.update(semconv.principal_attributes(principal, config))
    if exchange == "cache_hit":
        final["outrider.token_exchange.outcome"] = "cache_hit"
    if policy is not None:
        final.update(semconv.policy_attributes(policy))
    safe_reason = semconv.scrub(reason)
    if safe_reason:
        final["outrider.reason"] = safe_reason
    return FinalFacts(final, error, None if outcome in _OK_OUTCOMES else (error or outcome))


class _ScopeBase:
    """One MCP message: facts gathered on the request path, recorded on the worker when finished.

    Subclasses own the span: its trace headers, the exchange child span and the span's end.
    """

    # One scope per message on the request path: slots make creating it cheaper.
    __slots__ = (
        "_attributes",
        "_hit",
        "_message",
        "_observer",
        "_request",
        "_started",
        "_workload",
        "exchange_outcome",
        "finished",
        "policy_outcome",
        "principal",
    )

    def __init__(
        self,
        observer: OtelObserver,
        message: McpMessage,
        request: RequestInfo,
        attributes: dict[str, semconv.AttributeValue] | None,
        workload: Workload,
    ) -> None:
        self._observer = observer
        self._message = message
        self._request = request
        self._attributes = attributes
        self._workload = workload
        self._started = time.perf_counter()
        self.principal: Principal | None = None
        self.exchange_outcome: str | None = None
        self.policy_outcome: PolicyOutcome | None = None
        self.finished = False
        # A cache-hit exchange waiting to be recorded in the call's own job (see `token_exchange`).
        self._hit: tuple[ExchangeOutcome, int, Principal | None] | None = None

    def __enter__(self) -> _ScopeBase:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Records a call the data path left unanswered: an exception, a cancellation, or no `finish`."""
        if self.finished:
            return
        if exc is not None:
            cancelled = not isinstance(exc, Exception)
            self.finish(
                http_status=499 if cancelled else 500,
                outcome="error",
                error_type="cancelled" if cancelled else type(exc).__qualname__,
                reason="the caller went away" if cancelled else "internal error in the sidecar",
            )
        else:
            self.finish(http_status=0, outcome="error", error_type="unfinished", reason="no answer recorded")

    def _request_attributes(self) -> dict[str, semconv.AttributeValue]:
        """The span attributes known when the message arrived; made on first use (None at start)."""
        attributes = self._attributes
        if attributes is None:
            attributes = self._attributes = semconv.mcp_request_attributes(
                self._message,
                self._request,
                self._observer.config,
                workload_id=self._workload.spiffe_id,
            )
        return attributes

    def _metric_attributes(self) -> Mapping[str, semconv.AttributeValue]:
        """The request attributes the call's metric points read (all but `jsonrpc.request.id` needed)."""
        return self._request_attributes()

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
        """What the call's answer adds to its span (and metric points)."""
        return final_facts(
            self._observer.config,
            http_status,
            outcome,
            error_type,
            reason,
            response,
            principal,
            exchange,
            policy,
        )

    def _record_metrics(self, duration: float, facts: FinalFacts, outcome: str) -> None:
        self._observer.record_call_metrics(duration, self._metric_attributes(), facts.attributes, outcome)

    def _line_blocks(
        self,
        principal: Principal | None,
        outcome: str,
        reason: str | None,
        http_status: int,
        error_type: str | None,
        exchange: str | None,
    ) -> LineBlocks | None:
        """The blocks of the call's `mcp.call` line that repeat across calls (`CallLines.blocks`)."""
        return self._observer.call_lines.blocks(
            self._message,
            self._request,
            principal,
            self._workload,
            outcome,
            reason,
            http_status,
            error_type,
            exchange,
        )

    def _trace_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _exchange_span(
        self, outcome: ExchangeOutcome, start: int, end: int, ids: bool = True
    ) -> tuple[str | None, str | None]:
        """Record the exchange's child span; returns its trace and span id for the audit line (with
        `ids`; else None, None)."""
        raise NotImplementedError

    def _end_span(
        self, final: dict[str, semconv.AttributeValue], error: str | None, end: int
    ) -> tuple[str | None, str | None]:
        """Add the final attributes, set the ERROR status (`error` set) and end the call span."""
        raise NotImplementedError

    def set_principal(self, principal: Principal) -> None:
        # Only remembered here: the span attributes are set when the call is recorded.
        self.principal = principal

    def inject_context(self, headers: MutableMapping[str, str], message: dict[str, Any] | None) -> bool:
        carrier = self._trace_headers()
        headers.update(carrier)
        # MCP conventions: requests and notifications also carry the context in params._meta.
        if message is None or not carrier or not isinstance(message.get("method"), str):
            return False
        params = message.get("params")
        if params is None:
            params = message["params"] = {}
        elif not isinstance(params, dict):
            return False
        meta = params.get("_meta")
        if meta is None:
            params["_meta"] = carrier
            return True
        if not isinstance(meta, dict):
            return False
        # Said here instead of by the caller copying and comparing `_meta` around the call.
        changed = any(meta.get(name) != value for name, value in carrier.items())
        meta.update(carrier)
        return changed

    def policy(self, outcome: PolicyOutcome) -> None:
        self.policy_outcome = outcome

    def token_exchange(self, outcome: ExchangeOutcome) -> None:
        cache_hit = outcome.outcome == "cache_hit"
        self.exchange_outcome = outcome.outcome
        end = time.time_ns()
        principal = self.principal
        # A cache hit still gets its child span (recorded off the request path, on the worker), but
        # no audit line of its own: no IdP was asked, and the mcp.call line records the hit. Having
        # nothing to write at once, it is recorded in the call's job, just before the call (the
        # order a job of its own gave it): one job per call instead of two.
        if cache_hit and not self.finished:
            held, self._hit = self._hit, (outcome, end, principal)
            if held is None:
                return
            outcome, end, principal = held  # a second hit for one call: the first goes now
        self._observer.worker.submit(
            partial(self._record_exchange, outcome, end, principal, audit=outcome.outcome != "cache_hit")
        )

    def _record_exchange(
        self, outcome: ExchangeOutcome, end: int, principal: Principal | None, *, audit: bool = True
    ) -> None:
        observer = self._observer
        observer.exchanges.add_key(_exchange_key(outcome.outcome))
        start = end - int(max(outcome.duration_s, 0.0) * 1e9)
        # The ids only for the audit line: a cache hit's span has none to link (no hex formatting).
        trace_id, span_id = self._exchange_span(outcome, start, end, audit)
        if not audit:
            return
        observer.exchange_duration.record(outcome.duration_s, {"outcome": outcome.outcome})
        observer.audit.write(
            exchange_event(
                EventStamp.at_ns(end, trace_id, span_id),
                outcome=outcome,
                principal=principal,
                message=self._message,
                request=self._request,
                workload=self._workload,
            ),
            hold=observer.hold_audit,
        )

    def finish(
        self,
        *,
        http_status: int,
        outcome: str,
        error_type: str | None = None,
        reason: str | None = None,
        response: McpMessage | None = None,
    ) -> None:
        if self.finished:
            return
        self.finished = True
        # Capture the facts now; span end, metric points and the audit line happen on the worker.
        duration = time.perf_counter() - self._started
        end = time.time_ns()
        principal = self.principal
        exchange = self.exchange_outcome
        policy = self.policy_outcome
        hit, self._hit = self._hit, None
        # A partial, not a closure: one object per job instead of a cell per captured name, which
        # would live on the worker's queue (past a young-generation collection) until it ran.
        self._observer.worker.submit(
            partial(
                self._record,
                http_status,
                outcome,
                error_type,
                reason,
                response,
                duration,
                end,
                principal,
                exchange,
                policy,
                hit,
            )
        )

    def _record(
        self,
        http_status: int,
        outcome: str,
        error_type: str | None,
        reason: str | None,
        response: McpMessage | None,
        duration: float,
        end: int,
        principal: Principal | None,
        exchange: str | None,
        policy: PolicyOutcome | None = None,
        hit: tuple[ExchangeOutcome, int, Principal | None] | None = None,
    ) -> None:
        observer = self._observer
        if hit is not None:
            try:
                self._record_exchange(*hit, audit=False)
            except Exception as exc:  # as a job of its own: its failure never loses the call's record
                log.error("telemetry: a recording job failed: %s", type(exc).__qualname__)
        facts = self._final_facts(
            http_status, outcome, error_type, reason, response, principal, exchange, policy
        )
        error = facts.error_type
        self._record_metrics(duration, facts, outcome)
        trace_id, span_id = self._end_span(facts.attributes, facts.status_error, end)
        audit = observer.audit
        if not audit.enabled:
            return
        event_id, time_text = random_uuid4(), time_text_ns(end)
        config = observer.config
        if not config.record_arguments or self._message.arguments is None:
            # The line from cached blocks, the same bytes as the event's (`CallLines`).
            blocks = self._line_blocks(principal, outcome, reason, http_status, error, exchange)
            line = (
                None
                if blocks is None
                else assemble_line(
                    event_id, time_text, trace_id, span_id, blocks, duration, self._message.id, policy
                )
            )
            if line is not None and audit.write_line(line, outcome, hold=observer.hold_audit):
                return
        audit.write(
            mcp_call_event(
                EventStamp(event_id, time_text, trace_id, span_id),
                message=self._message,
                request=self._request,
                principal=principal,
                workload=self._workload,
                outcome=outcome,
                reason=reason,
                http_status=http_status,
                error_type=error,
                duration_s=duration,
                config=config,
                token_exchange=exchange,
                policy=policy,
            ),
            hold=observer.hold_audit,
        )


class _OtelScope(_ScopeBase):
    """One MCP message as an SDK span."""

    __slots__ = ("_span",)

    def __init__(
        self,
        observer: OtelObserver,
        message: McpMessage,
        request: RequestInfo,
        span: Span,
        attributes: dict[str, semconv.AttributeValue],
        workload: Workload,
    ) -> None:
        super().__init__(observer, message, request, attributes, workload)
        self._span = span

    def _trace_headers(self) -> dict[str, str]:
        return trace_headers(self._span)

    def _exchange_span(
        self, outcome: ExchangeOutcome, start: int, end: int, ids: bool = True
    ) -> tuple[str | None, str | None]:
        span = self._observer.tracer.start_span(
            "outrider.token_exchange",
            context=trace.set_span_in_context(self._span, otel_context.Context()),
            kind=SpanKind.CLIENT,
            attributes=semconv.exchange_span_attributes(outcome),
            start_time=start,
        )
        if outcome.outcome not in semconv.EXCHANGE_OK:
            span.set_status(Status(StatusCode.ERROR, outcome.outcome))
        span.end(end_time=end)
        return _ids(span) if ids else (None, None)

    def _end_span(
        self, final: dict[str, semconv.AttributeValue], error: str | None, end: int
    ) -> tuple[str | None, str | None]:
        self._span.set_attributes(final)
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end(end_time=end)
        return _ids(self._span)
