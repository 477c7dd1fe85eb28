"""Instructions per distinct pod of `POST /mutate` and of the no-op TLS floor, whole servers, under callgrind.

Both servers exactly as `bench_webhook.py` starts them (`--serve noop|mutate`), each under
`valgrind --tool=callgrind --instr-atstart=no` with `PYTHONHASHSEED=0`; after `--warm-up` distinct
pods (0..W-1 of the bench's sequence) the collection is switched on (`callgrind_control -i on`),
`--requests` further distinct pods are sent one at a time over TLS keep-alive, and the counters are
dumped. Per request: the whole process's user-space instructions (TLS, aiohttp, the handler), and the
inclusive share of the C entry points named in GROUPS (OpenSSL record I/O, orjson, hashing, base64).
Valgrind counts instructions, not time: cache misses and the kernel's side are not in these figures,
and valgrind runs OpenSSL's and orjson's portable code paths (no SHA or AES-NI shortcuts).

    .venv/bin/python bench/callgrind_webhook.py [--before /tmp/base] [--requests 400] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import bench_webhook as bw  # noqa: E402
from callgrind_webhook_parts import fast_bodies  # noqa: E402

# Inclusive instructions of these functions (callgrind_annotate --inclusive=yes), by group. Python's own
# functions are not visible to callgrind (the interpreter is stripped); the in-process stages of
# `/mutate` are measured by `--stages` instead.
GROUPS = {
    "TLS read (SSL_read_ex)": ("SSL_read_ex", "SSL_read"),
    "TLS write (SSL_write_ex)": ("SSL_write_ex", "SSL_write"),
    "orjson.loads": ("orjson:loads",),
    "orjson.dumps": ("orjson:dumps",),
    "SHA-256": ("SHA256_Update", "sha256_block_data_order", "EVP_DigestUpdate"),
}


async def drive(port: int, context: ssl.SSLContext, first: int, count: int) -> int:
    import aiohttp

    ok = 0
    url = f"https://localhost:{port}/mutate"
    connector = aiohttp.TCPConnector(limit=1, ssl=context)
    bodies = fast_bodies(bw, first + count)[first:]
    async with aiohttp.ClientSession(connector=connector) as session:
        for body in bodies:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                payload = await r.read()
                ok += r.status == 200 and b'"allowed":true' in payload
    return ok


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=600)


def totals(out: Path) -> int:
    """Instructions of the dumps made by `callgrind_control -d` (the measured requests alone)."""
    total = 0
    for path in out.parent.glob(out.name + "*"):
        text = path.read_text(errors="replace")
        found = re.search(r"^totals: (\d+)", text, re.M)
        if found and re.search(r"^desc: Trigger: dump", text, re.M):  # not the exit's part
            total += int(found.group(1))
    return total


def inclusive(files: list[Path]) -> list[tuple[int, str]]:
    """(instructions, function) from callgrind_annotate --inclusive=yes over the dumps."""
    rows: list[tuple[int, str]] = []
    for path in files:
        text = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for line in text.splitlines():
            match = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(\S.*)$", line) or re.match(
                r"\s*([\d,]+)\s+(\S.*)$", line
            )
            if match and ":" in match.group(2):
                rows.append((int(match.group(1).replace(",", "")), match.group(2)))
    return rows


def group_split(rows: list[tuple[int, str]], requests: int) -> dict[str, float]:
    split: dict[str, float] = {}
    for group, names in GROUPS.items():
        best = 0
        for count, where in rows:
            function = where.split(":", 1)[1].split(" ")[0] if ":" in where else where
            if "orjson" in where:
                function = "orjson:" + function  # its entry points are named loads/dumps alone
            if any(function == n or function.startswith(n + "'") for n in names):
                best = max(best, count)  # the outermost entry point of the group
        split[group] = best / requests
    return split


async def one(target: str, tree: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from outrider.webhook.certs import DEFAULT_DNS_NAMES, write_certs

    cert_dir = tmp / "certs"
    if not cert_dir.exists():
        cert_dir.mkdir()
        write_certs(cert_dir, DEFAULT_DNS_NAMES)
    context = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
    port = bw._free_port()
    name = f"{target}-{tree.name}"
    out = tmp / f"callgrind-{name}.out"
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable,
        str(tree / "bench" / "bench_webhook.py"),
        "--serve",
        target,
        "--port",
        str(port),
        "--cert-dir",
        str(cert_dir),
    ]
    with (tmp / f"{name}.log").open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
    try:
        deadline = 900.0
        while True:
            try:
                await bw._wait_up(port, context)
                break
            except OSError:
                deadline -= 30
                if deadline <= 0 or process.poll() is not None:
                    raise
        await drive(port, context, 0, args.warm_up)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(control, process.pid, "-i", "on")
        ok = await drive(port, context, args.warm_up, args.requests)
        await asyncio.to_thread(control, process.pid, "-d")
        await asyncio.to_thread(control, process.pid, "-i", "off")
    finally:
        process.terminate()
        process.wait(60)
    return {"ok": ok, **await asyncio.to_thread(summarise, out, args)}


def summarise(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    files = list(out.parent.glob(out.name + "*"))
    dumped = [p for p in files if re.search(r"^desc: Trigger: dump", p.read_text(errors="replace"), re.M)]
    if args.keep:
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        for path in dumped:
            shutil.copy(path, keep / path.name)
    return {
        "per_request": totals(out) / args.requests,
        "groups": group_split(inclusive(dumped), args.requests),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="outrider-callgrind-webhook-"))
    result: dict[str, Any] = {}
    trees = [("this tree", ROOT)]
    if args.before:
        trees.append(("before", args.before))
    try:
        for label, tree in trees:
            for target in args.targets:
                key = f"{target} ({label})"
                result[key] = await one(target, tree, tmp, args)
                print(key, json.dumps(result[key]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", help="another tree (an export) measured the same way")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warm-up", type=int, default=300)
    parser.add_argument("--targets", nargs="+", choices=bw.TARGETS, default=list(bw.TARGETS))
    parser.add_argument("--keep", metavar="DIR", help="copy the callgrind files here (callgrind_annotate)")
    args = parser.parse_args()
    args.before = Path(args.before).resolve() if args.before else None
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    result = asyncio.run(run(args))
    print("instructions per request (whole server process, user space):")
    for key, figures in result.items():
        groups = ", ".join(f"{g} {n:,.0f}" for g, n in figures["groups"].items())
        print(f"  {key}: {figures['per_request']:,.0f} ({groups}); ok {figures['ok']}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
