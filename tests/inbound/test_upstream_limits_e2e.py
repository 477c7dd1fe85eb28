"""The proxy's connections to the MCP server are bounded, in all and per caller: the real `mcp` SDK
server behind the sidecar, GET SSE streams each holding a connection, and a clear 503 on exhaustion.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

import httpx2
import pytest

from outrider.sidecar.config import ConfigError, parse
from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.inbound.upstream_slots import UpstreamSlots

from .conftest import RESOURCE, RecordingObserver, SidecarFactory

PROTOCOL = {"MCP-Protocol-Version": "2025-06-18"}
JSON_SSE = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def rpc(method: str, i: int | None, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if i is not None:
        message["id"] = i
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}


class Caller:
    def __init__(self, http: httpx2.AsyncClient, url: str, token: str) -> None:
        self.http, self.url = http, url
        self.headers = {**JSON_SSE, **PROTOCOL, "Authorization": f"Bearer {token}"}

    async def session(self) -> str:
        response = await self.http.post(self.url, content=rpc("initialize", 1, INIT), headers=self.headers)
        assert response.status_code == 200, response.text
        sid = response.headers["mcp-session-id"]
        headers = {**self.headers, "Mcp-Session-Id": sid}
        done = await self.http.post(self.url, content=rpc("notifications/initialized", None), headers=headers)
        assert done.status_code == 202
        return sid

    async def stream(self, stack: AsyncExitStack, sid: str) -> httpx2.Response:
        """A GET SSE stream the server holds open (one upstream connection for as long as it lives)."""
        headers = {**self.headers, "Mcp-Session-Id": sid, "Accept": "text/event-stream"}
        inner = AsyncExitStack()
        response = await inner.enter_async_context(self.http.stream("GET", self.url, headers=headers))
        stack.push_async_callback(inner.aclose)
        response.extensions["close"] = inner.aclose
        return response

    async def call(self, sid: str, text: str) -> httpx2.Response:
        headers = {**self.headers, "Mcp-Session-Id": sid}
        body = rpc("tools/call", 7, {"name": "echo", "arguments": {"text": text}})
        return await self.http.post(self.url, content=body, headers=headers)


def busy(response: httpx2.Response, limit_words: str) -> None:
    assert response.status_code == 503, (response.status_code, response.text)
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert limit_words in error["message"]
    assert "Traceback" not in response.text


async def test_streams_cannot_take_every_connection_and_exhaustion_is_a_quick_503(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    observer = RecordingObserver()
    limits = {"upstream_max_connections": 3, "upstream_max_connections_per_caller": 2, "upstream_wait_s": 0.2}
    tokens = {name: idp.mint(name, audience=RESOURCE) for name in ("alice", "bob", "carol")}
    async with (
        make_sidecar(mcp_app.port, observer=observer, **limits) as sidecar,
        httpx2.AsyncClient(timeout=httpx2.Timeout(20, read=60)) as http,
        AsyncExitStack() as stack,
    ):
        alice, bob, carol = (Caller(http, sidecar.mcp_url(), tokens[n]) for n in ("alice", "bob", "carol"))
        a1, a2, a3, b1, c1 = [await c.session() for c in (alice, alice, alice, bob, carol)]
        first = await alice.stream(stack, a1)
        await alice.stream(stack, a2)
        assert first.status_code == 200
        assert sidecar.proxy.slots.held == 2
        # Alice holds her share: a third stream and even a plain call of hers are refused at once.
        third = await alice.stream(stack, a3)
        await third.aread()
        busy(third, "upstream_max_connections_per_caller")
        busy(await alice.call(a1, "more"), "upstream_max_connections_per_caller")
        # Bob is not starved by her streams.
        answered = await bob.call(b1, "hi bob")
        assert answered.status_code == 200 and "hi bob" in answered.text
        # Bob's stream takes the last connection: now nobody gets one, with a clear answer.
        await bob.stream(stack, b1)
        assert sidecar.proxy.slots.held == 3
        busy(await carol.call(c1, "hello?"), "all in use")
        # Alice closes a stream: her connection comes back and Carol gets through.
        await first.extensions["close"]()
        for _ in range(200):
            if sidecar.proxy.slots.held == 2:
                break
            await asyncio.sleep(0.02)
        assert sidecar.proxy.slots.held == 2
        answered = await carol.call(c1, "hello")
        assert answered.status_code == 200 and "hello" in answered.text
        metrics = sidecar.proxy.metrics_text().decode()
        assert "outrider_inbound_upstream_busy_total 3" in metrics
    refused = [c for c in observer.calls if c.finished and c.outcome.get("error_type") == "upstream_busy"]
    assert len(refused) == 2  # the two calls (a GET stream carries no JSON-RPC message)
    assert all(c.outcome["http_status"] == 503 for c in refused)
    assert sidecar.proxy.slots.held == 0 and not sidecar.proxy.slots.by_owner


async def test_a_waiting_call_gets_the_connection_a_closing_stream_frees(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    limits = {"upstream_max_connections": 1, "upstream_wait_s": 30}
    async with (
        make_sidecar(mcp_app.port, **limits) as sidecar,
        httpx2.AsyncClient(timeout=httpx2.Timeout(20, read=60)) as http,
        AsyncExitStack() as stack,
    ):
        alice = Caller(http, sidecar.mcp_url(), idp.mint("alice", audience=RESOURCE))
        bob = Caller(http, sidecar.mcp_url(), idp.mint("bob", audience=RESOURCE))
        a1, b1 = await alice.session(), await bob.session()
        stream = await alice.stream(stack, a1)
        waiting = asyncio.create_task(bob.call(b1, "queued"))
        for _ in range(200):
            if sidecar.proxy.slots._waiters:
                break
            await asyncio.sleep(0.02)
        assert not waiting.done() and len(sidecar.proxy.slots._waiters) == 1
        await stream.extensions["close"]()
        answered = await waiting
        assert answered.status_code == 200 and "queued" in answered.text


async def test_slots_serve_waiters_in_order_skip_capped_callers_and_never_leak() -> None:
    slots = UpstreamSlots(total=2, per_caller=1, wait_s=30)
    assert await slots.acquire("a") is None
    assert await slots.acquire("b") is None
    later_a = asyncio.create_task(slots.acquire("a"))  # capped and the pool is full
    first_c = asyncio.create_task(slots.acquire("c"))
    then_d = asyncio.create_task(slots.acquire("d"))
    await asyncio.sleep(0)
    slots.release("b")  # a is still capped: the slot goes to c, the oldest that may take it
    assert await first_c is None and not then_d.done() and not later_a.done()
    slots.release("a")  # a's own slot comes back: a (older than d) takes it
    assert await later_a is None and not then_d.done()
    then_d.cancel()  # a caller that goes away while waiting leaves nothing behind
    with pytest.raises(asyncio.CancelledError):
        await then_d
    assert slots.held == 2 and slots.by_owner == {"a": 1, "c": 1} and not slots._waiters
    quick = UpstreamSlots(total=1, per_caller=0, wait_s=0)
    assert await quick.acquire("x") is None
    assert await quick.acquire("y") == "total"
    quick.release("x")
    assert quick.held == 0 and quick.by_owner == {} and quick.refused_total == 1


@pytest.mark.parametrize(
    ("inbound", "words"),
    [
        ({"upstream_max_connections": 0}, "out of range"),
        ({"upstream_max_connections": "many"}, "not an integer"),
        ({"upstream_max_connections": True}, "out of range"),
        ({"upstream_max_connections": 10, "upstream_max_connections_per_caller": 11}, "out of range"),
        ({"upstream_wait_s": -1}, "out of range"),
        ({"upstream_wait_s": 61}, "out of range"),
    ],
)
def test_bad_connection_limits_are_named(inbound: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        parse({"inbound": {"allow_unauthenticated": True, **inbound}})
    assert "inbound.upstream_" in str(caught.value)


def test_connection_limit_defaults() -> None:
    config = parse({"inbound": {"allow_unauthenticated": True}}).inbound
    assert (config.upstream_max_connections, config.upstream_max_connections_per_caller) == (1000, 250)
    small = parse({"inbound": {"allow_unauthenticated": True, "upstream_max_connections": 10}}).inbound
    assert small.upstream_max_connections_per_caller == 10
