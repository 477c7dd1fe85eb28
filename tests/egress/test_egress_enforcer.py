"""The enforcer on loopback (no root): relaying, half-close, back-pressure, limits, timeouts, live reload.

Connections that were not REDIRECTed take the explicit-proxy path, so CONNECT drives these tests;
a resolver stub maps the test names to 127.0.0.1 where real servers listen.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from outrider.sidecar.egress.config import EgressConfig
from outrider.sidecar.egress.enforcer import Enforcer, listen_sockets
from outrider.sidecar.egress.policy import IPAddress
from outrider.sidecar.egress.reload import PolicyHolder, spec_policy
from outrider.sidecar.telemetry.observer import EgressDecision, NullObserver

from . import http_echo

LOOPBACK = ipaddress.ip_address("127.0.0.1")


class Recorder(NullObserver):
    def __init__(self) -> None:
        self.decisions: list[EgressDecision] = []

    def egress(self, decision: EgressDecision) -> None:
        self.decisions.append(decision)


async def loopback_resolver(name: str, port: int) -> list[IPAddress]:
    if name.endswith(".test"):
        return [LOOPBACK]
    raise OSError(f"unknown name {name}")


@dataclass
class Running:
    port: int
    enforcer: Enforcer
    recorder: Recorder
    holder: PolicyHolder
    upstreams: dict[str, int] = field(default_factory=dict)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await http_echo.echo(reader, writer, [])


async def _blob(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    size = int((await reader.readline()).decode())
    chunk = bytes(range(256)) * 4096
    sent = 0
    while sent < size:
        piece = chunk[: min(len(chunk), size - sent)]
        writer.write(piece)
        await writer.drain()
        sent += len(piece)
    writer.close()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    blob = await asyncio.start_server(_blob, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    blob_port = blob.sockets[0].getsockname()[1]
    # The test names resolve to 127.0.0.1: a name may lead to loopback only where a CIDR rule allows it.
    loopback = {"cidr": "127.0.0.1/32", "ports": [echo_port, blob_port]}
    policy = {
        "allow": [f"svc.test:{echo_port}", f"blob.test:{blob_port}", f"other.test:{echo_port}", loopback]
    }
    config = EgressConfig(policy=policy, hello_timeout_s=0.3, max_tunnels=2, peek_bytes=1024, port=1)
    spec, _ = spec_policy(policy)
    holder = PolicyHolder(spec=spec, path=tmp_path / "policy.yaml")
    recorder = Recorder()
    enforcer = Enforcer(config, holder, recorder, resolver=loopback_resolver)
    listeners = listen_sockets(["127.0.0.1"], 0)
    task = asyncio.create_task(enforcer.serve(listeners))
    yield Running(
        listeners[0].getsockname()[1], enforcer, recorder, holder, {"echo": echo_port, "blob": blob_port}
    )
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    for sock in listeners:
        sock.close()
    echo.close()
    blob.close()


async def connect(
    running: Running, authority: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head


async def test_connect_relays_and_half_closes(running: Running) -> None:
    reader, writer, head = await connect(running, f"svc.test:{running.upstreams['echo']}")
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"hello ")
    writer.write(b"world")
    writer.write_eof()  # half-close: the echo must still come back, then EOF
    assert await asyncio.wait_for(reader.read(), 5) == b"hello world"
    writer.close()
    decision = running.recorder.decisions[-1]
    assert decision.allowed and decision.mode == "explicit" and decision.protocol == "connect"
    assert decision.name == "svc.test" and decision.destination_ip == "127.0.0.1"


async def test_large_transfer_is_intact(running: Running) -> None:
    size = 24 * 1024 * 1024
    reader, writer, head = await connect(running, f"blob.test:{running.upstreams['blob']}")
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(f"{size}\n".encode())
    digest = hashlib.sha256()
    received = 0
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
        digest.update(chunk)
        received += len(chunk)
        if received < size // 2:
            await asyncio.sleep(0)  # a slow reader: the relay must wait, not buffer without bound
    expected = hashlib.sha256((bytes(range(256)) * 4096) * (size // (256 * 4096))).hexdigest()
    assert received == size and digest.hexdigest() == expected
    writer.close()


async def test_denied_connect_gets_403_with_one_line_reason(running: Running) -> None:
    reader, writer, head = await connect(running, "evil.test:443")
    body = await reader.read()
    assert head.startswith(b"HTTP/1.1 403") and body.count(b"\n") == 1
    assert body.startswith(b"outrider egress: denied evil.test:443: default deny")
    writer.close()
    assert not running.recorder.decisions[-1].allowed


async def test_tunnel_limit_refuses_extra_connections(running: Running) -> None:
    held = [await connect(running, f"svc.test:{running.upstreams['echo']}") for _ in range(2)]
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once
    assert "tunnel limit" in running.recorder.decisions[-1].reason
    writer.close()
    for _, w, _ in held:
        w.close()


async def test_silent_client_times_out(running: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    answer = await asyncio.wait_for(reader.read(), 5)  # hello_timeout_s is 0.3
    assert answer.startswith(b"HTTP/1.1 400")
    writer.close()


async def test_peek_is_bounded(running: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(b"CONNECT " + b"a" * 4000)  # never ends its head; cap is 1024 bytes
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 400")
    writer.close()


async def test_absolute_uri_is_rewritten_for_the_origin(running: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    port = running.upstreams["echo"]
    writer.write(
        f"GET http://svc.test:{port}/x?y=1 HTTP/1.1\r\nHost: denied.test\r\n".encode()
        + b"Proxy-Authorization: Basic Zm9v\r\nProxy-Connection: keep-alive\r\n\r\n"
    )
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 5)
    (echoed,) = http_echo.answer_bodies(answer)  # the echo server returns what the origin got
    assert echoed.startswith(b"GET /x?y=1 HTTP/1.1\r\n")
    # The Host the origin sees is the judged URI authority, never the client's disagreeing one.
    assert f"Host: svc.test:{port}\r\n".encode() in echoed and b"denied.test" not in echoed
    assert b"Proxy-Authorization" not in echoed and b"Proxy-Connection" not in echoed
    # Proxy keep-alive is honoured towards the origin: later requests are judged one by one.
    assert b"Connection: keep-alive\r\n" in echoed
    writer.close()


async def test_reloaded_file_narrows_live(running: Running) -> None:
    assert running.holder.path is not None
    port = running.upstreams["echo"]
    running.holder.path.write_text(
        f"allow: ['other.test:{port}', 'new.test:{port}', '127.0.0.1/32:{port}']\n"
    )
    assert running.holder.check()
    _, writer, head = await connect(running, f"svc.test:{port}")
    assert head.startswith(b"HTTP/1.1 403")  # narrowed away without a restart
    writer.close()
    _, writer, head = await connect(running, f"new.test:{port}")
    assert head.startswith(b"HTTP/1.1 403")  # the file cannot add what the pod spec lacks
    writer.close()
    _, writer, head = await connect(running, f"other.test:{port}")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


def test_listen_skips_missing_family() -> None:
    sockets = listen_sockets(["127.0.0.1", "203.0.113.1"], 0)  # not a local address: skipped
    assert [s.family for s in sockets] == [socket.AF_INET]
    for sock in sockets:
        sock.close()
