"""What telemetry costs: per Observer call (default) and through the real sidecar (`--proxy`).

Default: blocks of calls alternate between the NullObserver and the real observer (exporting over
OTLP/HTTP to a local receiver in its own process, audit lines to a file) in one process; prints p50/p99.
`--proxy`: two `outrider sidecar` processes side by side, telemetry off (OTEL_SDK_DISABLED, audit off)
and on (OTLP/HTTP to a local receiver, audit file), in front of one MCP server; paced `tools/call`
phases alternate direct / off / on. Prints added latency and the sidecars' CPU time per request, which
stays meaningful on a machine shared with other work (latency does not), and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from outrider.sidecar.inbound.jsonrpc import McpMessage  # noqa: E402
from outrider.sidecar.telemetry.audit import AuditLog, Workload  # noqa: E402
from outrider.sidecar.telemetry.config import TelemetryConfig  # noqa: E402
from outrider.sidecar.telemetry.observer import (  # noqa: E402
    ExchangeOutcome,
    NullObserver,
    Observer,
    Principal,
    RequestInfo,
)
from outrider.sidecar.telemetry.observer_otel import OtelObserver  # noqa: E402
from outrider.sidecar.telemetry.setup import (  # noqa: E402
    TelemetryProviders,
    build_providers,
    tune_switch_interval,
)
from outrider.sidecar.telemetry.worker import Worker  # noqa: E402

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


def measure(call: Callable[[], None], n: int, rate: float) -> list[float]:
    """Time `n` calls, paced at `rate` per second (0: back to back).

    Pacing matters: a proxy waits in epoll between requests (the GIL released), which is when the
    exporter thread encodes and sends; back-to-back calls make that thread steal the GIL mid-call.
    """
    out: list[float] = []
    clock = time.perf_counter_ns
    interval = 1e9 / rate if rate > 0 else 0.0
    next_slot = float(clock())
    for _ in range(n):
        if interval:
            next_slot += interval
            delay = (next_slot - clock()) / 1e9
            if delay > 0:
                time.sleep(delay)
        started = clock()
        call()
        out.append((clock() - started) / 1000.0)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def real_observer(
    endpoint: str, audit_path: Path, *, lean_spans: bool = True
) -> tuple[OtelObserver, TelemetryProviders]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    os.environ.update(env)  # the exporters read their endpoint from the environment
    config = TelemetryConfig(audit=str(audit_path))
    audit = AuditLog.open(str(audit_path))
    workload = lambda: Workload("spiffe://bench/ns/a/sa/b", "pod-0", "bench")  # noqa: E731
    worker = Worker(enabled=True)  # as the component does with telemetry.background (default)
    if not hasattr(TelemetryProviders, "observer"):  # a tree from before the lean span path
        providers = build_providers("outrider-proxy", env=env)
        tune_switch_interval(providers.plan)
        sdk_observer = OtelObserver(
            config,
            tracer_provider=providers.tracer_provider,
            meter_provider=providers.meter_provider,
            audit=audit,
            workload=workload,
            flush=providers.force_flush,
            worker=worker,
        )
        return sdk_observer, providers
    providers = build_providers("outrider-proxy", env=env, lean_spans=lean_spans)
    # As the telemetry component does in `outrider sidecar` (a tree from before `sdk_export` always tuned).
    sdk_export = providers.sdk_export() if hasattr(providers, "sdk_export") else True
    if sdk_export:
        tune_switch_interval(providers.plan)
    # The observer the sidecar's telemetry component would choose.
    return providers.observer(config, audit, workload, worker), providers


async def _wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the OTLP receiver did not start")


async def span_counting_receiver(stack: Any) -> tuple[int, dict[str, int]]:
    """A local OTLP/HTTP receiver that decodes each trace payload and counts requests and spans."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    counts: dict[str, int] = {"spans": 0, "server_spans": 0}

    async def sink(request: web.Request) -> web.Response:
        body = await request.read()
        counts[request.path] = counts.get(request.path, 0) + 1
        if request.path.endswith("/v1/traces"):
            decoded = ExportTraceServiceRequest.FromString(body)
            for rs in decoded.resource_spans:
                for ss in rs.scope_spans:
                    counts["spans"] += len(ss.spans)
                    counts["server_spans"] += sum(1 for span in ss.spans if span.kind == 2)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/{tail:.*}", sink)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return port, counts


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def proxy_run(args: argparse.Namespace) -> dict[str, Any]:
    import subprocess
    from contextlib import AsyncExitStack

    import bench_proxy as bp  # the proxy benchmark's harness: dev IdP, Workload API, paced load

    from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles
    from outrider.sidecar.dev.workload_api import DevWorkloadApi

    tmp = bp.scratch_dir("outrider-bench-telemetry-")
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(DevWorkloadApi(tmp / "agent.sock", spiffe_id=bp.SIDECAR_ID))
        idp = await stack.enter_async_context(
            DevIdP(
                clients=[
                    ClientRegistration("bench-mcp", spiffe_ids=(bp.SIDECAR_ID,), audiences=(bp.DOWNSTREAM,))
                ],
                spiffe_bundles=StaticJwtBundles({api.trust_domain: api.jwks()}),
                token_ttl=3600,
            )
        )
        otlp_port, otlp_counts = await span_counting_receiver(stack)
        mcp_port = free_port()
        python = sys.executable
        app = subprocess.Popen(  # noqa: ASYNC220 - start-up only, not on the measured path
            [python, "-m", "outrider.sidecar.dev.mcp_server", "--port", str(mcp_port), "--mode", "stateless"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        stack.callback(bp._stop, app)
        outrider = str(Path(python).with_name("outrider"))
        sidecars: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        for mode in ("off", "on"):
            port, admin = free_port(), free_port()
            (tmp / mode).mkdir()
            env = bp.sidecar_env(
                api=api,
                idp=idp,
                mcp_port=mcp_port,
                port=port,
                admin=admin,
                telemetry=mode,
                tmp=tmp / mode,
                otlp=otlp_port,
            )
            if mode == "on" and args.sample is not None:
                env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
                env["OTEL_TRACES_SAMPLER_ARG"] = str(args.sample)
            log = (tmp / mode / "sidecar.log").open("wb")
            process = subprocess.Popen(  # noqa: ASYNC220 - start-up only
                [outrider, "sidecar", "--log-level", "WARNING"], env=env, stdout=log, stderr=log
            )
            stack.callback(bp._stop, process)
            await bp.wait_http(f"http://127.0.0.1:{admin}/readyz", expect=200)
            sidecars[mode] = (process, f"http://127.0.0.1:{port}/mcp")
        direct_url = f"http://127.0.0.1:{mcp_port}/mcp"
        await bp.wait_http(direct_url)
        token = idp.mint("alice", audience=bp.RESOURCE, expires_in=3600)
        proxy_headers = {**bp.HEADERS, "Authorization": f"Bearer {token}"}
        await bp.paced(direct_url, bp.HEADERS, 50, 1, bp.Phase())
        warmup = {mode: bp.Phase() for mode in sidecars}
        for mode, (_, url) in sidecars.items():
            await bp.paced(url, proxy_headers, 50, 1, warmup[mode])
        await asyncio.sleep(1)

        phases = {"direct": bp.Phase(), "off": bp.Phase(), "on": bp.Phase()}
        cpu0 = {mode: cpu_seconds(p.pid) for mode, (p, _) in sidecars.items()}

        slice_s = args.seconds / args.rounds
        for _ in range(args.rounds):
            await bp.paced(direct_url, bp.HEADERS, args.rate, slice_s, phases["direct"])
            for mode, (_, url) in sidecars.items():
                await bp.paced(url, proxy_headers, args.rate, slice_s, phases[mode])
        await asyncio.sleep(6)  # let the "on" sidecar export its last batches (counted in its CPU)
        cpu = {mode: cpu_seconds(p.pid) - cpu0[mode] for mode, (p, _) in sidecars.items()}
        for mode, (process, _) in sidecars.items():
            if process.poll() is not None:
                raise RuntimeError(f"the {mode} sidecar exited: see {tmp / mode / 'sidecar.log'}")
        # Every call to the "on" sidecar (warm-up included) must have its server span and audit line.
        audit_lines = sum(1 for _ in (tmp / "on" / "audit.jsonl").open())
        server_spans = otlp_counts["server_spans"]
        on_calls = len(warmup["on"].latencies_ms) + warmup["on"].errors
        load = os.getloadavg()

    def stats(phase: Any) -> dict[str, float]:
        v = phase.latencies_ms
        return {"n": len(v), "errors": phase.errors, "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99)}

    d, off, on = (stats(phases[k]) for k in ("direct", "off", "on"))
    cpu_off_us = cpu["off"] / max(1, off["n"]) * 1e6
    cpu_on_us = cpu["on"] / max(1, on["n"]) * 1e6
    proxy_p50 = off["p50_ms"] - d["p50_ms"]
    proxy_p99 = off["p99_ms"] - d["p99_ms"]
    return {
        "rate": args.rate,
        "sample": args.sample,
        "direct": d,
        "telemetry_off": off,
        "telemetry_on": on,
        "proxy_added_p50_ms": round(proxy_p50, 3),
        "proxy_added_p99_ms": round(proxy_p99, 3),
        "telemetry_added_p50_ms": round(on["p50_ms"] - off["p50_ms"], 3),
        "telemetry_added_p99_ms": round(on["p99_ms"] - off["p99_ms"], 3),
        "telemetry_p50_share": round((on["p50_ms"] - off["p50_ms"]) / proxy_p50, 3)
        if proxy_p50 > 0
        else None,
        "telemetry_p99_share": round((on["p99_ms"] - off["p99_ms"]) / proxy_p99, 3)
        if proxy_p99 > 0
        else None,
        "sidecar_cpu_us_per_request_off": round(cpu_off_us, 1),
        "sidecar_cpu_us_per_request_on": round(cpu_on_us, 1),
        "telemetry_cpu_share": round((cpu_on_us - cpu_off_us) / cpu_off_us, 3),
        "otlp_requests": sum(v for k, v in otlp_counts.items() if k.startswith("/")),
        "server_spans": server_spans,
        # Each paced phase also sends one untimed call first (to open its keep-alive connection).
        "calls_on": on_calls + len(phases["on"].latencies_ms) + phases["on"].errors + args.rounds + 1,
        "audit_lines": audit_lines,
        "load_avg": [round(x, 2) for x in load],
    }


def render_proxy(r: dict[str, Any]) -> str:
    def row(name: str, s: dict[str, float]) -> str:
        return (
            f"{name:<14}: p50 {s['p50_ms']:7.3f} ms  p99 {s['p99_ms']:8.3f} ms  "
            f"n={s['n']} errors={s['errors']}"
        )

    def share(value: float | None) -> str:
        return (
            "n/a" if value is None else f"{value:.0%} ({'ok' if value <= 0.2 else 'MISSED'}, target <= 20%)"
        )

    return "\n".join(
        [
            f"== tools/call at {r['rate']:g} req/s through `outrider sidecar`, telemetry off vs on"
            + (f" (traces sampled at {r['sample']:g})" if r["sample"] is not None else "")
            + " ==",
            row("direct", r["direct"]),
            row("telemetry off", r["telemetry_off"]),
            row("telemetry on", r["telemetry_on"]),
            f"proxy's own    : p50 {r['proxy_added_p50_ms']:+.3f} ms  p99 {r['proxy_added_p99_ms']:+.3f} ms",
            f"telemetry adds : p50 {r['telemetry_added_p50_ms']:+.3f} ms = "
            f"{share(r['telemetry_p50_share'])}; p99 {r['telemetry_added_p99_ms']:+.3f} ms = "
            f"{share(r['telemetry_p99_share'])}",
            f"sidecar CPU    : {r['sidecar_cpu_us_per_request_off']:.0f} us/request off, "
            f"{r['sidecar_cpu_us_per_request_on']:.0f} us/request on: telemetry "
            f"{share(r['telemetry_cpu_share'])}",
            f"exported       : {r['otlp_requests']} OTLP/HTTP requests; "
            f"{r['server_spans']} server spans and {r['audit_lines']} audit lines for "
            f"{r['calls_on']} calls to the 'on' sidecar",
            f"CPU on / off   : "
            f"{r['sidecar_cpu_us_per_request_on'] / r['sidecar_cpu_us_per_request_off']:.2f}x "
            f"(target <= 1.25x); load average {r['load_avg']}",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=10000, help="calls per observer (default 10000)")
    parser.add_argument("--blocks", type=int, default=10, help="alternating blocks (default 10)")
    parser.add_argument(
        "--call-rate", type=float, default=1000.0, help="calls per second, 0 for back to back (default 1000)"
    )
    parser.add_argument(
        "--proxy-overhead-ms",
        type=float,
        default=None,
        help="the proxy's own added p50 (from `make bench-proxy`) to express the cost as a share of it",
    )
    parser.add_argument("--proxy", action="store_true", help="measure through two real sidecars instead")
    parser.add_argument("--rate", type=float, default=200.0, help="--proxy: paced req/s (default 200)")
    parser.add_argument("--seconds", type=float, default=12.0, help="--proxy: paced seconds per path")
    parser.add_argument("--rounds", type=int, default=4, help="--proxy: alternating slices (default 4)")
    parser.add_argument(
        "--sample", type=float, default=None, help="--proxy: trace sampling ratio for the 'on' sidecar"
    )
    parser.add_argument(
        "--sdk-spans", action="store_true", help="observer bench: spans through the OpenTelemetry SDK path"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.proxy:
        sys.path.insert(0, str(ROOT / "bench"))
        proxy_result = asyncio.run(proxy_run(args))
        print(json.dumps(proxy_result, indent=2) if args.json else render_proxy(proxy_result))
        return 0

    port = free_port()
    receiver = multiprocessing.get_context("spawn").Process(target=_receiver, args=(port,), daemon=True)
    receiver.start()
    try:
        asyncio.run(_wait_port(port))
        tmp = Path(tempfile.mkdtemp(prefix="outrider-bench-telemetry-"))  # removed below
        observer, providers = real_observer(
            f"http://127.0.0.1:{port}", tmp / "audit.jsonl", lean_spans=not args.sdk_spans
        )
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
            off.extend(measure(lambda: one_call(null), block, args.call_rate))
            on.extend(measure(lambda: one_call(observer), block, args.call_rate))
        wall = time.perf_counter() - started
        observer.force_flush()
        # CPU per call of the whole process (worker and exporter threads included): blocks of calls,
        # then everything they queued is recorded and exported before the clock stops.
        cpu_null: list[float] = []
        cpu_otel: list[float] = []
        for _ in range(3):
            for target, sink in ((null, cpu_null), (observer, cpu_otel)):
                gc.collect()
                cpu0 = time.process_time()
                measure(lambda t=target: one_call(t), block, args.call_rate)  # type: ignore[misc]
                if target is observer:
                    observer.force_flush()
                sink.append((time.process_time() - cpu0) / block * 1e6)
        observer.worker.close()
        providers.shutdown()
        with (tmp / "audit.jsonl").open() as lines:
            audit_lines = sum(1 for _ in lines)
        shutil.rmtree(tmp, ignore_errors=True)
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
        "call_rate": args.call_rate,
        "null_cpu_us": round(min(cpu_null), 1),
        "otel_cpu_us": round(min(cpu_otel), 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    result["added_cpu_us"] = round(result["otel_cpu_us"] - result["null_cpu_us"], 1)
    result["added_p50_us"] = round(result["otel_p50_us"] - result["null_p50_us"], 2)
    result["added_p99_us"] = round(result["otel_p99_us"] - result["null_p99_us"], 2)
    if args.proxy_overhead_ms:
        result["added_p50_share_of_proxy_overhead"] = round(
            result["added_p50_us"] / 1000.0 / args.proxy_overhead_ms, 3
        )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    pace = f"{args.call_rate:g} calls/s" if args.call_rate else "back to back"
    path = "lean spans" if getattr(providers, "lean", None) is not None else "SDK spans"
    print(f"== Observer per tools/call, {len(on)} calls each, {pace}, same run ({path}) ==")
    print(f"NullObserver : p50 {result['null_p50_us']:8.2f} us   p99 {result['null_p99_us']:8.2f} us")
    print(f"OtelObserver : p50 {result['otel_p50_us']:8.2f} us   p99 {result['otel_p99_us']:8.2f} us")
    print(
        f"added        : p50 {result['added_p50_us']:+8.2f} us   p99 {result['added_p99_us']:+8.2f} us "
        f"(span, histogram, 2 counters, audit line, OTLP/HTTP)"
    )
    if "added_p50_share_of_proxy_overhead" in result:
        share = result["added_p50_share_of_proxy_overhead"]
        print(
            f"vs proxy     : {share:.1%} of the proxy's own {args.proxy_overhead_ms} ms p50 overhead "
            f"(target <= 20%: {'ok' if share <= 0.2 else 'MISSED'})"
        )
    print(
        f"CPU per call : NullObserver {result['null_cpu_us']:.1f} us, "
        f"observer {result['otel_cpu_us']:.1f} us "
        f"(threads and export included, best of 3 blocks): telemetry adds {result['added_cpu_us']:.1f} us"
    )
    print(f"audit lines  : {audit_lines}; load average {result['load_avg']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
