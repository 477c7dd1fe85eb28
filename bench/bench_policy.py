"""`make bench-policy`: what the Cedar gate and the rate limits add to a `tools/call` through the sidecar.

Same run, same MCP server (the `mcp` SDK, stateless JSON mode): one `outrider sidecar` per variant
(no policy, 10, 100 and 1,000 Cedar policies, a rate limit in memory, a rate limit in a real
`redis-server`), all authenticating and exchanging alike. Open-loop load at a steady rate, the
variants' slices interleaved round-robin so machine drift hits them alike. Prints p50/p99 per
variant and the added p50/p99 against the no-policy sidecar, plus the gate's in-process decision
time (the pure `decide()`), which is far less noisy than a socket round trip on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_proxy import (  # noqa: E402
    DOWNSTREAM,
    HEADERS,
    RESOURCE,
    SIDECAR_ID,
    Phase,
    _stop,
    free_port,
    paced,
    percentile,
    wait_http,
)

from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles  # noqa: E402
from outrider.sidecar.dev.workload_api import DevWorkloadApi  # noqa: E402

TARGETS = {"p50_100_ms": 0.2, "p50_memory_ms": 0.05, "p50_redis_ms": 0.5}
NEVER = "100000000/minute"  # a limit that is checked on every call and never reached


def policies(count: int) -> str:
    """`count` Cedar policies shaped like a real operator set: per-team tools, a few argument rules."""
    lines = [
        '@id("everyone-echo")\npermit(principal, action == Action::"call_tool", resource == Tool::"echo");'
    ]
    for i in range(1, count):
        if i % 10 == 0:
            lines.append(
                f'@id("fetch-rule-{i}")\nforbid(principal in Group::"team-{i}", '
                f'action == Action::"call_tool", resource == Tool::"fetch") unless {{ '
                f'context.arguments has url && context.arguments.url like "https://api-{i}.example.com/*" }};'
            )
        else:
            lines.append(
                f'@id("team-{i}")\npermit(principal in Group::"team-{i}", action == Action::"call_tool", '
                f'resource == Tool::"tool-{i}");'
            )
    return "\n".join(lines[:count])


def variants(redis_uri: str | None) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {
        "no policy": None,
        "10 policies": {"cedar": policies(10)},
        "100 policies": {"cedar": policies(100)},
        "1000 policies": {"cedar": policies(1000)},
        "rate limit (memory)": {"rate_limits": {"per_user_tool": NEVER}},
    }
    if redis_uri:
        out["rate limit (redis)"] = {"rate_limits": {"per_user_tool": NEVER}, "storage": redis_uri}
    return out


def decide_micro(count: int, calls: int = 3000, clock: Any = time.perf_counter) -> float:
    """Microseconds per in-process decision for one tools/call with `count` policies (0: no policy)."""
    from outrider.sidecar.inbound.jsonrpc import parse_message
    from outrider.sidecar.policy.config import LayerSource
    from outrider.sidecar.policy.engine import build, compile_layers, decide
    from outrider.sidecar.policy.model import Server
    from outrider.sidecar.telemetry.observer import Principal

    compiled, _ = compile_layers([LayerSource("bench", policies(count), False)] if count else [])
    built = build(compiled)
    server = Server.from_facts(SIDECAR_ID, None, None)
    alice = Principal("oidc", "alice", "https://idp", groups=("team-3",))
    message = parse_message(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "hi"}},
        }
    )
    for _ in range(100):
        decide(built, alice, server, [message], "stateless")
    started = clock()
    for _ in range(calls):
        decide(built, alice, server, [message], "stateless")
    return (clock() - started) / calls * 1e6


async def limit_micro(uri: str, calls: int = 2000) -> tuple[float, float]:
    """(wall, CPU) microseconds per rate-limit check of one tools/call against `uri`."""
    from outrider.sidecar.inbound.jsonrpc import parse_message
    from outrider.sidecar.policy.limits_config import RateLimits, budgets
    from outrider.sidecar.policy.ratelimit import RateLimiter, open_storage

    limiter = RateLimiter(open_storage(uri, 1.0), on_store_error="deny", timeout_s=1.0, shared=True)
    limits = RateLimits.from_mapping({"per_user_tool": NEVER}, "bench")
    message = parse_message(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
    )
    spend = budgets(limits, message, "alice", SIDECAR_ID)
    for _ in range(50):
        assert (await limiter.spend(spend)).allowed
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await limiter.spend(spend)
    return (time.perf_counter() - wall) / calls * 1e6, (time.process_time() - cpu) / calls * 1e6


def start_redis(tmp: Path) -> subprocess.Popen[bytes] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    process.port = port  # type: ignore[attr-defined]
    time.sleep(0.3)
    return process


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="outrider-bench-policy-"))
    async with AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)  # runs last: after every process below has stopped
        api = await stack.enter_async_context(DevWorkloadApi(tmp / "agent.sock", spiffe_id=SIDECAR_ID))
        idp = await stack.enter_async_context(
            DevIdP(
                clients=[ClientRegistration("bench-mcp", spiffe_ids=(SIDECAR_ID,), audiences=(DOWNSTREAM,))],
                spiffe_bundles=StaticJwtBundles({api.trust_domain: api.jwks()}),
                token_ttl=3600,
            )
        )
        redis = start_redis(tmp)
        if redis is not None:
            stack.callback(_stop, redis)
        redis_uri = f"redis://127.0.0.1:{redis.port}" if redis is not None else None  # type: ignore[attr-defined]
        mcp_port = free_port()
        python = sys.executable
        app = subprocess.Popen(  # noqa: ASYNC220 - start-up, once
            [python, "-m", "outrider.sidecar.dev.mcp_server", "--port", str(mcp_port), "--mode", "stateless"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(_stop, app)
        outrider = str(Path(python).with_name("outrider"))
        urls: dict[str, str] = {}
        for name, policy in variants(redis_uri).items():
            port, admin = free_port(), free_port()
            config = {
                "admin": {"host": "127.0.0.1", "port": admin},
                **idp.sidecar_config(
                    workload_socket=api.target,
                    port=port,
                    mcp_port=mcp_port,
                    resource=RESOURCE,
                    audience=DOWNSTREAM,
                ),
                "egress": {"mode": "explicit", "port": free_port(), "policy_file": None},
                "telemetry": {"audit": "off"},
                "policy": {"file": None, **(policy or {})},
            }
            env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
            # A file, not OUTRIDER_CONFIG: 1,000 policies exceed one environment string's limit (128 KiB).
            config_file = tmp / f"sidecar-{port}.json"
            config_file.write_text(json.dumps(config))
            env.update(
                {
                    "OTEL_SDK_DISABLED": "true",
                    "OTEL_TRACES_EXPORTER": "none",
                    "OTEL_METRICS_EXPORTER": "none",
                }
            )
            log = (tmp / f"sidecar-{port}.log").open("wb")
            process = subprocess.Popen(  # noqa: ASYNC220 - start-up, once
                [outrider, "sidecar", "--config", str(config_file), "--log-level", "WARNING"],
                env=env,
                stdout=log,
                stderr=log,
            )
            stack.callback(_stop, process)
            await wait_http(f"http://127.0.0.1:{admin}/readyz", expect=200)
            urls[name] = f"http://127.0.0.1:{port}/mcp"
        await wait_http(f"http://127.0.0.1:{mcp_port}/mcp")
        token = idp.mint("alice", audience=RESOURCE, expires_in=3600)
        headers = {**HEADERS, "Authorization": f"Bearer {token}"}
        for url in urls.values():  # warm: first exchange, imports, connections
            await paced(url, headers, 50, 1, Phase())
        phases = {name: Phase() for name in urls}
        slice_s = args.seconds / args.rounds
        for _ in range(args.rounds):
            for name, url in urls.items():
                await paced(url, headers, args.rate, slice_s, phases[name])
        limit_us = {"memory": [round(x, 1) for x in await limit_micro("memory://")]}
        if redis_uri:
            limit_us["redis"] = [round(x, 1) for x in await limit_micro(redis_uri)]

    results: dict[str, Any] = {"rate": args.rate, "variants": {}}
    base = phases["no policy"].latencies_ms
    base50, base99 = percentile(base, 50), percentile(base, 99)
    for name, phase in phases.items():
        values = phase.latencies_ms
        p50, p99 = percentile(values, 50), percentile(values, 99)
        results["variants"][name] = {
            "n": len(values),
            "errors": phase.errors,
            "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
            "p50_added_ms": round(p50 - base50, 3),
            "p99_added_ms": round(p99 - base99, 3),
        }
    results["decide_us"] = {str(n): round(decide_micro(n), 1) for n in (0, 10, 100, 1000)}
    results["decide_cpu_us"] = {
        str(n): round(decide_micro(n, clock=time.process_time), 1) for n in (0, 10, 100, 1000)
    }
    results["limit_us"] = limit_us
    results["loadavg_1m"] = round(os.getloadavg()[0], 1)
    return results


def render(result: dict[str, Any]) -> str:
    lines = [f"== tools/call through outrider sidecar at {result['rate']:g} req/s per variant =="]
    for name, v in result["variants"].items():
        lines.append(
            f"{name:20s} p50 {v['p50_ms']:7.3f} ms  p99 {v['p99_ms']:7.3f} ms  "
            f"added p50 {v['p50_added_ms']:+.3f} ms  p99 {v['p99_added_ms']:+.3f} ms  "
            f"n={v['n']} errors={v['errors']}"
        )
    d, cpu = result["decide_us"], result["decide_cpu_us"]
    lines.append(
        f"in-process decide() per tools/call, wall (CPU): no policy {d['0']} ({cpu['0']}) us, "
        f"10 {d['10']} ({cpu['10']}) us, 100 {d['100']} ({cpu['100']}) us, "
        f"1000 {d['1000']} ({cpu['1000']}) us"
    )
    for store, (wall, used) in result["limit_us"].items():
        lines.append(f"rate-limit check per tools/call, {store}: {wall} us wall, {used} us CPU")
    lines.append(f"1-minute load average at the end: {result['loadavg_1m']} (on {os.cpu_count()} CPUs)")
    v = result["variants"]
    checks = [
        ("100 policies p50 added", v["100 policies"]["p50_added_ms"], TARGETS["p50_100_ms"]),
        ("memory rate limit p50 added", v["rate limit (memory)"]["p50_added_ms"], TARGETS["p50_memory_ms"]),
    ]
    if "rate limit (redis)" in v:
        checks.append(
            ("redis rate limit p50 added", v["rate limit (redis)"]["p50_added_ms"], TARGETS["p50_redis_ms"])
        )
    for label, value, target in checks:
        lines.append(
            f"target: {label} {value:+.3f} ms <= {target} ms: {'ok' if value <= target else 'MISSED'}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rate", type=float, default=150.0, help="steady request rate per slice (default 150)"
    )
    parser.add_argument("--seconds", type=float, default=12.0, help="paced seconds per variant (default 12)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved slices per variant (default 6)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
