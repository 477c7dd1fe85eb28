"""`make bench-memory`: what the sidecar holds in memory, idle and after many users and sessions.

One run, every process its own: the trivial aiohttp JSON-RPC upstream (`stand_ins.py upstream`), the
dev Workload API and dev IdP, and `outrider sidecar` in two configurations (telemetry and audit off;
telemetry + audit on, exporting OTLP/HTTP to a counting receiver). For each:

1. idle RSS (and PSS, the pod's fair share of shared pages) after a warm-up call, and which heavy
   native libraries the process mapped (grpcio's core, cedarpy, the OTLP protobufs, ...);
2. `--sessions` MCP sessions opened by `--users` distinct callers (each `initialize` is bound to its
   caller), then `--calls` `tools/call`s spread over those users and sessions (each user's first call
   is a token exchange, cached afterwards): RSS after, and the growth over idle.

The baseline of the same run is a bare interpreter with aiohttp imported and one server listening
(`stand_ins.py floor`, idle): what any aiohttp process of this stack costs. Prints the load average
and the CPU each sidecar used to reach idle beside the figures; `--json` for machines. Never fails
on a figure. `--pythonpath` runs another tree's sidecar (the "before" of a comparison);
`--cold-bytecode` runs the sidecars with no cached bytecode at all (a base image without `.pyc`
files); run it with another virtualenv's Python to measure that virtualenv (docs/capacity.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_proxy as bp  # noqa: E402

from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles  # noqa: E402
from outrider.sidecar.dev.workload_api import DevWorkloadApi  # noqa: E402

STAND_INS = str(ROOT / "bench" / "stand_ins.py")
TARGETS = {"idle_off_mb": 50.0, "idle_on_mb": 55.0, "growth_mb": 25.0}
# Native libraries worth naming when a process maps them: name in /proc/PID/maps -> what it is.
LIBRARIES = {
    "cygrpc": "grpcio",
    "cedarpy": "cedarpy",
    "_upb": "protobuf",
    "_rust.abi3": "cryptography",
    "orjson": "orjson",
    "_http_parser": "aiohttp",
    "redis": "redis",
}


def status_mb(pid: int, field: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else float("nan")


def pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mapped(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({name for key, name in LIBRARIES.items() if key in maps})


def mapped_packages(pid: int) -> list[str]:
    """Top-level site-packages whose native modules the process mapped (a proxy for what it imported)."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        hit = re.search(r"site-packages/([A-Za-z0-9_]+)", line)
        if hit:
            found.add(hit.group(1))
    return sorted(found)


async def wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"port {port} did not open within {timeout_s}s")


def rpc(method: str, i: int, params: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": method, "params": params}).encode()


INIT_PARAMS = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench"}}
HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


async def load(url: str, tokens: list[str], sessions: int, calls: int, concurrency: int) -> dict[str, int]:
    """`sessions` initializes (round robin over users), then `calls` tools/calls in those sessions."""
    out = {"sessions": 0, "calls_ok": 0, "errors": 0}
    owned: list[tuple[str, str]] = []  # (token, session id)
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def initialize(i: int) -> None:
            token = tokens[i % len(tokens)]
            headers = {**HEADERS, "Authorization": f"Bearer {token}"}
            async with http.post(url, data=rpc("initialize", i, INIT_PARAMS), headers=headers) as response:
                await response.read()
                sid = response.headers.get("Mcp-Session-Id")
                if response.status == 200 and sid:
                    owned.append((token, sid))
                    out["sessions"] += 1
                else:
                    out["errors"] += 1

        async def worker() -> None:
            while True:
                kind, i = await queue.get()
                try:
                    if kind == "init":
                        await initialize(i)
                    else:
                        token, sid = owned[i % len(owned)]
                        headers = {**HEADERS, "Authorization": f"Bearer {token}", "Mcp-Session-Id": sid}
                        body = rpc("tools/call", i, {"name": "echo", "arguments": {"text": f"u{i}"}})
                        async with http.post(url, data=body, headers=headers) as response:
                            payload = await response.read()
                            ok = response.status == 200 and b'"result"' in payload
                            out["calls_ok" if ok else "errors"] += 1
                except aiohttp.ClientError:
                    out["errors"] += 1
                finally:
                    queue.task_done()

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        for i in range(sessions):
            queue.put_nowait(("init", i))
        await queue.join()
        if owned:
            for i in range(calls):
                queue.put_nowait(("call", i))
            await queue.join()
        for task in workers:
            task.cancel()
    return out


def sidecar_env(
    *,
    api: DevWorkloadApi,
    idp: DevIdP,
    upstream: int,
    port: int,
    admin: int,
    on: bool,
    tmp: Path,
    otlp: int,
    pythonpath: str | None = None,
    cold_bytecode: bool = False,
) -> dict[str, str]:
    config = {
        "admin": {"host": "127.0.0.1", "port": admin},
        **idp.sidecar_config(
            workload_socket=api.target,
            port=port,
            mcp_port=upstream,
            resource=bp.RESOURCE,
            audience=bp.DOWNSTREAM,
        ),
        "egress": {"mode": "explicit", "port": bp.free_port(), "policy_file": None},
        "telemetry": {"audit": str(tmp / "audit.jsonl") if on else "off"},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath  # another tree's sidecar (e.g. an export of main: the "before")
    if cold_bytecode:
        # No cached bytecode anywhere (how a base image without .pyc files runs): every module,
        # the standard library's included, is compiled from source at start-up.
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "empty-pycache")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(
        {
            "OUTRIDER_CONFIG": json.dumps(config),
            "OUTRIDER_POD_NAME": "bench-0",
            "OUTRIDER_POD_NAMESPACE": "bench",
        }
    )
    if on:
        env.update(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_METRIC_EXPORT_INTERVAL": "5000",
            }
        )
    else:
        env.update({"OTEL_SDK_DISABLED": "true"})
    return env


async def start(command: list[str], log: Path, stack: AsyncExitStack, **kw: Any) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    process = subprocess.Popen(command, stdout=out, stderr=out, **kw)  # noqa: ASYNC220 - start-up only
    stack.callback(bp._stop, process)
    return process


async def one(
    args: argparse.Namespace, on: bool, stack: AsyncExitStack, ctx: dict[str, Any]
) -> dict[str, Any]:
    tmp: Path = ctx["tmp"]
    name = "on" if on else "off"
    port, admin = bp.free_port(), bp.free_port()
    env = sidecar_env(
        api=ctx["api"],
        idp=ctx["idp"],
        upstream=ctx["upstream"],
        port=port,
        admin=admin,
        on=on,
        tmp=tmp,
        otlp=ctx["otlp"],
        pythonpath=args.pythonpath,
        cold_bytecode=args.cold_bytecode,
    )
    outrider = str(Path(sys.executable).with_name("outrider"))
    async with AsyncExitStack() as inner:
        sidecar = await start(
            [outrider, "sidecar", "--log-level", "WARNING"], tmp / f"sidecar-{name}.log", inner, env=env
        )
        await bp.wait_http(f"http://127.0.0.1:{admin}/readyz", expect=200)
        url = f"http://127.0.0.1:{port}/mcp"
        warm = await load(url, ctx["tokens"][:1], 1, 5, 1)
        await asyncio.sleep(1.0)
        idle = status_mb(sidecar.pid, "VmRSS")
        result: dict[str, Any] = {
            "config": name,
            "idle_rss_mb": round(idle, 1),
            "idle_anon_mb": round(status_mb(sidecar.pid, "RssAnon"), 1),
            "idle_pss_mb": round(pss_mb(sidecar.pid), 1),
            "startup_cpu_s": round(cpu_s(sidecar.pid), 2),
            "native": mapped(sidecar.pid),
            "packages": mapped_packages(sidecar.pid),
            "warm_errors": warm["errors"],
            "load_idle": round(os.getloadavg()[0], 2),
        }
        t0 = time.perf_counter()
        done = await load(url, ctx["tokens"], args.sessions, args.calls, args.concurrency)
        await asyncio.sleep(1.0)
        after = status_mb(sidecar.pid, "VmRSS")
        result.update(
            {
                **done,
                "load_s": round(time.perf_counter() - t0, 1),
                "after_rss_mb": round(after, 1),
                "growth_mb": round(after - idle, 1),
                "peak_rss_mb": round(status_mb(sidecar.pid, "VmHWM"), 1),
                "load_after": round(os.getloadavg()[0], 2),
            }
        )
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = bp.scratch_dir("outrider-bench-memory-")
    python = sys.executable
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
        upstream, floor, otlp = bp.free_port(), bp.free_port(), bp.free_port()
        await start([python, STAND_INS, "upstream", "--port", str(upstream)], tmp / "upstream.log", stack)
        floor_proc = await start(
            [python, STAND_INS, "floor", "--port", str(floor), "--upstream", f"http://127.0.0.1:{upstream}"],
            tmp / "floor.log",
            stack,
        )
        await start([python, STAND_INS, "otlp", "--port", str(otlp)], tmp / "otlp.log", stack)
        for p in (upstream, floor, otlp):
            await wait_port(p)
        tokens = [idp.mint(f"user-{u}", audience=bp.RESOURCE, expires_in=3600) for u in range(args.users)]
        ctx = {"tmp": tmp, "api": api, "idp": idp, "upstream": upstream, "otlp": otlp, "tokens": tokens}
        await load(f"http://127.0.0.1:{floor}/mcp", tokens[:1], 1, 5, 1)
        floor_rss = status_mb(floor_proc.pid, "VmRSS")
        rows = [await one(args, False, stack, ctx), await one(args, True, stack, ctx)]
    return {"floor_idle_rss_mb": round(floor_rss, 1), "rows": rows, "load_end": os.getloadavg()}


def render(result: dict[str, Any]) -> str:
    floor = result["floor_idle_rss_mb"]
    lines = [f"baseline: aiohttp pass-through proxy (same run), idle RSS {floor:.1f} MB"]
    for row in result["rows"]:
        target = TARGETS["idle_on_mb" if row["config"] == "on" else "idle_off_mb"]
        idle = row["idle_rss_mb"]
        lines += [
            f"telemetry+audit {row['config']:3s}: idle RSS {idle:.1f} MB (target <= {target:.0f}; "
            f"{idle / floor:.2f}x the floor), anon {row['idle_anon_mb']:.1f}, "
            f"PSS {row['idle_pss_mb']:.1f}; CPU to idle {row['startup_cpu_s']:.2f} s"
            f"  [load {row['load_idle']}]",
            f"    native libraries mapped: {', '.join(row['native']) or '-'}",
            f"    after {row['sessions']} sessions, {row['calls_ok']} calls ({row['errors']} errors) "
            f"in {row['load_s']} s: RSS {row['after_rss_mb']:.1f} MB (+{row['growth_mb']:.1f} over idle, "
            f"target <= +{TARGETS['growth_mb']:.0f}), peak {row['peak_rss_mb']:.1f}"
            f"  [load {row['load_after']}]",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--pythonpath", help="run the sidecars from another tree (PYTHONPATH), e.g. an export of main"
    )
    parser.add_argument(
        "--cold-bytecode",
        action="store_true",
        help="run the sidecars with no cached bytecode (a base image without .pyc files)",
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
