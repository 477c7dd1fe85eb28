"""A refused request on a kept-alive plaintext HTTP connection is answered as soon as every earlier answer
has been relayed, without waiting for the upstream to close; answers the enforcer cannot frame end the
connection with an audited reason. Real sockets on loopback, the explicit-proxy path.

Each upstream here holds its connection open until the test has read everything it expects (the
`release` event): before the response framing, the refusal waited for the upstream's close, so these
tests could only end at their read deadline. They assert order and content, never a duration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from .test_egress_attacks_enforcer import Factory, Proxy, make_proxy

__all__ = ["make_proxy"]  # the fixture, used by name

# The refused request names an address no rule allows (the upstream's own loopback address is allowed by
# a CIDR rule here, so any name at it would be "allowed, but not on this connection": closed unanswered).
DENIED = b"HTTP/1.1 403 Forbidden\r\n"


@dataclass
class Scripted:
    """An HTTP upstream that reads request heads and answers each with the next scripted bytes."""

    answers: list[bytes]
    close_after: bool = False  # close after the last answer (a close-delimited one needs it)
    port: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[bytes] = field(default_factory=list)
    closed_by_upstream: bool = False


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., asyncio.Future[Scripted]]]:
    servers: list[tuple[asyncio.Server, Scripted]] = []

    async def start(answers: list[bytes], close_after: bool = False) -> Scripted:
        script = Scripted(list(answers), close_after)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while script.answers:
                    script.requests.append(await reader.readuntil(b"\r\n\r\n"))
                    writer.write(script.answers.pop(0))
                    await writer.drain()
                if not script.close_after:
                    await script.release.wait()
                script.closed_by_upstream = True
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        script.port = server.sockets[0].getsockname()[1]
        servers.append((server, script))
        return script

    yield start  # type: ignore[misc]
    for server, script in servers:
        script.release.set()
        server.close()


async def proxy_for(make_proxy: Factory, script: Scripted) -> Proxy:
    return await make_proxy(lambda _: [f"svc.test:{script.port}", f"127.0.0.1/32:{script.port}"])


def request(method: str, host: str, port: int, path: str = "/") -> bytes:
    return f"{method} http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


async def exchange(proxy: Proxy, wire: bytes, script: Scripted) -> bytes:
    """Send `wire` on one proxy connection (without closing it) and read until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(wire)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        script.release.set()
        writer.close()


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        (
            "GET",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5;ext=1;q="a;b"\r\nhello\r\n6\r\n world\r\n0;last\r\nX-Checksum: 1\r\n\r\n',
        ),
        ("GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\nETag: x\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"b" * 200000),  # moved by splice
    ],
)
async def test_a_refused_request_is_answered_right_after_the_earlier_answers(
    make_proxy: Factory, scripted: Callable[..., asyncio.Future[Scripted]], method: str, answer: bytes
) -> None:
    script = await scripted([answer])
    proxy = await proxy_for(make_proxy, script)
    wire = request(method, "svc.test", script.port) + request("GET", "127.0.0.2", script.port)
    got = await exchange(proxy, wire, script)
    # The upstream's answer, unchanged, then the refusal; the upstream had not closed meanwhile.
    assert got.startswith(answer) and got[len(answer) :].startswith(DENIED)
    assert b"denied 127.0.0.2:%d" % script.port in got[len(answer) :]
    assert len(script.requests) == 1 and not script.closed_by_upstream


async def test_pipelined_answers_stay_in_order_before_the_refusal(
    make_proxy: Factory, scripted: Callable[..., asyncio.Future[Scripted]]
) -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nthree",
    ]
    script = await scripted(answers)
    proxy = await proxy_for(make_proxy, script)
    wire = b"".join(request("GET", "svc.test", script.port, f"/{i}") for i in range(3))
    got = await exchange(proxy, wire + request("GET", "127.0.0.2", script.port), script)
    assert got.startswith(b"".join(answers)) and got[len(b"".join(answers)) :].startswith(DENIED)
    assert not script.closed_by_upstream


async def test_a_close_delimited_answer_ends_with_the_upstream_then_the_refusal_follows(
    make_proxy: Factory, scripted: Callable[..., asyncio.Future[Scripted]]
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of this until the close"
    script = await scripted([answer], close_after=True)
    proxy = await proxy_for(make_proxy, script)
    wire = request("GET", "svc.test", script.port) + request("GET", "127.0.0.2", script.port)
    got = await exchange(proxy, wire, script)
    assert got.startswith(answer) and got[len(answer) :].startswith(DENIED)


async def test_another_allowed_host_closes_right_after_the_earlier_answers(
    make_proxy: Factory, scripted: Callable[..., asyncio.Future[Scripted]]
) -> None:
    # Allowed, but not on this connection (the client reconnects): closed unanswered, at once.
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    script = await scripted([answer])
    proxy = await make_proxy(
        lambda _: [f"svc.test:{script.port}", f"other.test:{script.port}", f"127.0.0.1/32:{script.port}"]
    )
    wire = request("GET", "svc.test", script.port) + request("GET", "other.test", script.port)
    assert await exchange(proxy, wire, script) == answer
    assert not script.closed_by_upstream


@pytest.mark.parametrize(
    ("answer", "relayed", "reason"),
    [
        # A bad chunk size: what was relayed stays, then the connection is cut (no refusal after it).
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nmore",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            "malformed chunk size line",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe",
            "not ended by CRLF",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nBad Trailer\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
            "malformed trailer line",
        ),
        # An answer longer than announced: the extra bytes would be the next request's "answer".
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            "an answer to no request",
        ),
    ],
)
async def test_answers_that_cannot_be_framed_end_the_connection_with_an_audited_reason(
    make_proxy: Factory,
    scripted: Callable[..., asyncio.Future[Scripted]],
    answer: bytes,
    relayed: bytes,
    reason: str,
) -> None:
    script = await scripted([answer])
    proxy = await proxy_for(make_proxy, script)
    wire = request("GET", "svc.test", script.port) + request("GET", "127.0.0.2", script.port)
    assert await exchange(proxy, wire, script) == relayed
    last = proxy.recorder.decisions[-1]
    assert not last.allowed and last.name == "svc.test" and reason in last.reason
    assert last.reason.startswith("bad HTTP response framing from the upstream: ")


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx", "differing Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "both Content"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "101 Switching Protocols"),
    ],
)
async def test_a_bad_answer_head_gets_a_502_in_its_place(
    make_proxy: Factory, scripted: Callable[..., asyncio.Future[Scripted]], answer: bytes, reason: str
) -> None:
    script = await scripted([answer])
    proxy = await proxy_for(make_proxy, script)
    got = await exchange(proxy, request("GET", "svc.test", script.port), script)
    # Nothing of the bad answer reaches the client: the request it was for gets a clear 502.
    assert got.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and reason.encode() in got
    assert answer not in got
    assert reason in proxy.recorder.decisions[-1].reason


async def test_no_refusal_in_place_of_an_answer_the_upstream_never_sent(make_proxy: Factory) -> None:
    """The upstream answers the first of two requests and closes: the refusal of a third must not
    follow, or the client reads it as the second one's answer. It used to (the refusal went out once
    the upstream had closed, whatever it had answered); now the connection just closes."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    both = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")  # both requests read (a close with unread bytes resets)
        both.set()
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await make_proxy(lambda _: [f"svc.test:{port}", f"127.0.0.1/32:{port}"])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        request("GET", "svc.test", port, "/1")
        + request("GET", "svc.test", port, "/2")
        + request("GET", "127.0.0.2", port)
    )
    await writer.drain()
    try:
        assert await asyncio.wait_for(reader.read(), 10) == answer
    finally:
        writer.close()
        server.close()
    assert both.is_set()


async def test_a_client_that_is_done_gets_its_close_right_after_the_last_answer(
    make_proxy: Factory, scripted: Callable[..., asyncio.Future[Scripted]]
) -> None:
    """The client half-closes after its requests; the kept-alive upstream does not close on that. The
    client's EOF used to wait for the upstream's close (or `idle_timeout_s`); it now follows the last
    answer."""
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", b"HTTP/1.1 204 No Content\r\n\r\n"]
    script = await scripted(answers)
    proxy = await proxy_for(make_proxy, script)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        request("GET", "svc.test", script.port, "/1") + request("GET", "svc.test", script.port, "/2")
    )
    writer.write_eof()
    try:
        assert await asyncio.wait_for(reader.read(), 10) == b"".join(answers)
    finally:
        script.release.set()
        writer.close()
    assert not script.closed_by_upstream
