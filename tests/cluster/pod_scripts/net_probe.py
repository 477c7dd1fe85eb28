"""Runs *inside* an app container (stdlib only), fed on stdin by kubectl: one outbound attempt.

`python - http HOST PORT [--host-header NAME]`: TCP connect + HTTP GET /, report status and body.
`python - udp HOST PORT`: send one datagram, report whether a reply came back within 3 s.
`python - proxy URL`: urllib GET honouring HTTP(S)_PROXY (the explicit-proxy mode).
Prints one JSON line; never raises.
"""

from __future__ import annotations

import argparse
import json
import socket
import urllib.error
import urllib.request
from typing import Any


def http(host: str, port: int, host_header: str | None) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(8)
            sock.connect((host, port))
            name = host_header or host
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {name}:{port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}
    head, _, body = data.partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return {"connected": True, "status": code, "body": body[:200].decode("utf-8", "replace")}


def udp(host: str, port: int) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        try:
            sock.sendto(b"ping", (host, port))
            data, _ = sock.recvfrom(2048)
        except OSError as exc:
            return {"reply": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"reply": True, "data": data.decode("utf-8", "replace")}


def proxy(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
            return {"status": response.status, "body": response.read(200).decode("utf-8", "replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": ""}
    except (urllib.error.URLError, OSError) as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["http", "udp", "proxy"])
    parser.add_argument("target")
    parser.add_argument("port", nargs="?", type=int, default=80)
    parser.add_argument("--host-header")
    args = parser.parse_args()
    if args.mode == "http":
        out = http(args.target, args.port, args.host_header)
    elif args.mode == "udp":
        out = udp(args.target, args.port)
    else:
        out = proxy(args.target)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
