"""The "app" of the egress tests: one outbound attempt per run, the result as one JSON line.

Runs in the pod network namespace under a normal UID (or 15337 to show the sidecar is not captured):
`python app_client.py https --host allowed.test --ip 10.200.1.20 --sni allowed.test [--proxy URL]`.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import struct
import sys
import time
from typing import Any

TIMEOUT = 4.0


def _connect(args: argparse.Namespace, port: int) -> socket.socket:
    target = args.ip or args.host
    if args.proxy:
        proxy_host, proxy_port = args.proxy.removeprefix("http://").rstrip("/").rsplit(":", 1)
        sock = socket.create_connection((proxy_host.strip("[]"), int(proxy_port)), timeout=TIMEOUT)
        authority = f"[{target}]:{port}" if ":" in target else f"{target}:{port}"
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"proxy closed: {head!r}")
            head += chunk
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise PermissionError(f"proxy answered {status}: {head.decode('latin-1').splitlines()[-1]}")
        return sock
    if args.device or args.source:
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        if args.device:  # SO_BINDTODEVICE: unprivileged since Linux 5.7 for an unbound socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.device.encode())
        if args.source:
            sock.bind((args.source, 0))
        sock.connect((target, port))
        return sock
    return socket.create_connection((target, port), timeout=TIMEOUT)


def _read_all(sock: Any) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ssl.SSLZeroReturnError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _http_result(raw: bytes) -> dict[str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head:
        raise ConnectionError("connection closed without a response")
    status = int(head.split(b" ", 2)[1])
    return {"status": status, "body": body.decode("utf-8", "replace")}


def https(args: argparse.Namespace) -> dict[str, Any]:
    port = args.port or 443
    sock = _connect(args, port)
    context = ssl.create_default_context(cafile=args.ca)
    sni = args.sni if args.sni is not None else args.host
    if not sni:
        context.check_hostname = False
    with context.wrap_socket(sock, server_hostname=sni or None) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {args.host or args.ip}\r\nConnection: close\r\n\r\n".encode())
        return _http_result(_read_all(tls))


def http(args: argparse.Namespace) -> dict[str, Any]:
    port = args.port or 80
    host = args.host or args.ip
    if args.proxy:
        proxy_host, proxy_port = args.proxy.removeprefix("http://").rstrip("/").rsplit(":", 1)
        sock = socket.create_connection((proxy_host, int(proxy_port)), timeout=TIMEOUT)
        target = args.ip or args.host
        authority = f"[{target}]:{port}" if ":" in target else f"{target}:{port}"
        line = f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n"
    else:
        sock = _connect(args, port)
        line = f"GET / HTTP/1.1\r\nHost: {host}\r\n"
    with sock:
        sock.sendall((line + "Connection: close\r\n\r\n").encode())
        return _http_result(_read_all(sock))


def tcp(args: argparse.Namespace) -> dict[str, Any]:
    with _connect(args, args.port) as sock:
        sock.sendall(b"ping\n")
        sock.shutdown(socket.SHUT_WR)
        data = _read_all(sock)
    if not data:
        raise ConnectionError("closed without data")
    return {"data": data.decode("utf-8", "replace")}


def raw(args: argparse.Namespace) -> dict[str, Any]:
    """Send `--data` (backslash escapes allowed) as the first bytes, half-close, read the answer."""
    with socket.create_connection((args.ip or args.host, args.port), timeout=TIMEOUT) as sock:
        sock.sendall(args.data.encode("latin-1").decode("unicode_escape").encode("latin-1"))
        sock.shutdown(socket.SHUT_WR)
        data = _read_all(sock)
    if not data:
        raise ConnectionError("closed without data")
    return _http_result(data) if data.startswith(b"HTTP/") else {"data": data.decode("latin-1")}


def silent(args: argparse.Namespace) -> dict[str, Any]:
    """Connect and send nothing (a client that never sends its ClientHello); report when it closes."""
    with socket.create_connection((args.ip, args.port), timeout=TIMEOUT) as sock:
        started = time.monotonic()
        data = sock.recv(1024)
        return {"closed_after_s": round(time.monotonic() - started, 3), "data": data.decode("latin-1")}


def udp(args: argparse.Namespace) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in args.ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.5)
        sock.sendto(b"ping", (args.ip, args.port))
        data, _ = sock.recvfrom(2048)
    return {"data": data.decode()}


def icmp(args: argparse.Namespace) -> dict[str, Any]:
    """An echo request through an unprivileged ping socket (no NET_RAW needed): a possible tunnel."""
    v6 = ":" in args.ip
    family, proto, kind = (
        (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP, 8)
    )
    with socket.socket(family, socket.SOCK_DGRAM, proto) as sock:
        sock.settimeout(1.5)
        sock.sendto(bytes([kind, 0, 0, 0, 0, 0, 0, 1]) + b"exfiltrated", (args.ip, 0))
        data, _ = sock.recvfrom(2048)
    return {"reply_bytes": len(data)}


def dns(args: argparse.Namespace) -> dict[str, Any]:
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in args.host.split("."):
        query += bytes([len(label)]) + label.encode()
    query += b"\0" + struct.pack("!HH", 1, 1)
    family = socket.AF_INET6 if ":" in args.ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.5)
        sock.sendto(query, (args.ip, 53))
        data, _ = sock.recvfrom(2048)
    count = struct.unpack("!H", data[6:8])[0]
    return {"answers": count, "address": socket.inet_ntoa(data[-4:]) if count else None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["https", "http", "tcp", "udp", "dns", "icmp", "silent", "raw"])
    parser.add_argument("--host", default="")
    parser.add_argument("--ip", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sni", default=None)
    parser.add_argument("--ca", default=None)
    parser.add_argument("--proxy", default=None)
    parser.add_argument("--data", default="")
    parser.add_argument("--device", default=None, help="SO_BINDTODEVICE before connecting")
    parser.add_argument("--source", default=None, help="bind this source address before connecting")
    args = parser.parse_args()
    socket.setdefaulttimeout(TIMEOUT)
    started = time.monotonic()
    try:
        result = {"ok": True, **globals()[args.action](args)}
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
