"""`make bench`: run every Outrider benchmark, print one table, keep the results in docs/benchmarks.md.

Each benchmark (bench_webhook.py, bench_proxy.py, bench_egress.py) measures its figure beside a
same-run baseline and prints JSON with `--json`; this script only runs them and tabulates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Row:
    bench: str
    figure: str
    value: float | None
    unit: str
    baseline: float | None = None  # the same run's baseline, same unit
    target: str = ""
    met: bool | None = None  # None: no target (information only)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline


def _num(data: Any, *path: str) -> float | None:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, int | float) and not isinstance(data, bool) else None


def _le(value: float | None, limit: float | None) -> bool | None:
    if value is None or limit is None:
        return None
    return value <= limit


def _ge(value: float | None, limit: float | None) -> bool | None:
    if value is None or limit is None:
        return None
    return value >= limit


# --------------------------------------------------------------------------------------------------
# How each benchmark's JSON becomes rows (targets from the issues that own them)


def webhook_rows(data: Any) -> list[Row]:
    """Issue: p50 within 1.5x and p99 within 2x of a no-op aiohttp TLS handler, same run. The
    benchmark reports one scenario, or several by name (identical pods, distinct pods)."""
    if isinstance(data, list):
        data = data[0] if data else {}
    if isinstance(data, dict) and "mutate" in data:
        scenarios: dict[str, Any] = {"": data}
    else:
        scenarios = {k: v for k, v in (data or {}).items() if isinstance(v, dict) and "mutate" in v}
    rows = []
    for name, run in scenarios.items():
        label = f" ({name} pods)" if name else ""
        mutate = run.get("mutate") or {}
        floor = run.get("noop") or run.get("baseline") or {}
        for q, limit in (("p50", 1.5), ("p99", 2.0)):
            value, base = _num(mutate, f"{q}_ms"), _num(floor, f"{q}_ms")
            ratio = value / base if value is not None and base else None
            rows.append(
                Row(
                    "webhook",
                    f"/mutate {q} latency{label}",
                    value,
                    "ms",
                    base,
                    f"<= {limit}x baseline",
                    _le(ratio, limit),
                )
            )
        rows.append(
            Row("webhook", f"/mutate throughput{label}", _num(mutate, "rps"), "req/s", _num(floor, "rps"))
        )
        if "cpu_us_per_request" in mutate:  # the server's own CPU: what other load skews least
            rows.append(
                Row(
                    "webhook",
                    f"/mutate server CPU per request{label}",
                    _num(mutate, "cpu_us_per_request"),
                    "us",
                    _num(floor, "cpu_us_per_request"),
                )
            )
    return rows


def proxy_rows(data: Any) -> list[Row]:
    """Issues: p50 added <= 1 ms, p99 added <= 3 ms at 300 req/s, RSS idle <= 60 MB; telemetry on adds
    at most 20 % to the proxy's own overhead."""
    runs = data if isinstance(data, list) else [data]
    by_mode = {r.get("telemetry", "off"): r for r in runs if isinstance(r, dict)}
    rows: list[Row] = []
    for mode, r in sorted(by_mode.items()):
        label = f"telemetry {mode}"
        direct, side = r.get("direct") or {}, r.get("sidecar") or {}
        rows.append(
            Row(
                "proxy",
                f"tools/call p50 via sidecar ({label})",
                _num(side, "p50_ms"),
                "ms",
                _num(direct, "p50_ms"),
                "added <= 1 ms",
                _le(_num(r, "p50_added_ms"), 1.0),
            )
        )
        rows.append(
            Row(
                "proxy",
                f"tools/call p99 via sidecar ({label})",
                _num(side, "p99_ms"),
                "ms",
                _num(direct, "p99_ms"),
                "added <= 3 ms",
                _le(_num(r, "p99_added_ms"), 3.0),
            )
        )
        rows.append(
            Row(
                "proxy",
                f"max throughput via sidecar ({label})",
                _num(r, "max_rps_sidecar"),
                "req/s",
                _num(r, "max_rps_direct"),
            )
        )
        rows.append(
            Row(
                "proxy",
                f"sidecar RSS idle ({label})",
                _num(r, "rss_idle_mb"),
                "MB",
                None,
                "<= 60 MB",
                _le(_num(r, "rss_idle_mb"), 60.0),
            )
        )
    if "on" in by_mode and "off" in by_mode:
        off_p50, on_p50 = _num(by_mode["off"], "p50_added_ms"), _num(by_mode["on"], "p50_added_ms")
        off_p99, on_p99 = _num(by_mode["off"], "p99_added_ms"), _num(by_mode["on"], "p99_added_ms")
        for q, off, on in (("p50", off_p50, on_p50), ("p99", off_p99, on_p99)):
            limit = max(off, 0.0) * 1.2 if off is not None else None
            rows.append(
                Row(
                    "proxy",
                    f"added {q} with telemetry + audit on",
                    on,
                    "ms",
                    off,
                    "<= 1.2x added without",
                    _le(on, limit),
                )
            )
    return rows


def egress_rows(data: Any) -> list[Row]:
    """Issue: >= 50 % of direct throughput, <= 1 ms added connect time at p50. The direct baseline is
    the sidecar's own UID 15337 in the same pod namespace (not captured)."""
    runs = data.get("runs") or {}
    direct: dict[str, Any] = next((v for k, v in runs.items() if k.startswith("direct")), {})
    captured: dict[str, Any] = next((v for k, v in runs.items() if k.startswith("capture")), {})
    mbps, mbps_base = _num(captured, "throughput_mib_s"), _num(direct, "throughput_mib_s")
    rows = [
        Row(
            "egress",
            "large transfer throughput (capture)",
            mbps,
            "MiB/s",
            mbps_base,
            ">= 0.5x direct",
            _ge(mbps / mbps_base if mbps is not None and mbps_base else None, 0.5),
        )
    ]
    for key, label in (("tcp_connect", "TCP connect p50"), ("http_by_name", "HTTP by name connect p50")):
        value, base = _num(captured, f"{key}_p50_ms"), _num(direct, f"{key}_p50_ms")
        added = value - base if value is not None and base is not None else None
        rows.append(Row("egress", f"{label} (capture)", value, "ms", base, "added <= 1 ms", _le(added, 1.0)))
    # Every request on a kept-alive plaintext HTTP connection is judged (issue 11): information only.
    rows.append(
        Row(
            "egress",
            "keep-alive HTTP request p50 (capture, each judged)",
            _num(captured, "keepalive_request_p50_ms"),
            "ms",
            _num(direct, "keepalive_request_p50_ms"),
        )
    )
    rows.append(
        Row(
            "egress",
            "HTTP upload (capture)",
            _num(captured, "upload_mib_s"),
            "MiB/s",
            _num(direct, "upload_mib_s"),
        )
    )
    return rows


def policy_rows(data: Any) -> list[Row]:
    """Issue: at 100 policies p50 +0.2 ms or less; rate-limit check in memory +0.05 ms, Redis +0.5 ms.
    End to end against the no-policy sidecar of the same run, and the in-process CPU per call (steadier)."""
    variants = data.get("variants") or {}
    rows: list[Row] = []
    base = _num(variants, "no policy", "p50_ms")
    targets = {"100 policies": 0.2, "rate limit (memory)": 0.05, "rate limit (redis)": 0.5}
    for name in ("10 policies", "100 policies", "1000 policies", "rate limit (memory)", "rate limit (redis)"):
        value = _num(variants, name, "p50_ms")
        if value is None:
            continue
        limit = targets.get(name)
        added = _num(variants, name, "p50_added_ms")
        rows.append(
            Row(
                "policy",
                f"tools/call p50, {name}",
                value,
                "ms",
                base,
                f"added <= {limit} ms" if limit else "",
                _le(added, limit),
            )
        )
    for count in ("10", "100", "1000"):
        rows.append(
            Row(
                "policy", f"decide() CPU per call, {count} policies", _num(data, "decide_cpu_us", count), "us"
            )
        )
    for store in ("memory", "redis"):
        value = (data.get("limit_us") or {}).get(store)
        if value:
            rows.append(Row("policy", f"rate-limit check, {store} (wall)", float(value[0]), "us"))
    return rows


def telemetry_rows(data: Any) -> list[Row]:
    """The Observer's own per-call cost (span, metrics, audit line, OTLP export) against the NullObserver;
    `share_of_proxy` below sets it against the proxy's measured overhead (target <= 20 %)."""
    on, off = _num(data, "otel_p50_us"), _num(data, "null_p50_us")
    on99, off99 = _num(data, "otel_p99_us"), _num(data, "null_p99_us")
    return [
        Row("telemetry", "observer per call p50", on, "us", off),
        Row("telemetry", "observer per call p99", on99, "us", off99),
    ]


def share_of_proxy(rows: list[Row]) -> list[Row]:
    """The telemetry cost as a share of the proxy's own added p50 (telemetry off), when both ran."""
    proxy = next((r for r in rows if r.figure == "tools/call p50 via sidecar (telemetry off)"), None)
    observer = next((r for r in rows if r.figure == "observer per call p50"), None)
    if (
        proxy is None
        or observer is None
        or None in (proxy.value, proxy.baseline, observer.value, observer.baseline)
    ):
        return []
    assert proxy.value is not None and proxy.baseline is not None
    assert observer.value is not None and observer.baseline is not None
    overhead_ms = proxy.value - proxy.baseline
    added_ms = (observer.value - observer.baseline) / 1000
    share = added_ms / overhead_ms if overhead_ms > 0 else None
    return [
        Row(
            "telemetry",
            "observer added p50 / proxy added p50",
            None if share is None else share * 100,
            "%",
            None,
            "<= 20 %",
            _le(share, 0.2),
        )
    ]


def telemetry_proxy_rows(data: Any) -> list[Row]:
    """Issue 6 through two real sidecars (telemetry off / on, same run): added latency within 20 % of
    the proxy's own overhead; CPU per request as the steadier measure on a busy machine."""
    off, on = data.get("telemetry_off") or {}, data.get("telemetry_on") or {}
    rows = []
    for q in ("p50", "p99"):
        share = _num(data, f"telemetry_{q}_share")
        rows.append(
            Row(
                "telemetry",
                f"tools/call {q} via sidecar, telemetry + audit on",
                _num(on, f"{q}_ms"),
                "ms",
                _num(off, f"{q}_ms"),
                "added <= 20 % of proxy added",
                _le(share, 0.2),
            )
        )
    cpu_share = _num(data, "telemetry_cpu_share")
    rows.append(
        Row(
            "telemetry",
            "sidecar CPU per request, telemetry on",
            _num(data, "sidecar_cpu_us_per_request_on"),
            "us",
            _num(data, "sidecar_cpu_us_per_request_off"),
            "(info) CPU share " + ("-" if cpu_share is None else f"{cpu_share * 100:+.0f} %"),
        )
    )
    return rows


def idp_rows(data: Any) -> list[Row]:
    """Issue 13: exchange miss/hit per profile against its stand-in, introspection miss/hit, DPoP per
    call, each against the same sidecar without the feature (same run); DPoP target +0.3 ms p50."""
    rows: list[Row] = []
    for profile, phases in (data.get("exchange") or {}).items():
        off = _num(phases, "off", "p50_ms")
        for phase in ("miss", "hit"):
            rows.append(
                Row(
                    "idp",
                    f"exchange {profile} cache {phase} p50 (vs exchange off)",
                    _num(phases, phase, "p50_ms"),
                    "ms",
                    off,
                )
            )
    intro = data.get("introspection") or {}
    local = _num(intro, "jwt_local", "p50_ms")
    for phase in ("miss", "hit"):
        rows.append(
            Row(
                "idp",
                f"introspection {phase} p50 (vs local JWT check)",
                _num(intro, phase, "p50_ms"),
                "ms",
                local,
            )
        )
    dpop = data.get("dpop") or {}
    rows.append(
        Row(
            "idp",
            "tools/call p50 with DPoP proof (vs bearer, same sidecar)",
            _num(dpop, "dpop", "p50_ms"),
            "ms",
            _num(dpop, "bearer", "p50_ms"),
        )
    )
    check = data.get("dpop_validation") or {}
    rows.append(
        Row(
            "idp",
            "DPoP proof validation per call p50 (vs bearer)",
            _num(check, "dpop_p50_ms"),
            "ms",
            _num(check, "bearer_p50_ms"),
            "added <= 0.3 ms",
            _le(_num(check, "p50_added_ms"), 0.3),
        )
    )
    return rows


def memory_rows(data: Any) -> list[Row]:
    """Issue 14: idle RSS <= 50 MB (telemetry + audit off) / 55 MB (on); after 10,000 calls by 1,000
    users with 1,000 open sessions no more than 25 MB above idle. Baseline: an idle aiohttp proxy."""
    floor = _num(data, "floor_idle_rss_mb")
    rows: list[Row] = []
    for run in data.get("rows") or []:
        mode = run.get("config", "?")
        limit = 55.0 if mode == "on" else 50.0
        idle = _num(run, "idle_rss_mb")
        rows.append(
            Row(
                "memory",
                f"sidecar RSS idle (telemetry+audit {mode})",
                idle,
                "MB",
                floor,
                f"<= {limit:g} MB",
                _le(idle, limit),
            )
        )
        growth = _num(run, "growth_mb")
        rows.append(
            Row(
                "memory",
                f"RSS growth after {run.get('calls_ok')} calls, {run.get('sessions')} sessions ({mode})",
                growth,
                "MB",
                None,
                "<= 25 MB",
                _le(growth, 25.0),
            )
        )
    return rows


def capacity_rows(data: Any) -> list[Row]:
    """Issue 14: on one core the sidecar (auth, cached exchange, telemetry) reaches >= 0.6x the floor
    proxy's req/s, and its p99 at half that rate stays within 2x the floor's (same run)."""
    cap = data.get("capacity") or {}
    rows: list[Row] = []
    if "max_rps" in cap:
        # The CPU per request on the pinned core is the figure that holds on a shared machine: one
        # closed-loop round's req/s moves with whatever else ran on that core meanwhile.
        side_cpu = _num(cap, "cpu_ms_per_request", "sidecar+telemetry")
        floor_cpu = _num(cap, "cpu_ms_per_request", "floor")
        rows.append(
            Row(
                "capacity",
                "CPU per request on one core, sidecar + telemetry",
                side_cpu,
                "ms",
                floor_cpu,
                "<= 1.67x floor (>= 0.6x its req/s)",
                _le(side_cpu / floor_cpu if side_cpu is not None and floor_cpu else None, 1 / 0.6),
            )
        )
        side, floor = _num(cap, "max_rps", "sidecar+telemetry"), _num(cap, "max_rps", "floor")
        rows.append(Row("capacity", "closed-loop req/s, sidecar + telemetry", side, "req/s", floor))
        p99, base = (
            _num(cap, "at_half", "sidecar+telemetry", "p99_ms"),
            _num(cap, "at_half", "floor", "p99_ms"),
        )
        rows.append(
            Row(
                "capacity",
                "p99 at half the sidecar's max",
                p99,
                "ms",
                base,
                "<= 2x floor proxy",
                _le(p99 / base if p99 is not None and base else None, 2.0),
            )
        )
    acc = data.get("accounting") or {}
    rows.append(
        Row(
            "capacity",
            "spans received (telemetry on)",
            _num(acc, "spans"),
            "spans",
            _num(acc, "spans_expected"),
            "all",
            _ge(_num(acc, "spans"), _num(acc, "spans_expected")),
        )
    )
    return rows


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    quick_args: tuple[str, ...]
    rows: Callable[[Any], list[Row]]
    args: tuple[str, ...] = ()


BENCHES = (
    Bench("webhook", "bench_webhook.py", ("--requests", "500"), webhook_rows),
    Bench("proxy", "bench_proxy.py", ("--seconds", "8", "--rounds", "4", "--telemetry", "both"), proxy_rows),
    Bench(
        "egress",
        "bench_egress.py",
        (
            "--size-mb",
            "256",
            "--repeat",
            "2",
            "--connects",
            "200",
            "--keepalive-requests",
            "1000",
            "--upload-mb",
            "32",
        ),
        egress_rows,
    ),
    Bench("telemetry", "bench_telemetry.py", ("--calls", "5000"), telemetry_rows),
    Bench("policy", "bench_policy.py", ("--seconds", "6", "--rounds", "3"), policy_rows),
    Bench("idp", "bench_idp.py", ("--calls", "100"), idp_rows),
    Bench(
        "memory", "bench_memory.py", ("--calls", "2000", "--users", "200", "--sessions", "200"), memory_rows
    ),
    Bench(
        "capacity",
        "bench_capacity.py",
        ("--rates", "100", "200", "400", "--seconds", "2", "--streams", "10", "100", "1000"),
        capacity_rows,
        args=("--capacity-rounds", "3"),
    ),
    Bench(
        "telemetry-proxy",
        "bench_telemetry.py",
        ("--seconds", "6"),
        telemetry_proxy_rows,
        args=("--proxy",),
    ),
)


def run_bench(bench: Bench, quick: bool) -> tuple[list[Row], str, float]:
    """Run one benchmark script with --json; return its rows, a status note and the seconds it took."""
    script = ROOT / "bench" / bench.script
    if not script.exists():
        return [], f"not available yet ({bench.script} missing)", 0.0
    argv = [sys.executable, str(script), *bench.args, "--json"]
    if bench.name == "proxy" and not quick:
        argv += ["--telemetry", "both"]
    if quick:
        argv += list(bench.quick_args)
    print(f"[bench] running {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
    took = time.monotonic() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return [], f"failed (exit {done.returncode}): {' | '.join(tail)}", took
    data = parse_json_output(done.stdout)
    if data is None:
        return [], "failed: its --json output is not JSON", took
    return bench.rows(data), "ok", took


def parse_json_output(stdout: str) -> Any:
    """The JSON document a benchmark printed, tolerating progress lines before it."""
    lines = stdout.splitlines()
    for start, line in enumerate(lines):
        if line.lstrip().startswith(("{", "[")):
            try:
                return json.loads("\n".join(lines[start:]))
            except json.JSONDecodeError:
                continue
    return None


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load": _load(),
    }


def _load() -> str:
    # Other processes on the machine skew every figure (the baselines too); say how busy it was.
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f} (1 min) / {five:.1f} (5 min)"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def table(rows: list[Row]) -> list[list[str]]:
    out = [["bench", "figure", "value", "baseline (same run)", "ratio", "target", "met?"]]
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        base = "-" if r.baseline is None else f"{_fmt(r.baseline)} {r.unit}"
        out.append([r.bench, r.figure, f"{_fmt(r.value)} {r.unit}", base, ratio, r.target or "-", met])
    return out


def render_text(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(lines)


BUSY_NOTE = """
**Reading this run:** the machine was busy (load average above its core count: other test suites
were running). The paced benchmarks (the proxy at a fixed 300 req/s) then queue, so their absolute
latencies, baselines included, are mostly queueing time and the added-latency targets cannot be
judged; the ratios and the closed-loop figures (webhook, egress, CPU per request) hold up better.
Rerun `make bench` on an idle machine to judge the targets.
"""


def busy_note(info: dict[str, str]) -> str:
    """The caution above when the load average at the start or the end exceeded the core count."""
    cores = int(info.get("cores") or 0) or 1
    loads = [float(x.split()[0]) for x in (info.get("load", ""), _load()) if x and x[0].isdigit()]
    return BUSY_NOTE if any(load > cores for load in loads) else ""


PROXY_RATE = 300.0  # bench_proxy.py's default paced rate (the "steady 300 requests/s")


def saturation_note(rows: list[Row]) -> str:
    """Pure: say so when the sidecar's closed-loop maximum is within 1.5x of the paced rate, because
    the paced phase then runs near saturation and its latencies are queueing, not proxy overhead."""
    maxima = [r.value for r in rows if r.figure.startswith("max throughput via sidecar") and r.value]
    if not maxima or min(maxima) >= PROXY_RATE * 1.5:
        return ""
    return (
        f"\n**Proxy saturation:** the sidecar's closed-loop maximum on this machine was "
        f"{min(maxima):.0f} req/s, close to the paced {PROXY_RATE:.0f} req/s: the paced phase runs near "
        "saturation (client, MCP server and sidecar share the cores), so its p50/p99 are mostly queueing. "
        "The sidecar's CPU time per request (telemetry rows) is the steadier figure.\n"
    )


def write_doc(
    cells: list[list[str]],
    notes: dict[str, str],
    info: dict[str, str],
    quick: bool,
    rows: list[Row] | None = None,
) -> None:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    status = "\n".join(f"- `{name}`: {note}" for name, note in notes.items())
    DOC.write_text(
        f"""# Benchmarks

`make bench` runs every benchmark and rewrites this file; each figure is measured beside a
baseline **in the same run** on the same machine (so the ratio is what matters, not the absolute
number). Run a single one with `make bench-webhook`, `make bench-proxy`, `make bench-egress` or
`make bench-policy` (each takes `--help`; `--json` prints machine-readable results). Each run's
scratch directory (process logs, audit files) is removed when it ends; `OUTRIDER_BENCH_KEEP_LOGS=1`
keeps it and prints where.

## Last run: {when}{" (quick mode)" if quick else ""}

Machine: {info["cores"]} cores ({info["cpu"]}), Python {info["python"]}, {info["os"]};
load average when the run started {info["load"]}, at the end {_load()}.

{render_markdown(cells)}
{busy_note(info)}{saturation_note(rows or [])}
Benchmarks:
{status}

## What is measured

- **webhook** (`bench/bench_webhook.py`): `POST /mutate` over TLS with keep-alive for a realistic
  pod; the baseline is a no-op aiohttp TLS handler that parses the same body and returns a fixed
  answer. Targets: p50 within 1.5x, p99 within 2x of that floor. Each server's CPU time per
  request (from `/proc/PID/schedstat`) is printed beside them: on a loaded machine it is the
  steadier figure.
- **proxy** (`bench/bench_proxy.py`): MCP `tools/call` round trips through `outrider sidecar`
  (token validated, exchange cached) versus straight to the same `mcp` SDK server, paced at a
  steady 300 req/s. Targets: p50 added <= 1 ms, p99 added <= 3 ms, RSS <= 60 MB idle; with
  telemetry and audit on (exporting to a local OTLP receiver) the added latency stays within 20 %
  of the proxy's own overhead.
- **telemetry** (`bench/bench_telemetry.py`): the Observer's per-call cost (server span, child
  span, metric points, audit lines, OTLP/HTTP export to a local receiver) against the
  NullObserver, same process; set against the proxy's own added p50 (target <= 20 %).
- **telemetry-proxy** (`bench/bench_telemetry.py --proxy`): the same paced `tools/call` load
  through two real sidecars, telemetry and audit off and on (exporting to a local OTLP receiver),
  plus the sidecar's CPU time per request. Target: the added latency stays within 20 % of the
  proxy's own overhead.
- **egress** (`bench/bench_egress.py`): one large transfer and connection set-up through the
  iptables capture path and the 15001 enforcer versus direct, in the same network namespaces.
  Targets: >= 50 % of direct throughput, <= 1 ms added connect time at p50.
- **policy** (`bench/bench_policy.py`, `make bench-policy`): paced `tools/call` through six
  `outrider sidecar`s of the same run (no policy; 10, 100 and 1,000 Cedar policies; a rate limit in
  memory and in a real `redis-server`), slices interleaved; added p50/p99 against the no-policy one.
  Also the in-process `decide()` CPU time per call and the rate-limit check per call, which a busy
  machine disturbs far less. Targets: 100 policies p50 +0.2 ms; rate limit p50 +0.05 ms (memory),
  +0.5 ms (Redis). See [policy](policy.md).
- **memory** (`bench/bench_memory.py`, `make bench-memory`): the sidecar's idle RSS/PSS with
  telemetry + audit off and on, the native libraries it mapped, and RSS after 10,000 calls by
  1,000 distinct users in 1,000 open sessions; baseline: an idle aiohttp pass-through proxy.
  Targets: 50 / 55 MB idle, +25 MB after the load.
- **capacity** (`bench/bench_capacity.py`, `make bench-capacity`): latency against offered rate
  (direct, floor proxy, sidecar, sidecar + telemetry), capacity on one core against a minimal
  aiohttp pass-through proxy, RSS against open sessions with SSE streams, and the span/audit
  accounting; plots in [capacity-latency.png](capacity-latency.png) and
  [capacity-rss.png](capacity-rss.png). Where the curves bend and why: [capacity](capacity.md).
"""
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs (noisier figures)")
    parser.add_argument("--only", choices=[b.name for b in BENCHES], action="append", help="run only these")
    parser.add_argument("--no-write", action="store_true", help=f"do not rewrite {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    info = machine()
    rows: list[Row] = []
    notes: dict[str, str] = {}
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        bench_rows, note, took = run_bench(bench, args.quick)
        rows += bench_rows
        notes[bench.name] = note + (f" ({took:.0f} s)" if took else "")
    rows += share_of_proxy(rows)
    cells = table(rows)
    print(
        f"\nOutrider benchmarks on {info['cores']} cores ({info['cpu']}), Python {info['python']}, "
        f"load {info['load']} at the start, {_load()} at the end"
    )
    print(render_text(cells))
    for name, note in notes.items():
        print(f"  {name}: {note}")
    if not args.no_write:
        write_doc(cells, notes, info, args.quick, rows)
        print(f"results written to {DOC.relative_to(ROOT)}")
    # A missed target is a finding to read in the table, not a failure of the script; a benchmark
    # that could not run is.
    failed = [n for n, note in notes.items() if not note.startswith(("ok", "not available"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
