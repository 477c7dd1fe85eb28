"""An egress target for the in-cluster tests (stdlib only): HTTP on 8080 answering NAME, UDP echo on 9999.

Run by the MCP example image with `python -c "$(cat)" NAME` style start-up via a ConfigMap mount.
"""

from __future__ import annotations

import http.server
import socket
import sys
import threading

NAME = sys.argv[1] if len(sys.argv) > 1 else "target"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{NAME}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def udp_echo(family: int, host: str) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, 9999))
        except OSError:
            return  # no IPv6 in this pod
        while True:
            data, peer = sock.recvfrom(2048)
            sock.sendto(NAME.encode() + b":" + data, peer)


threading.Thread(target=udp_echo, args=(socket.AF_INET, "0.0.0.0"), daemon=True).start()
if socket.has_ipv6:
    threading.Thread(target=udp_echo, args=(socket.AF_INET6, "::"), daemon=True).start()


class DualStack(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


try:
    server: http.server.ThreadingHTTPServer = DualStack(("::", 8080), Handler)
except OSError:
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler)
server.serve_forever()
