"""An upstream for the loopback enforcer tests: answers HTTP requests as an HTTP server would, echoing
each request (head and body as received) as the body of a `200`, and echoes anything else byte for byte.

The enforcer frames the answers of a plaintext HTTP connection, so an upstream that echoed requests
back raw would no longer be relayed; `answer_bodies` takes the echoed requests out of the answers.
"""

from __future__ import annotations

import asyncio
import re

from outrider.sidecar.egress.http1 import Head, RequestParser

_REQUEST_LINE = re.compile(rb"[A-Z]+ [^ ]+ HTTP/1\.[01]\r\n")


def _answer(request: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(request), request)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, received: list[bytes]) -> None:
    """Serve one connection; every byte read is appended to `received`."""
    parser: RequestParser | None = None
    request = b""
    first = True
    while data := await reader.read(65536):
        received.append(data)
        if first and _REQUEST_LINE.match(data):
            parser = RequestParser()  # the enforcer sends each request head whole
        first = False
        if parser is not None:
            items = parser.feed(data)
        if parser is None:
            writer.write(data)
        else:
            for item in items:
                if isinstance(item, Head) and request:
                    writer.write(_answer(request))
                    request = b""
                request += item.raw if isinstance(item, Head) else item
            if request and parser.between_requests:
                writer.write(_answer(request))
                request = b""
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


def answer_bodies(answers: bytes) -> list[bytes]:
    """The bodies of the complete `Content-Length` answers at the start of `answers`."""
    bodies: list[bytes] = []
    while True:
        end = answers.find(b"\r\n\r\n")
        if end < 0 or not answers.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: "):
            return bodies
        length = int(answers[len(b"HTTP/1.1 200 OK\r\nContent-Length: ") : end])
        body = answers[end + 4 : end + 4 + length]
        if len(body) < length:
            return bodies
        bodies.append(body)
        answers = answers[end + 4 + length :]
