"""Per-call cost of the telemetry Observer (span, metrics, audit line, OTLP export) vs the NullObserver.

Same run, same process: blocks of calls alternate between the two observers to cancel drift. The real
observer exports over OTLP/HTTP to a local receiver (its own process) and appends audit lines to a file.
Prints p50/p99 per call for each, the added cost, and, with --proxy-overhead-ms, the ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.inbound.jsonrpc import McpMessage  # noqa: E402
from sidecar.telemetry.audit import AuditLog, Workload  # noqa: E402
from sidecar.telemetry.config import TelemetryConfig  # noqa: E402
from sidecar.telemetry.observer import (  # noqa: E402
    ExchangeOutcome,
    NullObserver,
    Observer,
    Principal,
    RequestInfo,
)
from sidecar.telemetry.observer_otel import OtelObserver  # noqa: E402
from sidecar.telemetry.setup import TelemetryProviders, build_providers  # noqa: E402

MESSAGE = McpMessage(kind="request", method="tools/call", id=7, tool_name="echo", arguments={"text": "hi"})
REQUEST = RequestInfo(
    http_method="POST",
    transport="streamable-http",
    protocol_version="2025-06-18",
    session_id="0f3c",
    client_address="10.0.0.9:50123",
    headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
)
ALICE = Principal(
    kind="oidc", subject="alice", issuer="https://idp.bench", client_id="cli", delegation=("x",)
)
EXCHANGE = ExchangeOutcome(outcome="cache_hit", audience="https://api.bench", duration_s=0.00002)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _receiver(port: int) -> None:
    from aiohttp import web

    async def sink(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/{tail:.*}", sink)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def one_call(observer: Observer) -> None:
    """What the inbound proxy does with the observer for one authenticated tools/call."""
    with observer.mcp_call(MESSAGE, REQUEST) as scope:
        scope.set_principal(ALICE)
        scope.token_exchange(EXCHANGE)
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo"}}
        scope.inject_context({}, body)
        scope.finish(http_status=200, outcome="ok", response=McpMessage(kind="response", id=7))


def measure(call: Callable[[], None], n: int) -> list[float]:
    out: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(n):
        started = clock()
        call()
        out.append((clock() - started) / 1000.0)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def real_observer(endpoint: str, audit_path: Path) -> tuple[OtelObserver, TelemetryProviders]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    os.environ.update(env)  # the exporters read their endpoint from the environment
    providers = build_providers("outrider-proxy", env=env)
    observer = OtelObserver(
        TelemetryConfig(audit=str(audit_path)),
        tracer_provider=providers.tracer_provider,
        meter_provider=providers.meter_provider,
        audit=AuditLog.open(str(audit_path)),
        workload=lambda: Workload("spiffe://bench/ns/a/sa/b", "pod-0", "bench"),
        flush=providers.force_flush,
    )
    return observer, providers


async def _wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the OTLP receiver did not start")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20000, help="calls per observer (default 20000)")
    parser.add_argument("--blocks", type=int, default=10, help="alternating blocks (default 10)")
    parser.add_argument(
        "--proxy-overhead-ms",
        type=float,
        default=None,
        help="the proxy's own added p50 (from `make bench-proxy`) to express the cost as a share of it",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    port = free_port()
    receiver = multiprocessing.get_context("spawn").Process(target=_receiver, args=(port,), daemon=True)
    receiver.start()
    try:
        asyncio.run(_wait_port(port))
        tmp = Path(tempfile.mkdtemp(prefix="outrider-bench-telemetry-"))
        observer, providers = real_observer(f"http://127.0.0.1:{port}", tmp / "audit.jsonl")
        null = NullObserver()
        for _ in range(2000):  # warm caches, allocate instruments' series
            one_call(observer)
            one_call(null)
        block = max(1, args.calls // args.blocks)
        off: list[float] = []
        on: list[float] = []
        gc.collect()
        started = time.perf_counter()
        for _ in range(args.blocks):
            off.extend(measure(lambda: one_call(null), block))
            on.extend(measure(lambda: one_call(observer), block))
        wall = time.perf_counter() - started
        providers.force_flush()
        providers.shutdown()
        audit_lines = sum(1 for _ in (tmp / "audit.jsonl").open())
    finally:
        receiver.terminate()
        receiver.join(5)

    result: dict[str, Any] = {
        "calls_per_observer": len(on),
        "null_p50_us": round(percentile(off, 50), 2),
        "null_p99_us": round(percentile(off, 99), 2),
        "otel_p50_us": round(percentile(on, 50), 2),
        "otel_p99_us": round(percentile(on, 99), 2),
        "audit_lines": audit_lines,
        "wall_s": round(wall, 2),
    }
    result["added_p50_us"] = round(result["otel_p50_us"] - result["null_p50_us"], 2)
    result["added_p99_us"] = round(result["otel_p99_us"] - result["null_p99_us"], 2)
    if args.proxy_overhead_ms:
        result["added_p50_share_of_proxy_overhead"] = round(
            result["added_p50_us"] / 1000.0 / args.proxy_overhead_ms, 3
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"== Observer per tools/call, {len(on)} calls each, same run ==")
    print(f"NullObserver : p50 {result['null_p50_us']:8.2f} us   p99 {result['null_p99_us']:8.2f} us")
    print(f"OtelObserver : p50 {result['otel_p50_us']:8.2f} us   p99 {result['otel_p99_us']:8.2f} us")
    print(
        f"added        : p50 {result['added_p50_us']:+8.2f} us   p99 {result['added_p99_us']:+8.2f} us "
        f"(span + child span + 4 metric points + 2 audit lines + OTLP/HTTP export)"
    )
    if "added_p50_share_of_proxy_overhead" in result:
        share = result["added_p50_share_of_proxy_overhead"]
        print(
            f"vs proxy     : {share:.1%} of the proxy's own {args.proxy_overhead_ms} ms p50 overhead "
            f"(target <= 20%: {'ok' if share <= 0.2 else 'MISSED'})"
        )
    print(f"audit lines  : {audit_lines}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
