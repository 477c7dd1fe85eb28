"""A local OTLP/HTTP receiver for tests on loopback; decodes payloads with opentelemetry-proto."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass
class Received:
    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)

    def spans(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for request in self.traces:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out[span.name] = span
        return out

    def resource(self) -> dict[str, Any]:
        rs = self.traces[0].resource_spans[0]
        return {kv.key: value_of(kv.value) for kv in rs.resource.attributes}

    def metric_names(self) -> set[str]:
        return {
            m.name
            for request in self.metrics
            for rm in request.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(value_of(v) for v in value.array_value.values)
    return getattr(value, kind) if kind else None


def attributes_of(span: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in span.attributes}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def otlp_http_receiver() -> AsyncIterator[tuple[str, Received]]:
    """Serve OTLP/HTTP on 127.0.0.1; yields the endpoint (for OTEL_EXPORTER_OTLP_ENDPOINT) and the log."""
    received = Received()

    async def traces(request: web.Request) -> web.Response:
        received.content_types.append(request.content_type)
        payload = await request.read()
        received.raw.append(payload)
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(payload)
        received.traces.append(message)
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def metrics(request: web.Request) -> web.Response:
        payload = await request.read()
        received.raw.append(payload)
        message = metrics_service_pb2.ExportMetricsServiceRequest()
        message.ParseFromString(payload)
        received.metrics.append(message)
        body = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    app.router.add_post("/v1/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await runner.cleanup()
