"""Instructions per request of a whole sidecar, per thread, under callgrind: telemetry off and on.

The bench's parts as `bench_capacity.py` starts them (the development Workload API and IdP, the
stand-in upstream and OTLP receiver), and one `outrider sidecar` at a time under
`valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no` with `PYTHONHASHSEED=0`: after
a warm-up the collection is switched on (`callgrind_control -i on`), `--requests` authenticated
`tools/call`s are sent (closed loop, `--concurrency`), and the counters are dumped per thread. The
event loop's telemetry share is its instructions per request with telemetry on minus off; the
telemetry thread and the exporters show as the other threads. Valgrind runs one thread at a time and
counts user-space instructions only: cache misses, the kernel's side of thread switches and waits for
the GIL are not in these figures (the capacity bench shows them, at the machine's noise).

    .venv/bin/python bench/callgrind_sidecar.py [--before /tmp/base] [--requests 1500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_capacity as bc  # noqa: E402
import bench_memory as bm  # noqa: E402
import bench_proxy as bp  # noqa: E402

from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles  # noqa: E402
from outrider.sidecar.dev.workload_api import DevWorkloadApi  # noqa: E402

ONS = (False, True)  # telemetry off, then on, for each tree
SIDECAR = "import sys; sys.argv[0] = 'outrider'; from outrider.webhook.cli import main; sys.exit(main())"


async def drive(url: str, headers: dict[str, str], requests: int, concurrency: int) -> int:
    ok = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        queue = iter(range(requests))

        async def worker() -> None:
            nonlocal ok
            for i in queue:
                async with http.post(url, data=bc.body(i), headers=headers) as response:
                    payload = await response.read()
                    ok += response.status == 200 and b'"result"' in payload

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=600)


def per_thread(out: Path) -> dict[int, int]:
    """Instructions by thread number (1 is the main thread: the event loop) of the last dump."""
    found: dict[int, int] = {}
    for path in out.parent.glob(out.name + "*"):
        match = re.search(r"-(\d+)$", path.name)
        if not match:
            continue
        text = path.read_text(errors="replace")
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        part = re.search(r"^part: (\d+)", text, re.M)
        if total and part and int(part.group(1)) >= 1:
            found[int(match.group(1))] = found.get(int(match.group(1)), 0) + int(total.group(1))
    return found


def _keep(out: Path, keep: Path) -> None:
    keep.mkdir(parents=True, exist_ok=True)
    for path in out.parent.glob(out.name + "*"):
        shutil.copy(path, keep / path.name)


async def one(
    name: str,
    on: bool,
    tree: Path | None,
    ctx: dict[str, Any],
    args: argparse.Namespace,
    stack: AsyncExitStack,
) -> dict[str, Any]:
    tmp: Path = ctx["tmp"]
    port, admin = bp.free_port(), bp.free_port()
    env = bm.sidecar_env(
        api=ctx["api"],
        idp=ctx["idp"],
        upstream=ctx["upstream"],
        port=port,
        admin=admin,
        on=on,
        tmp=tmp,
        otlp=ctx["otlp"],
        pythonpath=str(tree) if tree else None,
    )
    env["PYTHONHASHSEED"] = "0"
    if on:
        env["OTEL_BSP_SCHEDULE_DELAY"] = "500"
        env["OUTRIDER_CONFIG"] = env["OUTRIDER_CONFIG"].replace("audit.jsonl", f"audit-{name}.jsonl")
    out = tmp / f"callgrind-{name}.out"
    command = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-c",
        SIDECAR,
        "sidecar",
        "--log-level",
        "WARNING",
    ]
    process = await bm.start(command, tmp / f"{name}.log", stack, env=env, cwd=tmp)
    await bp.wait_http(f"http://127.0.0.1:{admin}/readyz", 600, expect=200)
    url = f"http://127.0.0.1:{port}/mcp"
    await drive(url, ctx["auth"], args.warm_up, args.concurrency)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(control, process.pid, "-i", "on")
    ok = await drive(url, ctx["auth"], args.requests, args.concurrency)
    await asyncio.sleep(1.5)  # the telemetry thread's last batch and the span exporter's post
    await asyncio.to_thread(control, process.pid, "-d")
    await asyncio.to_thread(control, process.pid, "-i", "off")
    threads = per_thread(out)
    bp._stop(process)
    if args.keep:
        await asyncio.to_thread(_keep, out, Path(args.keep))
    return {"ok": ok, "threads": {t: n / args.requests for t, n in sorted(threads.items())}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="outrider-callgrind-sidecar-"))
    result: dict[str, Any] = {}
    try:
        async with AsyncExitStack() as stack:
            api = await stack.enter_async_context(DevWorkloadApi(tmp / "agent.sock", spiffe_id=bp.SIDECAR_ID))
            idp = await stack.enter_async_context(
                DevIdP(
                    clients=[
                        ClientRegistration(
                            "bench-mcp", spiffe_ids=(bp.SIDECAR_ID,), audiences=(bp.DOWNSTREAM,)
                        )
                    ],
                    spiffe_bundles=StaticJwtBundles({api.trust_domain: api.jwks()}),
                    token_ttl=3600,
                )
            )
            upstream, otlp = bp.free_port(), bp.free_port()
            python = sys.executable
            await bm.start([python, bc.STAND_INS, "upstream", "--port", str(upstream)], tmp / "up.log", stack)
            await bm.start([python, bc.STAND_INS, "otlp", "--port", str(otlp)], tmp / "otlp.log", stack)
            for port in (upstream, otlp):
                await bm.wait_port(port)
            token = idp.mint("alice", audience=bp.RESOURCE, expires_in=3600)
            ctx = {
                "tmp": tmp,
                "api": api,
                "idp": idp,
                "upstream": upstream,
                "otlp": otlp,
                "auth": {**bm.HEADERS, "Authorization": f"Bearer {token}"},
            }
            trees: list[tuple[str, Path | None]] = [("", None)]
            if args.before:
                trees.append(("@before", Path(args.before)))
            for suffix, tree in trees:
                for on in ONS:
                    name = ("on" if on else "off") + suffix
                    result[name] = await one(name.replace("@", "-"), on, tree, ctx, args, stack)
                    print(name, json.dumps(result[name]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", help="another tree (an export) measured the same way")
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--warm-up", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--keep", metavar="DIR", help="copy the callgrind files here (callgrind_annotate)")
    args = parser.parse_args()
    args.before = str(Path(args.before).resolve()) if args.before else None
    print(f"load average {os.getloadavg()[0]:.2f}")
    result = asyncio.run(run(args))
    print("instructions per request by thread (1: the event loop), telemetry off / on:")
    for suffix in ("", "@before"):
        off, on = result.get("off" + suffix), result.get("on" + suffix)
        if off is None or on is None:
            continue
        loop_off, loop_on = off["threads"].get(1, 0.0), on["threads"].get(1, 0.0)
        others_on = sum(n for t, n in on["threads"].items() if t != 1)
        others_off = sum(n for t, n in off["threads"].items() if t != 1)
        print(
            f"  {'this tree' if not suffix else 'before'}: event loop {loop_off:,.0f} / {loop_on:,.0f} "
            f"(telemetry share {loop_on - loop_off:,.0f}); other threads {others_off:,.0f} / "
            f"{others_on:,.0f}; ok {off['ok']} / {on['ok']}"
        )
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
