"""`make bench-egress`: the capture path (iptables -> 15001 enforcer) against direct, same run.

Builds the test network namespaces (tests/egress/netlab.py), then from inside the pod measures one
large download and many connection set-ups, once as the app (UID 1000, captured) and once as the
sidecar UID 15337 (not captured: the direct baseline), plus many requests on one kept-alive HTTP
connection and one large HTTP upload (both pass the per-request judge and the framing parser).
Targets: >= 50 % of direct throughput and <= 1 ms added connect time at p50. Prints a table, or
JSON with --json. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# --- client mode (runs inside the pod namespace) --------------------------------------------------


def _throughput(ip: str, port: int, size: int) -> dict[str, float]:
    buffer = bytearray(1 << 20)
    with socket.create_connection((ip, port), timeout=30) as sock:
        started = time.perf_counter()
        sock.sendall(f"SEND {size}\n".encode())
        received = 0
        while received < size:
            n = sock.recv_into(buffer)
            if n == 0:
                break
            received += n
        elapsed = time.perf_counter() - started
    if received != size:
        raise RuntimeError(f"short transfer: {received} of {size} bytes")
    return {"bytes": received, "seconds": elapsed, "mib_per_s": received / elapsed / (1 << 20)}


def _connect_times(ip: str, port: int, count: int, http_host: str | None) -> list[float]:
    """Connection set-up as an app sees it: connect + first request + first response byte."""
    samples: list[float] = []
    request = (
        f"GET / HTTP/1.1\r\nHost: {http_host}\r\nConnection: close\r\n\r\n".encode()
        if http_host
        else b"PING\n"
    )
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection((ip, port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)
            if not sock.recv(64):
                raise RuntimeError("connection closed without an answer (denied?)")
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _read_response(sock: socket.socket, buffer: bytearray) -> None:
    """Read one Content-Length answer off a kept-alive connection (leftover bytes stay in `buffer`)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed mid keep-alive run (denied?)")
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end]).decode("latin-1").lower()
    if not head.startswith("http/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head.splitlines()[0]}")
    length = int(head.split("content-length:")[1].split("\r\n")[0])
    while len(buffer) < end + length:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed mid answer")
        buffer += chunk
    del buffer[: end + length]


def _keepalive(ip: str, port: int, host: str, count: int) -> dict[str, Any]:
    """`count` requests one after another on ONE connection: each is judged by the enforcer now."""
    samples: list[float] = []
    buffer = bytearray()
    request = f"GET /bench HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((ip, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(request)
            _read_response(sock, buffer)
            samples.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - started
    return {"request_ms": samples, "requests_per_s": count / elapsed}


def _upload(ip: str, port: int, host: str, size: int) -> dict[str, float]:
    """One large Content-Length POST body (client -> server now passes the request parser)."""
    chunk = b"\0" * (1 << 20)
    with socket.create_connection((ip, port), timeout=30) as sock:
        started = time.perf_counter()
        sock.sendall(
            f"POST /bench-upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        left = size
        while left > 0:
            n = min(left, len(chunk))
            sock.sendall(chunk[:n])
            left -= n
        _read_response(sock, bytearray())
        elapsed = time.perf_counter() - started
    return {"bytes": size, "seconds": elapsed, "mib_per_s": size / elapsed / (1 << 20)}


def client_main(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {}
    if args.keepalive:
        result["keepalive"] = _keepalive(args.ip, args.port, args.http_host, args.keepalive)
    if args.upload:
        result["upload"] = _upload(args.ip, args.port, args.http_host, args.upload)
    if args.size:
        result["throughput"] = _throughput(args.ip, args.port, args.size)
    if args.count:
        result["connect_ms"] = _connect_times(args.ip, args.port, args.count, args.http_host)
    print(json.dumps(result))
    return 0


# --- orchestration --------------------------------------------------------------------------------


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def orchestrate(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from tests.egress import netlab

    reason = netlab.have_netns()
    if reason is not None:
        print(f"bench_egress: cannot run here: {reason}", file=sys.stderr)
        return 2
    size = args.size_mb << 20
    keepalive_host = f"allowed.test:{netlab.KEEPALIVE_PORT}"
    policy = {"allow": [*netlab.POLICY["allow"], keepalive_host]}
    config = {"egress": {"mode": "capture", "policy": policy, "policy_file": None}}
    runs: dict[str, dict[str, Any]] = {}
    with netlab.lab(capture=True, sidecar_config=config) as lab:

        def client(uid: int, *extra: str) -> dict[str, Any]:
            argv = lab.in_pod(netlab.PYTHON, str(Path(__file__).resolve()), "--client", *extra, uid=uid)
            import subprocess

            done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0 or not done.stdout.strip():
                raise RuntimeError(f"bench client failed: {done.stderr.strip()[-500:]}")
            parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
            return parsed

        paths = {"direct (uid 15337)": netlab.SIDECAR_UID, "capture (uid 1000)": netlab.APP_UID}
        # Warm up both paths (ARP/ND, DNS, the sidecar's first connections), then measure.
        for uid in paths.values():
            client(uid, "--ip", netlab.SINK_V4, "--port", "9000", "--count", "20")
            client(
                uid, "--ip", netlab.ALLOWED_V4, "--port", "80", "--count", "5", "--http-host", "allowed.test"
            )
        for label, uid in paths.items():
            tcp = client(uid, "--ip", netlab.SINK_V4, "--port", "9000", "--count", str(args.connects))
            http = client(
                uid,
                *("--ip", netlab.ALLOWED_V4, "--port", "80", "--count", str(args.connects)),
                *("--http-host", "allowed.test"),
            )
            kept = client(
                uid,
                *("--ip", netlab.ALLOWED_V4, "--port", str(netlab.KEEPALIVE_PORT)),
                *("--keepalive", str(args.keepalive_requests), "--http-host", keepalive_host),
            )["keepalive"]
            runs[label] = {
                "keepalive_requests_per_s": round(kept["requests_per_s"], 1),
                "keepalive_request_p50_ms": round(_percentile(kept["request_ms"], 0.5), 3),
                "keepalive_request_p90_ms": round(_percentile(kept["request_ms"], 0.9), 3),
                "uploads_mib_s": [],
                "tcp_connect_p50_ms": round(_percentile(tcp["connect_ms"], 0.5), 3),
                "tcp_connect_p90_ms": round(_percentile(tcp["connect_ms"], 0.9), 3),
                "http_by_name_p50_ms": round(_percentile(http["connect_ms"], 0.5), 3),
                "http_by_name_p90_ms": round(_percentile(http["connect_ms"], 0.9), 3),
                "transfers_mib_s": [],
            }
        # Transfers alternate direct/capture so that both paths see the same background load; the
        # ratio reported is the median of the per-pair ratios.
        for _ in range(args.repeat):
            for label, uid in paths.items():
                done = client(uid, "--ip", netlab.SINK_V4, "--port", "9000", "--size", str(size))
                runs[label]["transfers_mib_s"].append(round(done["throughput"]["mib_per_s"], 1))
                sent = client(
                    uid,
                    *("--ip", netlab.ALLOWED_V4, "--port", str(netlab.KEEPALIVE_PORT)),
                    *("--upload", str(args.upload_mb << 20), "--http-host", keepalive_host),
                )
                runs[label]["uploads_mib_s"].append(round(sent["upload"]["mib_per_s"], 1))
        for run in runs.values():
            run["throughput_mib_s"] = statistics.median(run["transfers_mib_s"])
            run["upload_mib_s"] = statistics.median(run["uploads_mib_s"])
        allowed = lab.decisions(allowed=True)
    direct, capture = runs["direct (uid 15337)"], runs["capture (uid 1000)"]
    summary = {
        "transfer_mib": args.size_mb,
        "connects": args.connects,
        "runs": runs,
        "throughput_ratio": round(
            statistics.median(
                c / d for c, d in zip(capture["transfers_mib_s"], direct["transfers_mib_s"], strict=True)
            ),
            3,
        ),
        "keepalive_requests": args.keepalive_requests,
        "keepalive_rate_ratio": round(
            capture["keepalive_requests_per_s"] / direct["keepalive_requests_per_s"], 3
        ),
        "keepalive_added_p50_ms": round(
            capture["keepalive_request_p50_ms"] - direct["keepalive_request_p50_ms"], 3
        ),
        "upload_mib": args.upload_mb,
        "upload_ratio": round(
            statistics.median(
                c / d for c, d in zip(capture["uploads_mib_s"], direct["uploads_mib_s"], strict=True)
            ),
            3,
        ),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "tcp_connect_added_p50_ms": round(capture["tcp_connect_p50_ms"] - direct["tcp_connect_p50_ms"], 3),
        "http_by_name_added_p50_ms": round(capture["http_by_name_p50_ms"] - direct["http_by_name_p50_ms"], 3),
        "enforcer_allowed_decisions": len(allowed),
    }
    summary["targets_met"] = {
        "throughput >= 50% of direct": summary["throughput_ratio"] >= 0.5,
        "added connect p50 <= 1 ms (tcp)": summary["tcp_connect_added_p50_ms"] <= 1.0,
        "added connect p50 <= 1 ms (http by name)": summary["http_by_name_added_p50_ms"] <= 1.0,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"egress capture vs direct ({args.size_mb} MiB transfer, median of {args.repeat}; ", end="")
    print(f"{args.connects} connects)")
    header = (
        f"{'path':<22}{'MiB/s':>10}{'tcp p50 ms':>12}{'tcp p90 ms':>12}{'http p50 ms':>13}{'http p90 ms':>13}"
    )
    print(header)
    print("-" * len(header))
    for label, run in runs.items():
        print(
            f"{label:<22}{run['throughput_mib_s']:>10.1f}{run['tcp_connect_p50_ms']:>12.3f}"
            f"{run['tcp_connect_p90_ms']:>12.3f}{run['http_by_name_p50_ms']:>13.3f}{run['http_by_name_p90_ms']:>13.3f}"
        )
    print(
        f"throughput ratio capture/direct (median of alternating pairs): {summary['throughput_ratio']:.2f}"
        "  (target >= 0.50)"
    )
    print(
        f"machine: {summary['cpus']} CPUs, load average {summary['load_average_1m']} (other work shares them)"
    )
    print(
        f"added connect p50: tcp {summary['tcp_connect_added_p50_ms']:.3f} ms, "
        f"http by name {summary['http_by_name_added_p50_ms']:.3f} ms  (target <= 1 ms)"
    )
    print(
        f"keep-alive ({args.keepalive_requests} requests on one connection, each judged): "
        f"direct {direct['keepalive_requests_per_s']:.0f} req/s "
        f"p50 {direct['keepalive_request_p50_ms']:.3f} ms, "
        f"capture {capture['keepalive_requests_per_s']:.0f} req/s "
        f"p50 {capture['keepalive_request_p50_ms']:.3f} ms; rate ratio "
        f"{summary['keepalive_rate_ratio']:.2f}, added p50 {summary['keepalive_added_p50_ms']:.3f} ms"
    )
    print(
        f"upload ({args.upload_mb} MiB Content-Length body through the request parser): "
        f"direct {direct['upload_mib_s']:.0f} MiB/s, capture {capture['upload_mib_s']:.0f} MiB/s, "
        f"ratio {summary['upload_ratio']:.2f}"
    )
    for target, met in summary["targets_met"].items():
        print(f"  {'MET ' if met else 'MISS'} {target}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the large transfer (MiB)")
    parser.add_argument("--repeat", type=int, default=5, help="transfers per path (median is reported)")
    parser.add_argument("--connects", type=int, default=300, help="connection set-ups per path")
    parser.add_argument(
        "--keepalive-requests", type=int, default=2000, help="requests on one kept-alive HTTP connection"
    )
    parser.add_argument("--upload-mb", type=int, default=64, help="size of the HTTP upload (MiB)")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keepalive", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upload", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--ip", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--http-host", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    return client_main(args) if args.client else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
