"""A raw-socket HTTP/1.1 client for the keep-alive tests: many requests on ONE connection.

`keepalive_client.py IP PORT MODE REQUESTS_JSON`; MODE `sequential` sends a request, reads its answer,
then the next; `pipelined` sends them all at once, then reads. A request is a string, or a pair
[head, body] sent as `Expect: 100-continue` does (the body only after a 100). Prints one JSON line:
the answers (status, body) in order and whether the connection was closed by the other side.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from typing import Any

TIMEOUT = 10.0


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.closed = False

    def _more(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False  # still open, nothing more said
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.buffer += data
        return True

    def response(self) -> dict[str, Any] | None:
        """One final answer (1xx skipped unless `interim`), or None when the connection closed first."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._more():
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not self._more():
                break
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return {"status": status, "body": body.decode("utf-8", "replace")}


def expand(text: str) -> str:
    """`<<BIG:n>>` stands for n bytes of `x` (argv cannot carry large bodies)."""
    return re.sub(r"<<BIG:(\d+)>>", lambda m: "x" * int(m.group(1)), text)


def main() -> int:
    ip, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    raw_requests = [
        [expand(part) for part in r] if isinstance(r, list) else expand(r) for r in json.loads(sys.argv[4])
    ]
    answers: list[dict[str, Any]] = []
    with socket.create_connection((ip, port), timeout=TIMEOUT) as sock:
        conn = Conn(sock)
        if mode == "pipelined":
            sock.sendall(b"".join(r.encode("latin-1") for r in raw_requests))
            while (answer := conn.response()) is not None:
                answers.append(answer)
        else:
            for request in raw_requests:
                try:
                    if isinstance(request, list):
                        sock.sendall(request[0].encode("latin-1"))
                        interim = conn.response()
                        if interim is None:
                            break
                        if interim["status"] != 100:
                            answers.append(interim)
                            break
                        sock.sendall(request[1].encode("latin-1"))
                    else:
                        sock.sendall(request.encode("latin-1"))
                except (BrokenPipeError, ConnectionResetError):
                    conn.closed = True
                    break
                answer = conn.response()
                if answer is None:
                    break
                answers.append(answer)
            if not conn.closed:
                sock.settimeout(0.5)
                conn._more()
    print(json.dumps({"answers": answers, "closed": conn.closed}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
