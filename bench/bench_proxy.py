"""`make bench-proxy`: MCP `tools/call` round trips through `outrider sidecar` versus straight to the app.

Same run, same MCP server (the `mcp` SDK, stateless JSON mode, its own process): the sidecar runs as
`outrider sidecar` in a subprocess with env config, validating the caller's JWT (dev IdP JWKS) and
exchanging it (RFC 8693, cached after the first call) with its JWT-SVID from the dev Workload API.
Load is open-loop at a steady rate (default 300 req/s); phases alternate direct/sidecar to cancel drift.
Prints p50/p99 added latency, req/s and the sidecar's RSS idle and under load; `--json` for machines.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles  # noqa: E402
from outrider.sidecar.dev.workload_api import DevWorkloadApi  # noqa: E402

SIDECAR_ID = "spiffe://example.org/ns/bench/sa/mcp"
RESOURCE = "https://mcp.bench.example/mcp"
DOWNSTREAM = "https://api.bench.example"
TARGETS = {"p50_added_ms": 1.0, "p99_added_ms": 3.0, "rss_idle_mb": 60.0}


def scratch_dir(prefix: str) -> Path:
    """A temp directory for one benchmark run (sockets, process logs, audit files), removed when the
    process exits unless OUTRIDER_BENCH_KEEP_LOGS=1 (then its path is printed)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("OUTRIDER_BENCH_KEEP_LOGS") == "1":
        print(f"[bench] logs kept in {tmp}", file=sys.stderr)
    else:
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """VmRSS, or RssAnon: the private heap part (file-backed library pages are shared and reclaimable)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (clock ticks -> s): CPU per call is robust to a busy machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Phase:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.elapsed_s if self.elapsed_s else 0.0


def call_body(i: int) -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": i,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "hi"}},
        }
    ).encode()


HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-06-18",
}


async def one_call(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], i: int, phase: Phase
) -> None:
    started = time.perf_counter()
    try:
        async with session.post(url, data=call_body(i), headers=headers) as response:
            payload = await response.read()
            ok = response.status == 200 and b'"result"' in payload
            kind = f"HTTP {response.status}"
    except aiohttp.ClientError as exc:
        ok, kind = False, type(exc).__name__
    if ok:
        phase.latencies_ms.append((time.perf_counter() - started) * 1000)
    else:
        phase.errors += 1
        phase.error_kinds[kind] = phase.error_kinds.get(kind, 0) + 1


async def paced(url: str, headers: dict[str, str], rate: float, seconds: float, phase: Phase) -> None:
    """Open loop: request i starts at t0 + i/rate whether or not earlier ones finished."""
    connector = aiohttp.TCPConnector(limit=256, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        await one_call(session, url, headers, -1, Phase())  # open a keep-alive connection first
        total = int(rate * seconds)
        tasks = []
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_call(session, url, headers, i, phase)))
        await asyncio.gather(*tasks)
        phase.elapsed_s += time.perf_counter() - t0


async def closed_loop(url: str, headers: dict[str, str], concurrency: int, seconds: float) -> float:
    """Maximum throughput: `concurrency` callers back to back."""
    phase = Phase()
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                await one_call(session, url, headers, w * 1_000_000 + i, phase)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        phase.elapsed_s = time.perf_counter() - t0
    return phase.rate


async def wait_http(url: str, timeout_s: float = 30.0, *, expect: int | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if expect is None or response.status == expect:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout_s}s")


async def otlp_receiver(stack: AsyncExitStack) -> tuple[int, dict[str, int]]:
    """A local OTLP/HTTP sink so telemetry-on runs export somewhere real (counts requests)."""
    counts: dict[str, int] = {}

    async def sink(request: web.Request) -> web.Response:
        await request.read()
        counts[request.path] = counts.get(request.path, 0) + 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/{tail:.*}", sink)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return port, counts


def sidecar_env(
    *,
    api: DevWorkloadApi,
    idp: DevIdP,
    mcp_port: int,
    port: int,
    admin: int,
    telemetry: str,
    tmp: Path,
    otlp: int,
) -> dict[str, str]:
    config = {
        "admin": {"host": "127.0.0.1", "port": admin},
        **idp.sidecar_config(
            workload_socket=api.target, port=port, mcp_port=mcp_port, resource=RESOURCE, audience=DOWNSTREAM
        ),
        "egress": {"mode": "explicit", "port": free_port(), "policy_file": None},
        "telemetry": {"audit": str(tmp / "audit.jsonl") if telemetry == "on" else "off"},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OUTRIDER_CONFIG"] = json.dumps(config)
    env["OUTRIDER_POD_NAME"] = "bench-0"
    env["OUTRIDER_POD_NAMESPACE"] = "bench"
    if telemetry == "on":
        env.update(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_SERVICE_NAME": "outrider-proxy",
                "OTEL_METRIC_EXPORT_INTERVAL": "5000",
            }
        )
    else:
        env.update(
            {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
        )
    return env


async def run_one(args: argparse.Namespace, telemetry: str) -> dict[str, Any]:
    tmp = scratch_dir("outrider-bench-")
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(DevWorkloadApi(tmp / "agent.sock", spiffe_id=SIDECAR_ID))
        idp = await stack.enter_async_context(
            DevIdP(
                clients=[ClientRegistration("bench-mcp", spiffe_ids=(SIDECAR_ID,), audiences=(DOWNSTREAM,))],
                spiffe_bundles=StaticJwtBundles({api.trust_domain: api.jwks()}),
                token_ttl=3600,
            )
        )
        otlp_port, otlp_counts = await otlp_receiver(stack)
        mcp_port, port, admin = free_port(), free_port(), free_port()
        python = sys.executable
        app = subprocess.Popen(  # noqa: ASYNC220 - start-up, once
            [python, "-m", "outrider.sidecar.dev.mcp_server", "--port", str(mcp_port), "--mode", "stateless"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(_stop, app)
        env = sidecar_env(
            api=api,
            idp=idp,
            mcp_port=mcp_port,
            port=port,
            admin=admin,
            telemetry=telemetry,
            tmp=tmp,
            otlp=otlp_port,
        )
        outrider = str(Path(python).with_name("outrider"))
        log = (tmp / "sidecar.log").open("wb")
        command = [outrider, "sidecar", "--log-level", "WARNING"]
        if args.profile:
            # cProfile writes its file when the sidecar exits cleanly on SIGTERM.
            command = [
                python,
                "-m",
                "cProfile",
                "-o",
                args.profile,
                "-m",
                "outrider.webhook.cli",
                *command[1:],
            ]
        sidecar = subprocess.Popen(command, env=env, stdout=log, stderr=log)  # noqa: ASYNC220 - start-up, once
        stack.callback(_stop, sidecar)
        await wait_http(f"http://127.0.0.1:{admin}/readyz", expect=200)
        await wait_http(f"http://127.0.0.1:{mcp_port}/mcp")

        token = idp.mint("alice", audience=RESOURCE, expires_in=3600)
        direct_url = f"http://127.0.0.1:{mcp_port}/mcp"
        proxy_url = f"http://127.0.0.1:{port}/mcp"
        proxy_headers = {**HEADERS, "Authorization": f"Bearer {token}"}
        # Warm both paths (first exchange, JWT-SVID fetch, imports), then read idle RSS.
        await paced(direct_url, HEADERS, 50, 1, Phase())
        await paced(proxy_url, proxy_headers, 50, 1, Phase())
        await asyncio.sleep(1)
        rss_idle = rss_mb(sidecar.pid)
        anon_idle = rss_mb(sidecar.pid, "RssAnon")

        direct, proxied = Phase(), Phase()
        peak = rss_idle
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, rss_mb(sidecar.pid))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        slice_s = args.seconds / args.rounds
        load_before = os.getloadavg()[0]
        sidecar_cpu = 0.0
        for _ in range(args.rounds):
            await paced(direct_url, HEADERS, args.rate, slice_s, direct)
            cpu0 = cpu_seconds(sidecar.pid)
            await paced(proxy_url, proxy_headers, args.rate, slice_s, proxied)
            sidecar_cpu += cpu_seconds(sidecar.pid) - cpu0
        load_after = os.getloadavg()[0]
        sampling = False
        await sampler
        max_direct = await closed_loop(direct_url, HEADERS, args.concurrency, args.max_seconds)
        max_proxy = await closed_loop(proxy_url, proxy_headers, args.concurrency, args.max_seconds)
        rss_after = rss_mb(sidecar.pid)
        exchanges = idp.stats.exchange_requests
        if sidecar.poll() is not None:
            raise RuntimeError(f"the sidecar exited: see {tmp / 'sidecar.log'}")

    def summary(phase: Phase) -> dict[str, Any]:
        values = phase.latencies_ms
        return {
            "n": len(values),
            "errors": phase.errors,
            "error_kinds": phase.error_kinds,
            "rate": round(phase.rate, 1),
            "p50_ms": round(percentile(values, 50), 3),
            "p90_ms": round(percentile(values, 90), 3),
            "p99_ms": round(percentile(values, 99), 3),
            "mean_ms": round(statistics.fmean(values), 3) if values else float("nan"),
        }

    d, p = summary(direct), summary(proxied)
    return {
        "telemetry": telemetry,
        "rate_target": args.rate,
        "direct": d,
        "sidecar": p,
        "p50_added_ms": round(p["p50_ms"] - d["p50_ms"], 3),
        "p99_added_ms": round(p["p99_ms"] - d["p99_ms"], 3),
        "p50_ratio": round(p["p50_ms"] / d["p50_ms"], 2) if d["p50_ms"] else None,
        "max_rps_direct": round(max_direct, 1),
        "max_rps_sidecar": round(max_proxy, 1),
        "rss_idle_mb": round(rss_idle, 1),
        "rss_anon_idle_mb": round(anon_idle, 1),
        "rss_load_peak_mb": round(peak, 1),
        "rss_after_mb": round(rss_after, 1),
        "idp_exchange_requests": exchanges,
        "sidecar_cpu_ms_per_call": round(1000 * sidecar_cpu / max(1, p["n"] + p["errors"]), 3),
        "loadavg_1m": [round(load_before, 2), round(load_after, 2)],
        "cpus": os.cpu_count(),
        "otlp_requests": sum(otlp_counts.values()),
    }


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def render(result: dict[str, Any]) -> str:
    d, p = result["direct"], result["sidecar"]

    def mark(key: str) -> str:
        return "ok" if result[key] <= TARGETS[key] else "MISSED"

    return "\n".join(
        [
            f"== tools/call at {result['rate_target']:g} req/s, telemetry {result['telemetry']} ==",
            f"direct : p50 {d['p50_ms']:.3f} ms  p90 {d['p90_ms']:.3f}  p99 {d['p99_ms']:.3f}  "
            f"{d['rate']:.0f} req/s  n={d['n']} errors={d['errors']} {d['error_kinds'] or ''}",
            f"sidecar: p50 {p['p50_ms']:.3f} ms  p90 {p['p90_ms']:.3f}  p99 {p['p99_ms']:.3f}  "
            f"{p['rate']:.0f} req/s  n={p['n']} errors={p['errors']} {p['error_kinds'] or ''}",
            f"added  : p50 {result['p50_added_ms']:+.3f} ms (target <= 1, {mark('p50_added_ms')})  "
            f"p99 {result['p99_added_ms']:+.3f} ms (target <= 3, {mark('p99_added_ms')})  "
            f"p50 ratio x{result['p50_ratio']}",
            f"max    : direct {result['max_rps_direct']:.0f} req/s, "
            f"sidecar {result['max_rps_sidecar']:.0f} req/s",
            f"RSS    : idle {result['rss_idle_mb']:.1f} MB (target <= 60, {mark('rss_idle_mb')}), "
            f"of which anon {result['rss_anon_idle_mb']:.1f} MB; "
            f"peak under load {result['rss_load_peak_mb']:.1f} MB, after {result['rss_after_mb']:.1f} MB",
            f"CPU    : sidecar {result['sidecar_cpu_ms_per_call']:.3f} ms CPU per proxied call",
            f"IdP    : {result['idp_exchange_requests']} token-exchange request(s) for the whole run (cache)",
            f"machine: {result['cpus']} CPUs, "
            f"1-min load {result['loadavg_1m'][0]} -> {result['loadavg_1m'][1]}"
            + (
                "  (WARNING: the direct path did not sustain the target rate; latencies are queueing)"
                if d["rate"] < 0.95 * result["rate_target"]
                else ""
            ),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rate", type=float, default=300.0, help="steady request rate per phase (default 300)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="paced seconds per path (default 20)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating direct/sidecar slices (default 4)")
    parser.add_argument("--concurrency", type=int, default=16, help="callers for the max-throughput phase")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="seconds of the max-throughput phase")
    parser.add_argument("--telemetry", choices=("on", "off", "both"), default="off")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--profile", metavar="FILE", help="run the sidecar under cProfile, stats to FILE")
    args = parser.parse_args()
    modes = ("off", "on") if args.telemetry == "both" else (args.telemetry,)
    results = [asyncio.run(run_one(args, mode)) for mode in modes]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    else:
        print("\n\n".join(render(r) for r in results))
        if len(results) == 2:
            off, on = results
            print(
                f"\ntelemetry overhead: p50 {on['sidecar']['p50_ms'] - off['sidecar']['p50_ms']:+.3f} ms, "
                f"p99 {on['sidecar']['p99_ms'] - off['sidecar']['p99_ms']:+.3f} ms, "
                f"RSS idle {on['rss_idle_mb'] - off['rss_idle_mb']:+.1f} MB"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
