"""Stand-ins the sidecar benchmarks run in their own processes: `python bench/stand_ins.py KIND --port N`.

- `upstream`: a minimal aiohttp handler answering a JSON-RPC `tools/call` and `initialize` (with a new
  `Mcp-Session-Id`), and holding `GET /mcp` SSE streams open: the cheapest possible MCP server, so
  the sidecar, not the app, is what is measured;
- `floor`: a minimal aiohttp pass-through proxy to `--upstream` (what any Python proxy of this stack
  costs: the floor the sidecar is compared against);
- `otlp`: an OTLP/HTTP receiver that decodes every request and counts spans and metric points
  (`GET /counts`), so a benchmark can prove nothing was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json

from aiohttp import ClientSession, TCPConnector, web


def upstream_app() -> web.Application:
    sessions = itertools.count(1)

    async def mcp(request: web.Request) -> web.Response:
        call = json.loads(await request.read())
        if call.get("method") == "initialize":
            # A new MCP session: the id the sidecar binds to the caller (`inbound.sessions`).
            result = {"protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "up"}}
            headers = {"Mcp-Session-Id": f"s{next(sessions)}"}
            return web.json_response(
                {"jsonrpc": "2.0", "id": call.get("id"), "result": result}, headers=headers
            )
        text = call.get("params", {}).get("arguments", {}).get("text", "")
        result = {"content": [{"type": "text", "text": text}], "isError": False}
        return web.json_response({"jsonrpc": "2.0", "id": call.get("id"), "result": result})

    async def stream(request: web.Request) -> web.StreamResponse:
        # A server-to-client SSE stream (GET /mcp), held open until the client goes away.
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b": open\n\n")
        try:
            while True:
                await asyncio.sleep(15)
                await response.write(b": keep-alive\n\n")
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response

    app = web.Application()
    app.router.add_post("/mcp", mcp)
    app.router.add_get("/mcp", stream)
    return app


HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "host", "content-length"})


def floor_app(upstream: str) -> web.Application:
    session_key = web.AppKey("session", ClientSession)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = ClientSession(connector=TCPConnector(limit=256))
        yield
        await app[session_key].close()

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        async with request.app[session_key].post(upstream + request.path, data=body, headers=headers) as up:
            payload = await up.read()
            return web.Response(body=payload, status=up.status, content_type=up.content_type)

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/{tail:.*}", forward)
    return app


def otlp_app() -> web.Application:
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    counts = {"spans": 0, "trace_requests": 0, "metric_requests": 0, "metric_points": 0}

    async def traces(request: web.Request) -> web.Response:
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        counts["trace_requests"] += 1
        counts["spans"] += sum(len(ss.spans) for rs in message.resource_spans for ss in rs.scope_spans)
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def metrics(request: web.Request) -> web.Response:
        message = metrics_service_pb2.ExportMetricsServiceRequest()
        message.ParseFromString(await request.read())
        counts["metric_requests"] += 1
        for rm in message.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    counts["metric_points"] += len(getattr(metric, kind).data_points) if kind else 0
        body = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def show(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_post("/v1/metrics", metrics)
    app.router.add_get("/counts", show)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=("upstream", "floor", "otlp"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", help="floor: the upstream base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the event loop")
    args = parser.parse_args()
    if args.kind == "upstream":
        app = upstream_app()
    elif args.kind == "floor":
        app = floor_app(args.upstream)
    else:
        app = otlp_app()
    loop = None
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
