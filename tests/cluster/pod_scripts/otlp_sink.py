"""An OTLP/HTTP receiver in a pod (run from the testkit image, which has aiohttp and opentelemetry-proto).

Decodes every ExportTraceServiceRequest on :4318/v1/traces and prints one JSON line per span
(`{"span": name, "attributes": {...}, "service": ...}`), so the test reads spans with kubectl logs.
Metrics requests on /v1/metrics are acknowledged and counted.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def value_of(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


async def traces(request: web.Request) -> web.Response:
    message = trace_service_pb2.ExportTraceServiceRequest()
    message.ParseFromString(await request.read())
    for rs in message.resource_spans:
        resource = {kv.key: value_of(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for span in ss.spans:
                attributes = {kv.key: value_of(kv.value) for kv in span.attributes}
                line = {"span": span.name, "attributes": attributes, "service": resource.get("service.name")}
                print(json.dumps(line), flush=True)
    body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
    return web.Response(body=body, content_type="application/x-protobuf")


async def metrics(request: web.Request) -> web.Response:
    message = metrics_service_pb2.ExportMetricsServiceRequest()
    message.ParseFromString(await request.read())
    names = sorted({m.name for rm in message.resource_metrics for sm in rm.scope_metrics for m in sm.metrics})
    print(json.dumps({"metrics": names}), flush=True)
    body = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
    return web.Response(body=body, content_type="application/x-protobuf")


app = web.Application()
app.router.add_post("/v1/traces", traces)
app.router.add_post("/v1/metrics", metrics)
web.run_app(app, host="0.0.0.0", port=4318, print=None)
