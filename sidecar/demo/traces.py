"""A local OTLP/HTTP trace receiver for the demo, and the span tree an operator would look at.

The receiver decodes real OTLP protobuf payloads; `span_tree` is a pure function over decoded spans.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    service: str = ""
    status_code: int = 0  # 0 unset, 1 ok, 2 error

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def decode_export(body: bytes) -> list[Span]:
    """Spans of one OTLP `ExportTraceServiceRequest` protobuf body."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[Span] = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        service = str(resource.get("service.name", ""))
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={kv.key: _value(kv.value) for kv in s.attributes},
                        service=service,
                        status_code=int(s.status.code),
                    )
                )
    return spans


# Attributes worth showing next to a span in the tree, in this order.
_SHOWN = (
    "mcp.method.name",
    "gen_ai.tool.name",
    "enduser.id",
    "outrider.outcome",
    "outrider.token_exchange.outcome",
    "outrider.token_exchange.audience",
    "outrider.egress.allowed",
    "outrider.egress.rule",
    "error.type",
    "rpc.response.status_code",
    "http.response.status_code",
)


def span_tree(spans: Sequence[Span], trace_id: str) -> list[str]:
    """The spans of one trace as indented lines `name  12.3 ms  key=value ...`, children by start time."""
    mine = [s for s in spans if s.trace_id == trace_id]
    ids = {s.span_id for s in mine}
    children: dict[str, list[Span]] = {}
    roots: list[Span] = []
    for s in mine:
        if s.parent_span_id and s.parent_span_id in ids:
            children.setdefault(s.parent_span_id, []).append(s)
        else:
            roots.append(s)
    lines: list[str] = []

    def walk(span: Span, depth: int, parent_service: str = "") -> None:
        attrs = " ".join(f"{k}={span.attributes[k]}" for k in _SHOWN if k in span.attributes)
        # Name the process where it changes: the client's span, then the sidecar's.
        svc = f"[{span.service}] " if span.service and span.service != parent_service else ""
        err = " ERROR" if span.status_code == 2 else ""
        label = f"{'  ' * depth}{'└─ ' if depth else ''}{svc}{span.name}"
        lines.append(f"{label:<58} {span.duration_ms:8.2f} ms{err}  {attrs}".rstrip())
        for child in sorted(children.get(span.span_id, []), key=lambda c: c.start_ns):
            walk(child, depth + 1, span.service)

    for root in sorted(roots, key=lambda r: r.start_ns):
        walk(root, 0)
    return lines


def find_trace(spans: Iterable[Span], *, tool: str | None = None, method: str | None = None) -> str | None:
    """The trace id of the latest server span for `tool` (or `method`)."""
    best: Span | None = None
    for s in spans:
        if tool is not None and s.attributes.get("gen_ai.tool.name") != tool:
            continue
        if method is not None and s.attributes.get("mcp.method.name") != method:
            continue
        if best is None or s.start_ns > best.start_ns:
            best = s
    return best.trace_id if best else None


DEMO_CLIENT_SERVICE = "outrider-demo-client"


def server_span(spans: Iterable[Span], trace_id: str, service: str) -> Span | None:
    """The first span of `service` in the trace (the sidecar's server span)."""
    mine = sorted(
        (s for s in spans if s.trace_id == trace_id and s.service == service), key=lambda s: s.start_ns
    )
    return mine[0] if mine else None


def root_span(spans: Iterable[Span], trace_id: str) -> Span | None:
    mine = [s for s in spans if s.trace_id == trace_id]
    ids = {s.span_id for s in mine}
    roots = [s for s in mine if not s.parent_span_id or s.parent_span_id not in ids]
    return min(roots, key=lambda s: s.start_ns) if roots else None


def first_exchange_trace(spans: Iterable[Span]) -> str | None:
    """The trace of the earliest token-exchange child span (a cache miss that went to the IdP)."""
    exchanges = [
        s
        for s in spans
        if s.parent_span_id
        and "token_exchange" in s.name
        and not s.attributes.get("outrider.token_exchange.cache_hit", False)
    ]
    return min(exchanges, key=lambda s: s.start_ns).trace_id if exchanges else None


@dataclass
class OtlpReceiver:
    """Collects every span POSTed to /v1/traces; /v1/metrics and /v1/logs are accepted and dropped."""

    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        self.requests += 1
        try:
            self.spans.extend(decode_export(body))
        except Exception as exc:  # a bad payload is a finding to report, not a crash
            self.errors.append(f"undecodable OTLP payload: {exc}")
            return web.Response(status=400, text="bad payload")
        self.changed.set()
        response = trace_service_pb2.ExportTraceServiceResponse()
        return web.Response(body=response.SerializeToString(), content_type="application/x-protobuf")

    async def _other(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def wait_for(self, predicate: Any, within: float) -> bool:
        """Wait until `predicate(spans)` is true or `within` seconds pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not predicate(self.spans):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                return bool(predicate(self.spans))
        return True

    @asynccontextmanager
    async def serve(self, host: str, port: int = 0) -> AsyncIterator[str]:
        """Listen on host:port (0 = any free port) and yield the base URL for OTEL_EXPORTER_OTLP_ENDPOINT."""
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._other)
        app.router.add_post("/v1/logs", self._other)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        try:
            sockets = getattr(site._server, "sockets", None) or []
            bound = sockets[0].getsockname()[1] if sockets else port
            yield f"http://{host}:{bound}"
        finally:
            await runner.cleanup()
