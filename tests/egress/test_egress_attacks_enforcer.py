"""Red-team cases against the live enforcer on loopback: rebinding to loopback, proxy loops, idle and
slow clients, connection floods, accept failures, pipelining. Real sockets, explicit-proxy path.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from outrider.sidecar.egress.config import EgressConfig
from outrider.sidecar.egress.enforcer import Enforcer, listen_sockets
from outrider.sidecar.egress.policy import IPAddress
from outrider.sidecar.egress.reload import PolicyHolder, spec_policy

from . import http_echo
from .test_egress_attacks_parsing import hello, sni_extension
from .test_egress_enforcer import Recorder
from .test_egress_sniff import client_hello

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@dataclass
class Upstream:
    port: int
    accepted: int = 0
    received: list[bytes] = field(default_factory=list)


@dataclass
class Proxy:
    port: int
    enforcer: Enforcer
    recorder: Recorder
    echo: Upstream


async def _resolver(name: str, port: int) -> list[IPAddress]:
    if name.endswith(".test"):
        return [LOOPBACK]
    raise OSError(f"unknown name {name}")


Factory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[Factory]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(rules: Callable[[int], list[Any]], **config: Any) -> Proxy:
        echo = Upstream(0)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            echo.accepted += 1
            await http_echo.echo(reader, writer, echo.received)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        echo.port = server.sockets[0].getsockname()[1]
        policy = {"allow": rules(echo.port)}
        settings: dict[str, Any] = {"hello_timeout_s": 0.3, "peek_bytes": 1024, "port": 1, **config}
        listeners = listen_sockets(["127.0.0.1"], 0)
        port = listeners[0].getsockname()[1]
        if settings["port"] == "self":
            settings["port"] = port
        spec, errors = spec_policy(policy)
        assert not errors
        recorder = Recorder()
        enforcer = Enforcer(
            EgressConfig(policy=policy, **settings), PolicyHolder(spec, None), recorder, _resolver
        )
        task = asyncio.create_task(enforcer.serve(listeners))

        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for sock in listeners:
                sock.close()
            server.close()

        cleanups.append(stop)
        return Proxy(port, enforcer, recorder, echo)

    yield make
    for stop in cleanups:
        await stop()


async def connect(proxy: Proxy, authority: str, host: str | None = None) -> tuple[Any, Any, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {host or authority}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


async def test_a_name_that_resolves_to_loopback_is_refused(make_proxy: Factory) -> None:
    # An allowed name whose DNS an attacker controls (rebinding, a wildcard) points at 127.0.0.1: the
    # enforcer (UID 15337, never captured) would otherwise reach the pod's own ports.
    proxy = await make_proxy(lambda p: [f"rebind.test:{p}"])
    _, writer, head = await connect(proxy, f"rebind.test:{proxy.echo.port}")
    assert head.startswith(b"HTTP/1.1 502") and proxy.echo.accepted == 0
    assert "no address of rebind.test" in proxy.recorder.decisions[-1].reason
    writer.close()


async def test_unspecified_address_never_loops_back(make_proxy: Factory) -> None:
    proxy = await make_proxy(lambda p: ["0.0.0.0/0:*"])
    for target in (f"0.0.0.0:{proxy.echo.port}", f"[::]:{proxy.echo.port}"):
        _, writer, head = await connect(proxy, target)
        assert head.startswith((b"HTTP/1.1 502", b"HTTP/1.1 403")), head
        writer.close()
    assert proxy.echo.accepted == 0


async def test_connect_to_the_listener_itself_is_not_a_loop(make_proxy: Factory) -> None:
    proxy = await make_proxy(lambda p: ["127.0.0.0/8:*"], port="self")
    _, writer, head = await connect(proxy, f"127.0.0.1:{proxy.port}")
    assert head.startswith(b"HTTP/1.1 502")
    writer.close()
    await asyncio.sleep(0.05)
    assert proxy.enforcer.stats.active == 0 and len(proxy.recorder.decisions) == 1


async def test_mapped_ipv6_literal_is_judged_and_dialled_as_ipv4(make_proxy: Factory) -> None:
    proxy = await make_proxy(lambda p: [f"127.0.0.1/32:{p}"])
    reader, writer, head = await connect(proxy, f"[::ffff:127.0.0.1]:{proxy.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    assert proxy.recorder.decisions[-1].destination_ip == "127.0.0.1"
    writer.close()


async def test_ip_literal_needs_a_cidr_and_connect_host_header_is_ignored(make_proxy: Factory) -> None:
    proxy = await make_proxy(lambda p: [f"svc.test:{p}", f"127.0.0.1/32:{p}"])
    _, writer, head = await connect(proxy, f"127.0.0.2:{proxy.echo.port}")
    assert head.startswith(b"HTTP/1.1 403")
    writer.close()
    _, writer, head = await connect(proxy, f"evil.test:{proxy.echo.port}", host=f"svc.test:{proxy.echo.port}")
    assert head.startswith(b"HTTP/1.1 403")  # the CONNECT target is judged, not the Host header
    writer.close()
    assert proxy.echo.accepted == 0


async def test_idle_tunnel_is_closed_but_a_busy_one_is_not(make_proxy: Factory) -> None:
    proxy = await make_proxy(lambda p: [f"svc.test:{p}", f"127.0.0.1/32:{p}"], idle_timeout_s=0.4)
    busy_reader, busy_writer, head = await connect(proxy, f"svc.test:{proxy.echo.port}")
    idle_reader, idle_writer, _ = await connect(proxy, f"svc.test:{proxy.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    for _ in range(8):  # 1.2 s of traffic every 0.15 s: never idle
        busy_writer.write(b"x")
        assert await asyncio.wait_for(busy_reader.readexactly(1), 5) == b"x"
        await asyncio.sleep(0.15)
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # closed by the enforcer
    assert proxy.enforcer.stats.idle_closed == 1
    busy_writer.write(b"y")
    assert await asyncio.wait_for(busy_reader.readexactly(1), 5) == b"y"
    for writer in (busy_writer, idle_writer):
        writer.close()


async def test_slowloris_head_is_cut_off_at_the_deadline(make_proxy: Factory) -> None:
    proxy = await make_proxy(lambda p: [f"svc.test:{p}"])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    started = time.monotonic()
    answer = b""
    for byte in b"CONNECT svc.test:1 HTTP/1.1\r\n":  # one byte every 50 ms: each read is "in time"
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.05)
        if reader.at_eof() or len(reader._buffer):  # type: ignore[attr-defined]
            break
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 400")
    assert time.monotonic() - started < 1.2  # the 0.3 s deadline is for the whole head, not per read
    writer.close()


async def test_half_open_flood_is_bounded_and_recovers(make_proxy: Factory) -> None:
    proxy = await make_proxy(lambda p: [f"svc.test:{p}", f"127.0.0.1/32:{p}"], max_tunnels=2)
    silent = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # over the limit: closed at once
    writer.close()
    for r, w in silent:  # the silent ones are cut at hello_timeout_s, which frees their slots
        assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 400")
        w.close()
    await asyncio.sleep(0.05)
    _, writer, head = await connect(proxy, f"svc.test:{proxy.echo.port}")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    assert proxy.enforcer.stats.refused_over_limit == 1


async def test_accept_failure_does_not_stop_the_listener(
    make_proxy: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await make_proxy(lambda p: [f"svc.test:{p}", f"127.0.0.1/32:{p}"])
    loop = asyncio.get_running_loop()
    real = loop.sock_accept
    failures = [OSError(errno.EMFILE, "Too many open files")]

    async def flaky(sock: socket.socket) -> tuple[socket.socket, Any]:
        if failures:
            raise failures.pop()
        return await real(sock)

    monkeypatch.setattr(loop, "sock_accept", flaky)
    # The accept already waiting uses the real method; the one after it fails once, then recovers.
    for _ in range(2):
        _, writer, head = await connect(proxy, f"svc.test:{proxy.echo.port}")
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
    assert proxy.enforcer.stats.accept_errors == 1


async def test_pipelined_request_for_another_host_stays_on_the_pinned_upstream(make_proxy: Factory) -> None:
    proxy = await make_proxy(lambda p: [f"svc.test:{p}", f"127.0.0.1/32:{p}"])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    port = proxy.echo.port
    writer.write(
        f"GET http://svc.test:{port}/a HTTP/1.1\r\nHost: svc.test:{port}\r\n\r\n"
        f"GET http://evil.test:{port}/b HTTP/1.1\r\nHost: evil.test:{port}\r\n\r\n".encode()
    )
    writer.write_eof()
    (echoed,) = http_echo.answer_bodies(await asyncio.wait_for(reader.read(), 5))
    # Every request is judged: the second names another host, so it is never sent on this connection
    # (the client reconnects; a new connection is judged on its own). Only svc.test's upstream was dialled.
    assert echoed.startswith(b"GET /a HTTP/1.1\r\n") and b"evil.test" not in echoed
    assert b"evil.test" not in b"".join(proxy.echo.received)
    assert proxy.echo.accepted == 1
    assert [(d.name, d.allowed) for d in proxy.recorder.decisions] == [
        ("svc.test", True),
        ("evil.test", False),
    ]
    writer.close()


async def test_a_burst_of_connections_cannot_overrun_the_tunnel_limit(make_proxy: Factory) -> None:
    # Connections that wait in the kernel backlog are accepted in one go (an accept that succeeds at
    # once never yields to the loop): the limit must count them before their handlers start.
    proxy = await make_proxy(lambda p: [f"svc.test:{p}"], max_tunnels=2, hello_timeout_s=2.0)
    burst = []
    for _ in range(12):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", proxy.port))  # EINPROGRESS: completes in the backlog
        burst.append(sock)
    await asyncio.sleep(0.3)
    assert proxy.enforcer.stats.refused_over_limit == 10
    assert proxy.enforcer.stats.active == 2
    for sock in burst:
        sock.close()


async def test_a_narrowing_reload_closes_open_tunnels_it_no_longer_allows(
    make_proxy: Factory, tmp_path: Path
) -> None:
    # Without this, a tunnel opened before the narrowing would keep its access for as long as it lives.
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    second = await asyncio.start_server(echo, "127.0.0.1", 0)
    p2 = second.sockets[0].getsockname()[1]
    proxy = await make_proxy(
        lambda p: [f"svc.test:{p}", f"svc.test:{p2}", {"cidr": "127.0.0.1/32", "ports": [p, p2]}]
    )
    port = proxy.echo.port
    cut_reader, cut_writer, head = await connect(proxy, f"svc.test:{p2}")
    kept_reader, kept_writer, _ = await connect(proxy, f"svc.test:{port}")
    assert head.startswith(b"HTTP/1.1 200")
    holder = proxy.enforcer.holder
    holder.path = tmp_path / "policy.yaml"
    holder.path.write_text(f"allow: ['svc.test:{port}', '127.0.0.1/32:{port}']\n")
    assert holder.check()
    assert proxy.enforcer.revalidate() == 1
    assert await asyncio.wait_for(cut_reader.read(), 5) == b""
    kept_writer.write(b"still")
    assert await asyncio.wait_for(kept_reader.readexactly(5), 5) == b"still"
    last = proxy.recorder.decisions[-1]
    assert not last.allowed and last.destination_port == p2 and "policy narrowed" in last.reason
    for writer in (cut_writer, kept_writer):
        writer.close()
    second.close()


async def test_random_keep_alive_streams_never_carry_another_host_upstream(make_proxy: Factory) -> None:
    """Seeded random streams of absolute-URI requests (CL and chunked bodies, some of them looking like
    requests for evil.test), written in random pieces on one proxy connection, then one real request
    for evil.test and more allowed ones: the upstream gets exactly the allowed requests before it."""
    proxy = await make_proxy(lambda p: [f"svc.test:{p}", f"127.0.0.1/32:{p}"], peek_bytes=4096)
    port = proxy.echo.port
    rng = random.Random(11)
    for round_ in range(25):
        proxy.echo.received.clear()
        wire = b""
        allowed = rng.randint(0, 4)
        for i in range(allowed):
            body = rng.choice(
                [b"", b"x" * rng.randint(1, 300), f"GET http://evil.test:{port}/ HTTP/1.1\r\n\r\n".encode()]
            )
            head = f"POST http://svc.test:{port}/r{round_}-{i} HTTP/1.1\r\nHost: svc.test:{port}\r\n"
            if body and rng.random() < 0.5:
                cut = rng.randint(0, len(body))
                chunks = b"".join(b"%x;e=1\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]) if p)
                wire += (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\nT: 1\r\n\r\n"
            else:
                wire += (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        wire += f"GET http://evil.test:{port}/x HTTP/1.1\r\nHost: evil.test:{port}\r\n\r\n".encode()
        wire += f"GET http://svc.test:{port}/after HTTP/1.1\r\nHost: svc.test:{port}\r\n\r\n".encode()
        if allowed == 0:
            wire = f"GET http://svc.test:{port}/r{round_}-0 HTTP/1.1\r\n\r\n".encode() + wire
            allowed = 1
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        at = 0
        while at < len(wire):
            step = rng.randint(1, 200)
            writer.write(wire[at : at + step])
            await writer.drain()
            at += step
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        upstream = b"".join(proxy.echo.received)
        assert upstream.count(b" HTTP/1.1\r\nHost: svc.test") == allowed, (round_, upstream[:400])
        assert b"/after" not in upstream and b"evil.test:%d/x" % port not in upstream
        # Echoed = what went up, answer by answer.
        assert not upstream.startswith(b"GET http") and b"".join(http_echo.answer_bodies(answer)) == upstream


async def test_a_connect_tunnel_carries_tls_only_for_an_allowed_name(make_proxy: Factory) -> None:
    """`CONNECT svc.test:443` then a ClientHello for `evil.test`: the tunnel's IP belongs to the allowed
    name, but its front end (a CDN, a cloud load balancer) routes by SNI to its other tenants. A
    captured connection is judged by its SNI; a tunnel passed any TLS on (docs/egress.md said by
    design). Now the ClientHello is judged as a captured one is; other bytes go on as before."""
    proxy = await make_proxy(lambda p: [f"svc.test:{p}", f"other.test:{p}", f"127.0.0.1/32:{p}"])
    port = proxy.echo.port

    async def through(authority: str, first: bytes) -> bytes:
        reader, writer, head = await connect(proxy, authority)
        assert head.startswith(b"HTTP/1.1 200")
        # in two writes: the proxy waits for the whole ClientHello before it judges it
        writer.write(first[:20])
        await writer.drain()
        writer.write(first[20:])
        await writer.drain()
        echoed = b""
        try:
            while len(echoed) < len(first) and (data := await asyncio.wait_for(reader.read(65536), 5)):
                echoed += data
            return echoed
        finally:
            writer.close()

    evil = client_hello("evil.test")
    assert await through(f"svc.test:{port}", evil) == b""  # closed, nothing sent upstream
    assert (
        await through(f"svc.test:{port}", hello(sni_extension(b"svc.test"), sni_extension(b"evil.test")))
        == b""
    )
    assert proxy.echo.received == []
    refused = [d for d in proxy.recorder.decisions if not d.allowed]
    assert [(d.name, d.protocol, d.mode) for d in refused] == [
        ("evil.test", "tls", "explicit"),
        ("svc.test", "tls", "explicit"),
    ]
    assert refused[0].reason.startswith("TLS server name in a tunnel to svc.test: ")
    assert (
        refused[1].reason == "tunnel to svc.test: malformed ClientHello: more than one server_name extension"
    )
    # The tunnel's own name, another allowed name, no SNI, plain bytes, an allowed IP literal: echoed.
    for authority, first in [
        (f"svc.test:{port}", client_hello("SVC.test.")),
        (f"svc.test:{port}", client_hello("other.test")),
        (f"svc.test:{port}", client_hello(None)),
        (f"svc.test:{port}", b"SSH-2.0-OpenSSH_9.6\r\n" * 3),
        (f"127.0.0.1:{port}", evil),
    ]:
        assert await through(authority, first) == first


async def test_plaintext_http_in_a_connect_tunnel_is_judged_request_by_request(make_proxy: Factory) -> None:
    """`CONNECT svc.test:80` then `GET /` with `Host: evil.test` (at once, or after an allowed request on
    the same tunnel): a front end that routes by Host would serve another tenant. Judged as on a
    captured connection; it went through before."""
    proxy = await make_proxy(lambda p: [f"svc.test:{p}", f"127.0.0.1/32:{p}"])
    port = proxy.echo.port

    async def through(*requests: bytes) -> bytes:
        reader, writer, head = await connect(proxy, f"svc.test:{port}")
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"".join(requests))
        await writer.drain()
        answer = b""
        try:
            while data := await asyncio.wait_for(reader.read(65536), 5):
                answer += data
                echoed = http_echo.answer_bodies(answer)
                if sum(map(len, echoed)) >= sum(map(len, requests)) or b"outrider egress" in answer:
                    break
            return b"".join(http_echo.answer_bodies(answer))
        finally:
            writer.close()

    good = f"GET / HTTP/1.1\r\nHost: svc.test:{port}\r\n\r\n".encode()
    evil = f"GET / HTTP/1.1\r\nHost: evil.test:{port}\r\n\r\n".encode()
    # evil.test resolves to the tunnel's own (CIDR-allowed) address here, so it is "allowed but another
    # host": the tunnel closes unanswered (a name the policy denies gets a 403 first).
    assert await through(evil) == b""
    assert await through(good, evil) == good  # the echo of the first request, then closed
    assert await through(good) == good
    assert proxy.echo.received and all(b"evil.test" not in r for r in proxy.echo.received)
    refused = [d for d in proxy.recorder.decisions if not d.allowed]
    assert [(d.name, d.protocol, d.mode) for d in refused] == [("evil.test", "http", "explicit")] * 2
    assert refused[0].reason == "evil.test on a connection opened for another host"
