"""Instructions per call of the telemetry observer, under callgrind: load-independent figures.

The lean observer driven in one process as the proxy drives it for one authenticated `tools/call`
with a cached token exchange: the body parsed (`proxy._parse`), the request facts
(`RequestInfo`, as `InboundProxy._request_info` builds them), `Calls` (the scope entered on an
`ExitStack`), `set_principal`, `token_exchange` (cache hit), the trace context put into the upstream
headers and `params._meta` with the body's re-encode (`InboundProxy._inject_context`), `finish` (the
job's submission) and the stack's exit. That is the event loop's telemetry share, plus the driver's
own parsing ("request path"). The jobs (span ends, metric points, audit lines) run afterwards in
batches of 32 as the telemetry thread runs them ("telemetry job"); audit lines to a file, spans to an
in-memory list.

Each figure is a difference of two runs with `PYTHONHASHSEED=0` (start-up cancels out):

  request path per call = (I(request path, N2) - I(request path, N1)) / (N2 - N1)
  telemetry job per call = (I(with jobs, N2) - I(with jobs, N1)) / (N2 - N1) - request path per call
  driver per call        = the same for the driver alone (parse, body re-encode, no observer)

    .venv/bin/python bench/callgrind_observer.py [--before /tmp/base] [--calls 800 3200]

`--before DIR` measures another tree too (an export of a commit, run through `PYTHONPATH`).
The child mode (`--child MODE N`) is what valgrind runs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 2000
BATCH = 32  # jobs per batch, as the worker runs them at a few thousand calls per second
MODES = ("driver", "request", "jobs")


def child(mode: str, calls: int, tmp: str) -> None:
    """One process's calls (what valgrind measures)."""
    import json
    import random
    import time
    from contextlib import ExitStack
    from types import SimpleNamespace

    from outrider.sidecar.inbound import proxy
    from outrider.sidecar.inbound.jsonrpc import dumps
    from outrider.sidecar.telemetry import otlp_wire
    from outrider.sidecar.telemetry.audit import AuditLog, Workload
    from outrider.sidecar.telemetry.config import TelemetryConfig
    from outrider.sidecar.telemetry.metric_points import LeanMeter
    from outrider.sidecar.telemetry.observer import ExchangeOutcome, Principal, RequestInfo
    from outrider.sidecar.telemetry.observer_lean import LeanObserver
    from outrider.sidecar.telemetry.spans import ALWAYS_ON, LeanTracer

    random.seed(1)

    class Jobs:
        """The worker's interface; jobs are kept and run in batches by the driver."""

        enabled = True

        def __init__(self) -> None:
            self.queued: list[object] = []
            self.hooks: list[object] = []

        def submit(self, job: object) -> None:
            self.queued.append(job)

        def after_batch(self, hook: object) -> None:
            self.hooks.append(hook)

        def drain(self, timeout: float = 10.0) -> bool:
            self.run()
            return True

        def run(self) -> None:
            queued, self.queued = self.queued, []
            for job in queued:
                job()  # type: ignore[operator]
            for hook in self.hooks:
                hook()  # type: ignore[operator]

    spans: list[bytes] = []
    worker = Jobs()
    tracer = LeanTracer(ALWAYS_ON, lambda r: spans.append(otlp_wire.span_field(r)), spans.append)
    workload = Workload(spiffe_id="spiffe://bench.test/ns/bench/sa/mcp", pod="bench-0", namespace="bench")
    observer = LeanObserver(
        TelemetryConfig(),
        tracer=tracer,
        meter_provider=LeanMeter(),
        audit=AuditLog.open(str(Path(tmp) / f"audit-{os.getpid()}.jsonl")),
        workload=lambda: workload,
        worker=worker,  # type: ignore[arg-type]
    )
    principal = Principal(kind="oidc", subject="alice", issuer="https://idp.bench.test", client_id="bench")
    inject = SimpleNamespace(records=True)
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}

    def call(calls: proxy.Calls, body: bytes) -> None:
        for scope in calls.each():
            scope.set_principal(principal)
        started = time.perf_counter()
        outcome = ExchangeOutcome(
            outcome="cache_hit", audience="https://api.bench.test", duration_s=time.perf_counter() - started
        )
        for scope in calls.each():
            scope.token_exchange(outcome)
        proxy.InboundProxy._inject_context(inject, calls, {}, calls.parsed, body)  # type: ignore[arg-type]
        calls.finish_all(http_status=200, outcome="ok")

    def one(i: int, run_jobs: bool, observe: bool) -> None:
        body = json.dumps(
            {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
        ).encode()
        parsed, _ = proxy._parse(body)
        assert parsed is not None
        if not observe:
            parsed.objects[0].setdefault("params", {})["_meta"] = {"traceparent": "00-" + "1" * 51}
            dumps(parsed.objects[0], body)
            return
        info = RequestInfo(
            http_method="POST",
            transport="streamable-http",
            protocol_version=headers.get("MCP-Protocol-Version"),
            session_id=headers.get("Mcp-Session-Id"),
            client_address="127.0.0.1",
            headers={k: v for k in proxy.TRACE_HEADERS if (v := headers.get(k)) is not None},
        )
        if hasattr(proxy.Calls, "__enter__"):  # the scopes' exits are the Calls' own
            with proxy.Calls(observer, parsed, info) as calls:  # type: ignore[call-arg]
                call(calls, body)
        else:  # (older trees: on the request's exit stack)
            with ExitStack() as stack:
                call(proxy.Calls(observer, parsed, info, stack), body)  # type: ignore[call-arg]
        if run_jobs and len(worker.queued) >= BATCH:
            worker.run()
            spans.clear()
        elif not run_jobs:
            worker.queued.clear()

    for i in range(WARM_UP):
        one(i, True, mode != "driver")
    worker.run()
    for i in range(calls):
        one(WARM_UP + i, mode == "jobs", mode != "driver")
    worker.run()


def instructions(tree: Path, mode: str, calls: int, tmp: str) -> int:
    out = str(Path(tmp) / f"cg-{tree.name}-{mode}-{calls}.out")
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(tree)}
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            mode,
            str(calls),
            tmp,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    text = Path(out).read_text(errors="replace")
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    assert match, out
    return int(match.group(1))


def measure(tree: Path, counts: tuple[int, int], tmp: str) -> dict[str, float]:
    n1, n2 = counts
    runs = [(mode, n) for mode in MODES for n in counts]
    with ThreadPoolExecutor(2) as pool:
        got = dict(zip(runs, pool.map(lambda r: instructions(tree, r[0], r[1], tmp), runs), strict=True))
    per = {mode: (got[(mode, n2)] - got[(mode, n1)]) / (n2 - n1) for mode in MODES}
    return {
        "driver": per["driver"],
        "request path": per["request"],
        "observer on the request path": per["request"] - per["driver"],
        "telemetry job": per["jobs"] - per["request"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", help="another tree (an export) to measure beside this one")
    parser.add_argument("--calls", type=int, nargs=2, default=(800, 3200))
    parser.add_argument("--child", nargs=3, metavar=("MODE", "CALLS", "TMP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    trees = [("this tree", ROOT)] + ([("before", Path(args.before).resolve())] if args.before else [])
    with tempfile.TemporaryDirectory(prefix="outrider-callgrind-") as tmp:
        for name, tree in trees:
            figures = measure(tree, tuple(args.calls), tmp)
            print(f"{name} ({tree}): instructions per call")
            for key, value in figures.items():
                print(f"  {key:30} {value:12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
