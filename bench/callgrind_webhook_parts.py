"""Instructions per distinct pod of each part of `/mutate`'s in-process work, under callgrind.

Callgrind cannot name Python functions (the interpreter is stripped), so each part is called from
inside a distinct libc function through a ctypes callback (`bsearch`, `lfind`, `qsort`,
`pthread_once`, `twalk`: each calls it exactly once), and the part's cost is that function's
inclusive count minus the callback's own cost (calibrated in a region of its own). Regions are cut
by `--dump-before=getppid`: start-up and warm-up, calibration, then the measured pods. The parts
keep their results and exceptions, so the answers are the ones `/mutate` gives.

    .venv/bin/python bench/callgrind_webhook_parts.py [--tree DIR] [--set request|engine|apply]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = ("bsearch", "lfind", "qsort", "pthread_once", "twalk")
# how callgrind_annotate names them (glibc's source files; some entries carry only the callee's address)
SOURCES = {
    "bsearch": "stdlib-bsearch.h:",
    "lfind": "lsearch.c:",
    "qsort": "msort.c:",
    "pthread_once": "pthread_once.c:",
    "twalk": "tsearch.c:",
}


class Carrier:
    """Calls a function from inside one libc function, so callgrind can count it inclusively."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.libc = ctypes.CDLL(None)
        self.job: Callable[[], Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.calls = 0
        cmp_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        if symbol == "twalk":
            action_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
            self._callback: Any = action_type(lambda node, which, depth: self._run())
            self._cmp = cmp_type(lambda a, b: 0)
            self._root = ctypes.c_void_p()
            self.libc.tsearch(ctypes.c_void_p(1), ctypes.byref(self._root), self._cmp)
        elif symbol == "pthread_once":
            self._callback = ctypes.CFUNCTYPE(None)(lambda: self._run())
        else:
            self._callback = cmp_type(lambda a, b: self._run() or 0)
        self._items = (ctypes.c_int * 2)(1, 2)
        self._count = ctypes.c_size_t(1)

    def _run(self) -> None:
        assert self.job is not None
        try:
            self.result = self.job()
        except BaseException as exc:  # re-raised by `call`
            self.error = exc

    def call(self, job: Callable[[], Any]) -> Any:
        self.job, self.result, self.error = job, None, None
        self.calls += 1
        libc, items = self.libc, self._items
        if self.symbol == "bsearch":
            one, size = ctypes.c_size_t(1), ctypes.c_size_t(4)
            libc.bsearch(ctypes.byref(items, 0), items, one, size, self._callback)
        elif self.symbol == "lfind":
            libc.lfind(
                ctypes.byref(items, 0), items, ctypes.byref(self._count), ctypes.c_size_t(4), self._callback
            )
        elif self.symbol == "qsort":
            libc.qsort(items, ctypes.c_size_t(2), ctypes.c_size_t(4), self._callback)
        elif self.symbol == "pthread_once":
            once = ctypes.c_int(0)
            libc.pthread_once(ctypes.byref(once), self._callback)
        else:
            libc.twalk(self._root, self._callback)
        if self.error is not None:
            raise self.error
        return self.result

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return self.call(lambda: function(*args, **kwargs))

        return wrapped


def fast_bodies(bw: Any, count: int) -> list[bytes]:
    """`bw.review_body(0..count-1)`, byte for byte, with the pod file parsed once (not per body)."""
    import copy

    import yaml

    template = yaml.safe_load(bw.POD_FILE.read_text())
    real = bw.yaml
    bw.yaml = type("OnceYaml", (), {"safe_load": staticmethod(lambda text: copy.deepcopy(template))})
    try:
        return [bw.review_body(i) for i in range(count)]
    finally:
        bw.yaml = real


def child(args: argparse.Namespace) -> None:
    """Under valgrind: warm up, calibrate, measure (`os.getppid()` cuts the regions)."""
    sys.path[:0] = [str(ROOT / "bench")]
    import bench_webhook as bw
    import orjson

    from outrider.webhook import admission, engine, server
    from outrider.webhook import annotations as ann
    from outrider.webhook.config import parse_config

    config = parse_config({"egress_default_policy": {"allow": ["api.github.com:443", "*.example.com:443"]}})
    labels = server.ENABLED_LABELS
    cache = server.AnswerCache()
    metrics = server.Metrics.create()
    telemetry = server.Telemetry()
    carriers = {s: Carrier(s) for s in SYMBOLS}
    first, count = args.warm_up, args.requests
    bodies = fast_bodies(bw, first + count)

    def request(body: bytes, parts: dict[str, Carrier]) -> bytes:
        """What `server.mutate` does for a pod CREATE without namespace facts (its shell aside)."""

        def run(name: str, job: Callable[[], Any]) -> Any:
            carrier = parts.get(name)
            return carrier.call(job) if carrier is not None else job()

        start_ns = time.time_ns()
        started = time.perf_counter()
        if "floor" in parts:
            run("floor", lambda: orjson.loads(body))
        review = run("decode", lambda: admission.decode(body))
        key = run(
            "key",
            lambda: cache.key(config.hash, "tools", labels, None, review.object, body, review.uid, {}),
        )
        assert cache.get(key) is None
        result = run("inject", lambda: engine.inject(review.object, labels, config, None, "tools", {}))
        cached = run("encode", lambda: (admission.outcome(result), admission.encode_result(result)))
        cache.put(key, cached)
        answer = run("encode", lambda: admission.with_uid(review.uid, cached[1]))

        def record() -> None:
            elapsed = time.perf_counter() - started
            metrics.by_outcome[cached[0]].inc()
            metrics.latency.observe(elapsed)
            telemetry.record(cached[0], elapsed, review, start_ns)

        run("telemetry", record)
        return answer

    parts: dict[str, Carrier] = {}
    if args.set == "request":
        # telemetry and the loop's own work: the region's total minus the parts (run --set telemetry)
        parts = {"floor": carriers["bsearch"], "decode": carriers["lfind"], "key": carriers["qsort"]}
        parts.update(inject=carriers["pthread_once"], encode=carriers["twalk"])
    elif args.set == "telemetry":
        parts = {"telemetry": carriers["bsearch"]}
    elif args.set == "engine":
        wrap = {
            "bsearch": [(ann, "parse_pod"), (ann, "unknown_keys"), (ann, "namespace_mode")],
            "lfind": [(engine, "_escapes")],
            "qsort": [(engine, "plan_egress_cached"), (engine, "plan_policy"), (engine, "_pod_resource")],
            "pthread_once": [(engine, "_apply")],
            "twalk": [(engine.meshes, "conflict"), (engine, "_check_port_clash"), (engine, "_find_mcp_port")],
        }
        for symbol, targets in wrap.items():
            for module, name in targets:
                setattr(module, name, carriers[symbol].wrap(getattr(module, name)))
    elif args.set == "apply":
        wrap = {
            "bsearch": [(engine, "_rewrite_probes")],
            "lfind": [(engine, "diff_into"), (engine, "_add_each"), (engine, "_diff_changed")],
            "qsort": [(engine, "_sorted_json")],
            "pthread_once": [(engine, "_sidecar_config_json")],
            "twalk": [(engine, n) for n in ("_parts", "_free_name", "_stop_delay", "_named")],
        }
        for symbol, targets in wrap.items():
            for module, name in targets:
                setattr(module, name, carriers[symbol].wrap(getattr(module, name)))

    for body in bodies[:first]:
        request(body, parts)
    os.getppid()  # region 2: calibration, each carrier `count` times with an empty job
    for carrier in carriers.values():
        for _ in range(count):
            carrier.call(lambda: None)
        carrier.calls = 0
    os.getppid()  # region 3: the measured pods
    for body in bodies[first:]:
        request(body, parts)
    os.getppid()
    print(json.dumps({s: c.calls for s, c in carriers.items()}))


def inclusive(path: Path) -> dict[str, int]:
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        match = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S+)", line)
        if match:
            for symbol, source in SOURCES.items():
                if source in match.group(2):  # the outermost (largest) entry of that source
                    found[symbol] = max(found.get(symbol, 0), int(match.group(1).replace(",", "")))
        total_match = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?PROGRAM TOTALS", line)
        if total_match:
            total = int(total_match.group(1).replace(",", ""))
    found["total"] = total
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", default=str(ROOT), help="the tree whose outrider is measured")
    parser.add_argument("--set", choices=["request", "telemetry", "engine", "apply"], default="request")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warm-up", type=int, default=300)
    parser.add_argument("--keep", metavar="DIR")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="outrider-callgrind-parts-"))
    try:
        out = tmp / "callgrind.out"
        env = {**os.environ, "PYTHONPATH": str(Path(args.tree).resolve()), "PYTHONHASHSEED": "0"}
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--dump-before=getppid",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--child",
                "--set",
                args.set,
                "--requests",
                str(args.requests),
                "--warm-up",
                str(args.warm_up),
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        calls = json.loads(done.stdout.strip().splitlines()[-1])
        files = sorted(tmp.glob("callgrind.out.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
        calibration, measured = inclusive(files[1]), inclusive(files[2])
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for path in files:
                shutil.copy(path, Path(args.keep) / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = args.requests
    print(f"set {args.set}, tree {args.tree}, {n} distinct pods after {args.warm_up}")
    print(f"  region total per pod: {measured['total'] / n:,.0f}")
    for symbol in SYMBOLS:
        empty = calibration.get(symbol, 0) / n  # calibration: n empty calls per carrier
        net = (measured.get(symbol, 0) - empty * calls[symbol]) / n
        print(
            f"  {symbol:<14} per pod {net:>10,.0f} net ({calls[symbol] / n:.2f} calls per pod, "
            f"an empty call {empty:,.0f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
