"""The OTLP client's own HTTP/1.1: the bytes it sends and what it reads back, held to `http.client`'s.

`OtlpHttpClient` writes its request head once and reads answers itself (`request_head`,
`read_response`): the same request bytes as `http.client` sends for the same POST, and the same
status, reason, `Retry-After` and connection reuse as `http.client` reads from the same answer.
"""

from __future__ import annotations

import http.client
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.sidecar.telemetry.otlp_http import (
    USER_AGENT,
    BadResponse,
    ExporterSettings,
    OtlpHttpClient,
    read_response,
    request_head,
)


def _sent_by_http_client(
    host: str, port: int | None, https: bool, path: str, headers: dict[str, str], body: bytes
) -> bytes:
    ours, theirs = socket.socketpair()
    connection = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(host, port)
    connection.sock = ours  # already "connected": request() writes to it
    try:
        connection.request("POST", path, body, headers)
        ours.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := theirs.recv(65536):
            data += chunk
        return data
    finally:
        ours.close()
        theirs.close()


def _sent_by_us(
    host: str, port: int | None, https: bool, path: str, headers: dict[str, str], body: bytes
) -> bytes:
    head = request_head(path, host, port, https, headers)
    assert head is not None
    return head[0] + b"%d" % len(body) + head[1] + body


HEADERS = {"content-type": "application/x-protobuf", "user-agent": USER_AGENT}


@pytest.mark.parametrize(
    ("host", "port", "https", "path", "headers"),
    [
        ("127.0.0.1", 4318, False, "/v1/traces", HEADERS),
        ("collector.example", None, False, "/v1/metrics", HEADERS),
        ("collector.example", 80, False, "/v1/metrics", HEADERS),
        ("collector.example", 443, True, "/base/v1/traces?tenant=1", HEADERS),
        ("collector.example", 8443, True, "/", {**HEADERS, "api-key": "k", "content-encoding": "gzip"}),
        ("::1", 4318, False, "/v1/traces", HEADERS),
        ("bücher.example", 4318, False, "/v1/traces", HEADERS),
        (
            "collector.example",
            4318,
            False,
            "/v1/traces",
            {**HEADERS, "host": "other", "accept-encoding": "gzip"},
        ),
        ("collector.example", 4318, False, "/v1/traces", {**HEADERS, "x-folded": "a\r\n b", "x-latin": "é"}),
    ],
)
@pytest.mark.parametrize("body", [b"", b"\x0a\x00", b"x" * 70_000])
def test_the_request_is_the_one_http_client_sends(
    host: str, port: int | None, https: bool, path: str, headers: dict[str, str], body: bytes
) -> None:
    assert _sent_by_us(host, port, https, path, headers, body) == _sent_by_http_client(
        host, port, https, path, headers, body
    )


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/traces x", HEADERS),
        ("/v1/tr\x00aces", HEADERS),
        ("/v1/träces", HEADERS),
        ("/v1/traces", {**HEADERS, "bad:name": "v"}),
        ("/v1/traces", {**HEADERS, "x-split": "a\r\nInjected: yes"}),
        ("/v1/traces", {**HEADERS, "nämé": "v"}),
    ],
)
def test_what_http_client_refuses_to_send_is_not_sent(path: str, headers: dict[str, str]) -> None:
    with pytest.raises((ValueError, http.client.HTTPException)):
        _sent_by_http_client("127.0.0.1", 4318, False, path, headers, b"x")
    assert request_head(path, "127.0.0.1", 4318, False, headers) is None


def _read_by_http_client(answer: bytes) -> tuple[int, str, str | None, bool]:
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(answer)
        theirs.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(ours, method="POST")
        response.begin()
        response.read()
        retry_after = response.getheader("retry-after")
        # (Trailing blanks are not part of a field value, RFC 9110 5.5; `retry_after_s` strips them.)
        retry_after = None if retry_after is None else retry_after.strip()
        return response.status, response.reason.strip(), retry_after, response.will_close
    finally:
        ours.close()
        theirs.close()


def _read_by_us(answer: bytes, step: int) -> tuple[int, str, str | None, bool]:
    """`read_response` with the answer arriving `step` bytes per write (then the connection left
    open: an answer it reads must end where its framing says, not at the close)."""
    ours, theirs = socket.socketpair()

    def write() -> None:
        for start in range(0, len(answer), step):
            theirs.sendall(answer[start : start + step])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        ours.settimeout(5)
        if b"content-length" not in answer.lower() and b"chunked" not in answer.lower():
            writer.join()
            theirs.shutdown(socket.SHUT_WR)  # no framing: the body ends with the connection
        response = read_response(ours)
        return response.status, response.reason, response.retry_after, response.will_close
    finally:
        writer.join()
        ours.close()
        theirs.close()


ANSWERS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 2\r\n\r\n\x0a\x00",
    b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 5\r\n\r\nbusy!",
    b"HTTP/1.1 429 Too Many Requests\r\nretry-after:  Wed, 21 Oct 2015 07:28:00 GMT \r\n"
    b"Content-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n10;ext=1\r\n"
    + b"y" * 16
    + b"\r\n0\r\nX-Trailer: 1\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 301 Moved Permanently\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx",
    b"HTTP/1.1 200 OK\r\n\r\nthe body until the close",
]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("step", [1, 7, 65536])
def test_an_answer_reads_as_http_client_reads_it(answer: bytes, step: int) -> None:
    assert _read_by_us(answer, step) == _read_by_http_client(answer)


@settings(deadline=None)  # a thread and a socket pair per example: no timing assert
@given(
    status=st.integers(200, 599),
    body=st.binary(max_size=300),
    chunked=st.booleans(),
    close=st.booleans(),
    retry_after=st.none() | st.from_regex(r"[0-9]{1,4}", fullmatch=True),
)
def test_any_framed_answer_reads_as_http_client_reads_it(
    status: int, body: bytes, chunked: bool, close: bool, retry_after: str | None
) -> None:
    head = b"HTTP/1.1 %d Some Reason\r\n" % status
    if retry_after is not None:
        head += b"Retry-After: " + retry_after.encode() + b"\r\n"
    if close:
        head += b"Connection: close\r\n"
    if chunked:
        chunks = b"".join(
            b"%x\r\n%b\r\n" % (len(body[i : i + 50]), body[i : i + 50]) for i in range(0, len(body), 50)
        )
        answer = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    else:
        answer = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    assert _read_by_us(answer, 13) == _read_by_http_client(answer)


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_a_broken_answer_is_an_error_not_a_status(answer: bytes) -> None:
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(answer)
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(BadResponse):
            read_response(ours)
    finally:
        ours.close()
        theirs.close()


def test_one_connection_carries_every_export_until_the_receiver_closes_it() -> None:
    """Kept alive across exports; a `Connection: close` answer closes it and the next export opens
    another; a connection the receiver dropped while idle is replaced at once (no failed export)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[int] = []
    requests: list[bytes] = []
    answers = [b"", b"", b"Connection: close\r\n", b"", b"drop", b""]  # the last for the retry

    def serve() -> None:
        while answers:
            conn, _ = listener.accept()
            accepted.append(len(requests))
            with conn:
                buffer = b""
                while answers:
                    while b"\r\n\r\n" not in buffer:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        buffer += chunk
                    if b"\r\n\r\n" not in buffer:
                        break
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    while len(buffer) < length:
                        buffer += conn.recv(65536)
                    requests.append(head + b"\r\n\r\n" + buffer[:length])
                    buffer = buffer[length:]
                    extra = answers.pop(0)
                    if extra == b"drop":
                        break  # closed without an answer: the client retries on a new connection
                    conn.sendall(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: 0\r\n\r\n")
                    if extra:
                        break

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = OtlpHttpClient(
        ExporterSettings.from_env("traces", {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
    )
    try:
        for i in range(5):
            assert client.export(b"\x0a\x01" + bytes([i]))
    finally:
        client.shutdown()
        listener.close()
    server.join(5)
    # Requests 0-2 on the first connection (closed by the third answer), 3-4 on the second (dropped
    # after the fifth request arrived), the fifth again on a third.
    assert accepted == [0, 3, 5]
    assert [r.rsplit(b"\r\n\r\n", 1)[1] for r in requests] == [
        b"\x0a\x01" + bytes([i]) for i in (0, 1, 2, 3, 4, 4)
    ]
