"""`make bench-capacity`: how the sidecar's cost grows with work, against its own floor, one run.

Every process its own: the trivial aiohttp JSON-RPC upstream (`stand_ins.py upstream`), a minimal
aiohttp pass-through proxy in front of it (`stand_ins.py floor`: what any Python proxy of this stack
costs), and two `outrider sidecar`s (caller JWT validated, token exchange cached): telemetry off, and
telemetry + audit on (OTLP/HTTP to a counting receiver, audit file). Four parts:

1. latency against offered rate: paced `tools/call` at each `--rates` step for direct, floor,
   sidecar and sidecar with telemetry, until a path saturates (it delivers under 90 % of the offered
   rate, or errors): p50/p99 per step;
2. capacity on one core: the floor and the telemetry-on sidecar each pinned to one CPU (`taskset`,
   the load generator, the upstream, the OTLP receivers and the servers not under test on the
   other, once those are quiet), closed loop; then both paced at half the sidecar's maximum:
   requests/s and p99 against the floor's (run first after the RSS curve: servers that went through
   the latency curves' overload steps keep a grown heap and cost more per request afterwards);
3. RSS against open MCP sessions, each with an open SSE stream (`--streams`: 10, 100, 1,000, 5,000)
   through the telemetry-off sidecar;
4. accounting: after the telemetry-on sidecar stopped (flushing), the receiver must hold two spans
   (server + token exchange) per call it was sent, and the audit file one `mcp.call` line per call.

Writes `docs/capacity-latency.png` and `docs/capacity-rss.png` when matplotlib is importable
(`make bench` installs it; it is not a runtime dependency). Prints the load average beside every
part; `--json` for machines. Never fails on a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_memory as bm  # noqa: E402
import bench_proxy as bp  # noqa: E402

from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles  # noqa: E402
from outrider.sidecar.dev.workload_api import DevWorkloadApi  # noqa: E402

STAND_INS = str(ROOT / "bench" / "stand_ins.py")
DOCS = ROOT / "docs"
TARGETS = {"capacity": 0.6, "p99_vs_floor": 2.0}
PATHS = ("direct", "floor", "sidecar", "sidecar+telemetry")
SENT: dict[str, int] = {}
UVLOOP_SIDECAR = (
    "import sys, uvloop; uvloop.install(); sys.argv[0] = 'outrider'; "
    "from outrider.webhook.cli import main; sys.exit(main())"
)  # calls sent, by URL: what the accounting expects


@dataclass
class Phase:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    sent: int = 0
    elapsed_s: float = 0.0

    def stats(self) -> dict[str, Any]:
        v = sorted(self.latencies_ms)

        def q(p: float) -> float:
            return round(v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))], 3) if v else float("nan")

        rate = len(v) / self.elapsed_s if self.elapsed_s else 0.0
        return {"n": len(v), "errors": self.errors, "rate": round(rate, 1), "p50_ms": q(50), "p99_ms": q(99)}


def body(i: int) -> bytes:
    call = {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
    return json.dumps(call).encode()


async def call(http: aiohttp.ClientSession, url: str, headers: dict[str, str], i: int, phase: Phase) -> None:
    phase.sent += 1
    SENT[url] = SENT.get(url, 0) + 1
    started = time.perf_counter()
    try:
        async with http.post(url, data=body(i), headers=headers) as response:
            payload = await response.read()
            ok = response.status == 200 and b'"result"' in payload
    except (aiohttp.ClientError, TimeoutError):
        ok = False
    if ok:
        phase.latencies_ms.append((time.perf_counter() - started) * 1000)
    else:
        phase.errors += 1


async def paced(url: str, headers: dict[str, str], rate: float, seconds: float) -> Phase:
    """Open loop: call i starts at t0 + i/rate whether or not earlier ones finished."""
    phase = Phase()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024), timeout=timeout) as http:
        await call(http, url, headers, -1, Phase())  # a keep-alive connection first
        tasks = []
        t0 = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(call(http, url, headers, i, phase)))
        await asyncio.gather(*tasks)
        phase.elapsed_s = time.perf_counter() - t0
    return phase


async def closed_loop(url: str, headers: dict[str, str], concurrency: int, seconds: float) -> float:
    phase = Phase()
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                await call(http, url, headers, w * 1_000_000 + i, phase)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return len(phase.latencies_ms) / (time.perf_counter() - t0)


def thread_counters(pid: int) -> dict[str, list[float]]:
    """Per thread (`main`, else its id: Python does not name OS threads): CPU seconds, voluntary and
    involuntary context switches (/proc/PID/task)."""
    out: dict[str, list[float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if task.name == str(pid) else f"t{task.name}"
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(
                line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line
            )
        except OSError:
            continue
        row = out.setdefault(name, [0.0, 0.0, 0.0])
        row[0] += (int(fields[11]) + int(fields[12])) / tick
        row[1] += int(status["voluntary_ctxt_switches"])
        row[2] += int(status["nonvoluntary_ctxt_switches"])
    return out


def load() -> float:
    return round(os.getloadavg()[0], 2)


def pin(pid: int, cpu: int | str) -> None:
    """Every thread of a process onto one CPU (or a `taskset` CPU list)."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=False, capture_output=True)


# The others count as quiet once they use under this share of a CPU together (a telemetry sidecar
# that just ran a closed loop exports and writes its backlog for a few seconds afterwards).
QUIET_SHARE = 0.05
SETTLE_MAX_S = 15.0


async def isolate(path: str, pids: dict[str, int], server_cpu: int, client_cpus: str) -> float:
    """Only `path`'s process on the server's CPU, every other process (the other servers, the OTLP
    receivers) on the load generator's; then wait until those others are quiet, so that no backlog
    of a path measured before runs beside this one. Returns the seconds waited."""
    for name, pid in pids.items():
        pin(pid, server_cpu if name == path else client_cpus)
    others = [pid for name, pid in pids.items() if name not in (path, "upstream")]
    loop = asyncio.get_running_loop()
    started = loop.time()
    while loop.time() - started < SETTLE_MAX_S:
        before = sum(bp.cpu_seconds(pid) for pid in others)
        await asyncio.sleep(0.5)
        if sum(bp.cpu_seconds(pid) for pid in others) - before < QUIET_SHARE * 0.5:
            break
    return round(loop.time() - started, 1)


def raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))


async def latency_curves(
    args: argparse.Namespace, urls: dict[str, tuple[str, dict[str, str]]]
) -> dict[str, Any]:
    curves: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
    saturated: set[str] = set()
    for rate in args.rates:
        for path in PATHS:  # interleaved: every path sees the same minute of the machine
            if path in saturated:
                continue
            url, headers = urls[path]
            stats = (await paced(url, headers, rate, args.seconds)).stats()
            stats.update({"offered": rate, "load": load()})
            curves[path].append(stats)
            if stats["rate"] < 0.9 * rate or stats["errors"]:
                saturated.add(path)
        if len(saturated) == len(PATHS):
            break
    return curves


def capacity_paths(args: argparse.Namespace) -> tuple[str, ...]:
    loops = ("", "/uvloop") if args.uvloop else ("",)
    paths = tuple(f"{path}{loop}" for loop in loops for path in ("floor", "sidecar", "sidecar+telemetry"))
    return paths + (("sidecar@before", "sidecar+telemetry@before") if args.before else ())


async def profiled(path: str, pid: int, args: argparse.Namespace) -> subprocess.Popen[bytes] | None:
    """py-spy (when `--profile DIR` and it is installed) sampling `pid` for the closed loop's length."""
    if not args.profile:
        return None
    spy = Path(sys.executable).with_name("py-spy")
    out = Path(args.profile) / f"{path.replace('/', '-')}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [str(spy), "record", "--pid", str(pid), "--duration", str(int(args.capacity_seconds))]
    command += ["--format", "raw", "--rate", "200", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220


async def capacity(
    args: argparse.Namespace, urls: dict[str, tuple[str, dict[str, str]]], pids: dict[str, int]
) -> dict[str, Any]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"skipped": "one CPU only: the server under test and the load generator would share it"}
    server_cpu, client_cpus = cores[-1], set(cores[:-1])
    os.sched_setaffinity(0, client_cpus)
    pin(pids["upstream"], min(client_cpus))
    clients = ",".join(str(c) for c in sorted(client_cpus))
    out: dict[str, Any] = {"cpu": server_cpu, "load_start": load()}
    settled: list[float] = []
    paths = capacity_paths(args)
    try:
        maxima, busy = {}, {}
        per_thread: dict[str, dict[str, list[list[float]]]] = {}
        for _ in range(args.capacity_rounds):  # rounds interleave the paths over the machine's minutes
            for path in paths:
                settled.append(await isolate(path, pids, server_cpu, clients))
                url, headers = urls[path]
                spy = await profiled(path, pids[path], args)
                threads0 = thread_counters(pids[path]) if args.threads else {}
                cpu0, t0 = bp.cpu_seconds(pids[path]), time.perf_counter()
                rate = await closed_loop(url, headers, args.concurrency, args.capacity_seconds)
                if args.threads:
                    requests = rate * (time.perf_counter() - t0)
                    for name, row in thread_counters(pids[path]).items():
                        before = threads0.get(name, [0.0, 0.0, 0.0])
                        per = [(a - b) / requests for a, b in zip(row, before, strict=True)]
                        per_thread.setdefault(path, {}).setdefault(name, []).append(
                            [round(per[0] * 1e6, 1), round(per[1], 3), round(per[2], 3)]
                        )
                # Under ~90 %: the load generator and upstream (the other CPU) were the limit.
                used = (bp.cpu_seconds(pids[path]) - cpu0) / (time.perf_counter() - t0)
                if spy is not None:
                    await asyncio.to_thread(spy.wait)
                maxima.setdefault(path, []).append(round(rate, 1))
                busy.setdefault(path, []).append(round(used, 2))
        # CPU per request of each server (its one-core ceiling when the load generator is the limit):
        # the median over the rounds.
        per_request = {
            p: sorted(b / m for b, m in zip(busy[p], maxima[p], strict=True) if m)[len(maxima[p]) // 2]
            for p in paths
        }
        best = {p: max(v) for p, v in maxima.items()}
        half = best["sidecar+telemetry"] / 2
        at_half: dict[str, Any] = {}
        half_paths = [p for p in paths if p.startswith(("floor", "sidecar+telemetry"))]
        for path in half_paths:
            settled.append(await isolate(path, pids, server_cpu, clients))
            url, headers = urls[path]
            at_half[path] = (await paced(url, headers, half, args.seconds)).stats()
        floor_p99, side_p99 = at_half["floor"]["p99_ms"], at_half["sidecar+telemetry"]["p99_ms"]
        ratios = {
            f"{p} vs {base}": round(per_request[base] / per_request[p], 3)
            for p in paths
            if not p.startswith("floor")
            for base in ("floor", "floor/uvloop")
            if base in per_request and per_request[p]
        }
        out.update(
            {
                "cpu_ms_per_request": {p: round(v * 1000, 3) for p, v in per_request.items()},
                "cpu_bound_ratios": ratios,
                "cpu_bound_ratio": ratios.get("sidecar+telemetry vs floor"),
                "max_rps": best,
                "max_rps_rounds": maxima,
                "server_cpu_busy": busy,
                "capacity_ratio": round(best["sidecar+telemetry"] / best["floor"], 3),
                "half_rate": round(half, 1),
                "at_half": at_half,
                "p99_ratio_at_half": round(side_p99 / floor_p99, 2) if floor_p99 else None,
                "settle_s": settled,
                "load_end": load(),
            }
        )
        if args.threads:
            out["per_thread"] = per_thread
    finally:
        for pid in pids.values():
            pin(pid, ",".join(str(c) for c in cores))
        os.sched_setaffinity(0, set(cores))
    return out


async def rss_curve(args: argparse.Namespace, url: str, token: str, pid: int) -> list[dict[str, Any]]:
    """Open sessions, each holding one SSE stream, up to each step; RSS at every step."""
    points = [{"streams": 0, "rss_mb": round(bm.status_mb(pid, "VmRSS"), 1), "load": load()}]
    headers = {**bm.HEADERS, "Authorization": f"Bearer {token}"}
    held: list[aiohttp.ClientResponse] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    failures = 0
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as http:
        semaphore = asyncio.Semaphore(64)

        async def open_one(i: int) -> aiohttp.ClientResponse | None:
            nonlocal failures
            opened = await try_open(i)
            if opened is None:
                failures += 1
            return opened

        async def try_open(i: int) -> aiohttp.ClientResponse | None:
            async with semaphore:
                if failures >= 20:  # the sidecar stopped taking streams: measure, do not wait on it
                    return None
                try:
                    async with http.post(
                        url, data=bm.rpc("initialize", i, bm.INIT_PARAMS), headers=headers
                    ) as r:
                        await r.read()
                        sid = r.headers.get("Mcp-Session-Id")
                    if not sid:
                        return None
                    stream_headers = {**headers, "Accept": "text/event-stream", "Mcp-Session-Id": sid}
                    held_open = aiohttp.ClientTimeout(total=None, connect=10)  # the stream lives on
                    response = await http.get(url, headers=stream_headers, timeout=held_open)
                    if response.status != 200:
                        response.release()
                        return None
                    async with asyncio.timeout(10):
                        await response.content.readline()  # the stream is open end to end
                    return response
                except (aiohttp.ClientError, TimeoutError):
                    return None

        try:
            for step in args.streams:
                opened = await asyncio.gather(*(open_one(len(held) + i) for i in range(step - len(held))))
                held.extend(r for r in opened if r is not None)
                await asyncio.sleep(1.0)
                points.append(
                    {
                        "streams": len(held),
                        "wanted": step,
                        "rss_mb": round(bm.status_mb(pid, "VmRSS"), 1),
                        "load": load(),
                    }
                )
                if len(held) < step:
                    break  # a limit (file descriptors, the machine): say so instead of going on
        finally:
            for response in held:
                response.close()
    return points


def plot(result: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[str] = []
    if not result["latency"]:
        return written
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for path, points in result["latency"].items():
        offered = [p["offered"] for p in points]
        line = ax.plot(offered, [p["p50_ms"] for p in points], marker="o", label=f"{path} p50")[0]
        ax.plot(
            offered,
            [p["p99_ms"] for p in points],
            marker="x",
            ls="--",
            color=line.get_color(),
            label=f"{path} p99",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["rates"], [f"{r:g}" for r in result["rates"]])
    ax.set_yscale("log")
    ax.set_xlabel("offered tools/call rate (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"Latency against offered rate (load {result['load_start']:.1f} at start)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    target = DOCS / "capacity-latency.png"
    fig.savefig(target, dpi=110)
    written.append(str(target.relative_to(ROOT)))
    plt.close(fig)
    rss = result["rss"]
    if len(rss) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot([max(1, p["streams"]) for p in rss], [p["rss_mb"] for p in rss], marker="o", label="sidecar")
        ax.axhline(result["floor_idle_rss_mb"], color="grey", ls=":", label="floor proxy, idle")
        ax.set_xscale("log")
        ax.set_xlabel("open MCP sessions, each with an SSE stream")
        ax.set_ylabel("RSS (MB)")
        ax.set_title("Sidecar RSS against open sessions and streams (telemetry off)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        target = DOCS / "capacity-rss.png"
        fig.savefig(target, dpi=110)
        written.append(str(target.relative_to(ROOT)))
        plt.close(fig)
    return written


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """One benchmark run in a scratch directory (sockets, logs, the audit file: ~100 MB), removed
    afterwards unless `--keep-logs`; kept, and named, when the run fails."""
    tmp = Path(tempfile.mkdtemp(prefix="outrider-bench-capacity-"))
    try:
        result = await _run(args, tmp)
    except BaseException:
        print(f"[bench] the run failed; its logs are kept in {tmp}", file=sys.stderr)
        raise
    if args.keep_logs or os.environ.get("OUTRIDER_BENCH_KEEP_LOGS") == "1":
        print(f"[bench] logs kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


async def _run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    raise_fd_limit(4 * max(args.streams) + 1024)
    python = sys.executable
    outrider = str(Path(python).with_name("outrider"))
    result: dict[str, Any] = {"load_start": load(), "rates": args.rates}
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
        upstream_port, floor_port, otlp_port = bp.free_port(), bp.free_port(), bp.free_port()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        procs["upstream"] = await bm.start(
            [python, STAND_INS, "upstream", "--port", str(upstream_port)], tmp / "upstream.log", stack
        )
        loops = ("asyncio", "uvloop") if args.uvloop else ("asyncio",)
        urls: dict[str, tuple[str, dict[str, str]]] = {}
        floor_ports = {}
        for loop in loops:
            name = "floor" + ("/uvloop" if loop == "uvloop" else "")
            floor_ports[name] = floor_port if loop == "asyncio" else bp.free_port()
            procs[name] = await bm.start(
                [
                    python,
                    STAND_INS,
                    "floor",
                    "--port",
                    str(floor_ports[name]),
                    "--upstream",
                    f"http://127.0.0.1:{upstream_port}",
                    "--loop",
                    loop,
                ],
                tmp / f"floor-{loop}.log",
                stack,
            )
            urls[name] = (f"http://127.0.0.1:{floor_ports[name]}/mcp", bm.HEADERS)
        # One OTLP receiver per telemetry sidecar: the accounting counts what one sidecar exported.
        otlp_ports = {
            "sidecar+telemetry": otlp_port,
            "sidecar+telemetry/uvloop": bp.free_port(),
            "sidecar+telemetry@before": bp.free_port(),
        }
        receivers: dict[str, int] = {}  # their pids, kept off the server's CPU in the capacity part
        for name, receiver in otlp_ports.items():
            log_name = f"otlp-{name.replace('/', '-')}.log"
            command = [python, STAND_INS, "otlp", "--port", str(receiver)]
            receivers[f"otlp:{name}"] = (await bm.start(command, tmp / log_name, stack)).pid
        for port in (upstream_port, *otlp_ports.values(), *floor_ports.values()):
            await bm.wait_port(port)
        token = idp.mint("alice", audience=bp.RESOURCE, expires_in=3600)
        auth = {**bm.HEADERS, "Authorization": f"Bearer {token}"}
        urls["direct"] = (f"http://127.0.0.1:{upstream_port}/mcp", bm.HEADERS)
        sidecars = [("sidecar", False, "asyncio"), ("sidecar+telemetry", True, "asyncio")]
        if args.before:
            sidecars += [("sidecar@before", False, "asyncio"), ("sidecar+telemetry@before", True, "asyncio")]
        if args.uvloop:
            sidecars += [("sidecar/uvloop", False, "uvloop"), ("sidecar+telemetry/uvloop", True, "uvloop")]
        for name, on, loop in sidecars:
            port, admin = bp.free_port(), bp.free_port()
            env = bm.sidecar_env(
                api=api,
                idp=idp,
                upstream=upstream_port,
                port=port,
                admin=admin,
                on=on,
                tmp=tmp,
                otlp=otlp_ports.get(name, otlp_port),
                pythonpath=args.before if name.endswith("@before") else None,
            )
            if on:
                env["OTEL_BSP_SCHEDULE_DELAY"] = "500"
                # Each telemetry sidecar its own audit file: the accounting counts one sidecar's lines.
                env["OUTRIDER_CONFIG"] = env["OUTRIDER_CONFIG"].replace(
                    "audit.jsonl", f"audit-{name.replace('/', '-')}.jsonl"
                )
            if name == "sidecar":
                # The RSS curve holds up to 5,000 streams of one caller: lift the connection limits.
                config = json.loads(env["OUTRIDER_CONFIG"])
                config["inbound"]["upstream_max_connections"] = 2 * max(args.streams) + 100
                config["inbound"]["upstream_max_connections_per_caller"] = 0
                env["OUTRIDER_CONFIG"] = json.dumps(config)
            # uvloop is not a dependency of the sidecar: the bench installs its policy before the CLI.
            command = [outrider] if loop == "asyncio" else [python, "-c", UVLOOP_SIDECAR]
            procs[name] = await bm.start(
                [*command, "sidecar", "--log-level", "WARNING"],
                tmp / f"{name.replace('/', '-')}.log",
                stack,
                env=env,
            )
            await bp.wait_http(f"http://127.0.0.1:{admin}/readyz", expect=200)
            urls[name] = (f"http://127.0.0.1:{port}/mcp", auth)
        for path in urls:  # warm every path (first exchange, JWT-SVID, imports)
            await paced(*urls[path], 20, 1)
        await asyncio.sleep(1.0)
        result["idle_rss_mb"] = {
            name: round(bm.status_mb(p.pid, "VmRSS"), 1) for name, p in procs.items() if name != "upstream"
        }
        result["floor_idle_rss_mb"] = result["idle_rss_mb"]["floor"]
        # Streams first, on a sidecar that has not yet been through the overload steps (whose queues
        # leave a grown heap behind); they are closed again before the latency curves.
        result["rss"] = (
            await rss_curve(args, urls["sidecar"][0], token, procs["sidecar"].pid)
            if "rss" in args.parts
            else []
        )
        # Capacity before the latency curves, for the same reason: a server that went through their
        # overload steps keeps a grown heap and spent 10-15 us more per request afterwards, while the
        # `--before` sidecars (not in the curves) did not, which biased the comparison against `main`.
        pids = {**{name: p.pid for name, p in procs.items()}, **receivers}
        result["capacity"] = (
            await capacity(args, urls, pids) if "capacity" in args.parts else {"skipped": "not asked for"}
        )
        result["latency"] = await latency_curves(args, urls) if "latency" in args.parts else {}
        # Accounting: what the telemetry-on sidecar was sent, against what it exported on the way out.
        on = procs["sidecar+telemetry"]
        on.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(on.wait, 30)
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{otlp_port}/counts") as r:
            counts = await r.json()
        audit = tmp / "audit-sidecar+telemetry.jsonl"
        lines = audit.read_text().splitlines() if audit.exists() else []
        sent = SENT.get(urls["sidecar+telemetry"][0], 0)
        result["accounting"] = {
            **counts,
            "calls_sent": sent,
            "spans_expected": 2 * sent,
            "audit_mcp_call_lines": sum(1 for line in lines if '"mcp.call"' in line),
        }
    result["load_end"] = load()
    result["plots"] = plot(result)
    return result


def render(r: dict[str, Any]) -> str:
    lines = [f"load average: {r['load_start']} at start, {r['load_end']} at end"]
    lines.append("latency against offered rate (p50 / p99 ms, delivered req/s) [load]:")
    for path, points in r["latency"].items():
        cells = [
            f"{p['offered']:g}: {p['p50_ms']:.2f}/{p['p99_ms']:.1f} ({p['rate']:g}) [{p['load']}]"
            for p in points
        ]
        lines.append(f"  {path:18s} " + "; ".join(cells))
    cap = r["capacity"]
    if "skipped" in cap:
        lines.append(f"capacity on one core: skipped ({cap['skipped']})")
    else:
        ratio, p99 = cap["capacity_ratio"], cap["p99_ratio_at_half"]
        maxima, half = cap["max_rps"], cap["at_half"]
        lines.append(
            f"capacity on one core (CPU {cap['cpu']}): floor {maxima['floor']} req/s, sidecar+telemetry "
            f"{maxima['sidecar+telemetry']} req/s = {ratio:.2f}x (target >= {TARGETS['capacity']}x); "
            f"its CPU busy {cap['server_cpu_busy']} [load {cap['load_start']}-{cap['load_end']}]"
        )
        lines.append(
            f"CPU per request on that core (median of {len(next(iter(cap['max_rps_rounds'].values())))} "
            f"rounds): {cap['cpu_ms_per_request']} ms"
        )
        lines.append(
            "  one-core ceiling ratios (floor's CPU per request / path's; the ratio when the core, not the "
            "load generator, is the limit): "
            + ", ".join(f"{k} {v}x" for k, v in cap["cpu_bound_ratios"].items())
        )
        lines.append(
            f"p99 at {cap['half_rate']} req/s (half the sidecar's max): "
            + ", ".join(f"{k} {v['p99_ms']} ms" for k, v in half.items())
            + f"; sidecar+telemetry/floor = {p99}x (target <= {TARGETS['p99_vs_floor']}x)"
        )
        for path, threads in cap.get("per_thread", {}).items():
            lines.append(
                f"  per thread, {path} (CPU us / voluntary / involuntary switches per request, by round): "
                + "; ".join(f"{name} {rows}" for name, rows in threads.items())
            )
    rss = ", ".join(
        f"{p['streams']}"
        + (f" (of {p['wanted']} wanted)" if p.get("wanted", 0) > p["streams"] else "")
        + f": {p['rss_mb']} MB"
        for p in r["rss"]
    )
    lines.append("idle RSS after warm-up (MB): " + ", ".join(f"{k} {v}" for k, v in r["idle_rss_mb"].items()))
    if r["rss"]:
        floor = r["floor_idle_rss_mb"]
        lines.append(f"sidecar RSS by open sessions+SSE streams: {rss} (floor idle {floor} MB)")
    a = r["accounting"]
    lines.append(
        f"accounting (sidecar+telemetry): {a['calls_sent']} calls sent; {a.get('spans')} spans received of "
        f"{a['spans_expected']} expected (server + exchange per call) in {a.get('trace_requests')} OTLP "
        f"requests; {a['audit_mcp_call_lines']} mcp.call audit lines; {a.get('metric_points')} metric points"
    )
    if r["plots"]:
        lines.append("plots: " + ", ".join(r["plots"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 200, 400, 800, 1600, 3200])
    parser.add_argument("--seconds", type=float, default=4.0, help="paced seconds per step and path")
    parser.add_argument("--capacity-seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=[10, 100, 1000, 5000])
    parser.add_argument("--capacity-rounds", type=int, default=1, help="closed-loop rounds per path")
    parser.add_argument(
        "--parts", nargs="+", choices=("latency", "capacity", "rss"), default=["latency", "capacity", "rss"]
    )
    parser.add_argument(
        "--uvloop",
        action="store_true",
        help="capacity: also the floor and both sidecars on uvloop (pip install uvloop), same run",
    )
    parser.add_argument(
        "--before",
        metavar="TREE",
        help="capacity: also both sidecars run from another tree (PYTHONPATH), e.g. an export of main",
    )
    parser.add_argument("--profile", metavar="DIR", help="capacity: py-spy raw stacks per path into DIR")
    parser.add_argument(
        "--threads",
        action="store_true",
        help="capacity: each server thread's CPU and context switches per request (/proc/PID/task)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the scratch directory (process logs, audit file); also OUTRIDER_BENCH_KEEP_LOGS=1",
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
