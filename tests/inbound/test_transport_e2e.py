"""The proxy's transport duties on real sockets: header hygiene, streaming, caps, timeouts, failures.

The upstream here is a small aiohttp app so each test controls exactly what the "MCP server" does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from outrider.sidecar.dev.idp import DevIdP

from .conftest import RESOURCE, RecordingObserver, SidecarFactory, free_port

CALL = {
    "jsonrpc": "2.0",
    "id": 3,
    "method": "tools/call",
    "params": {"name": "echo", "arguments": {"text": "x"}},
}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class Upstream:
    """A controllable stand-in for the app on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.seen_headers: list[dict[str, str]] = []
        self.release = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.stuck_requests = 0
        self.peers: set[Any] = set()

    async def echo(self, request: web.Request) -> web.Response:
        self.seen_headers.append(dict(request.headers))
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        body = await request.json()
        return web.json_response(
            {"jsonrpc": "2.0", "id": body.get("id"), "result": {"content": [], "isError": False}},
            headers={
                "Mcp-Session-Id": "s-1",
                "Connection": "X-Upstream-Secret",
                "X-Upstream-Secret": "no",
                "Set-Cookie": "app-session=for-whoever-asked; Path=/",
            },
        )

    async def batch(self, request: web.Request) -> web.Response:
        body = await request.json()
        answers = [
            {"jsonrpc": "2.0", "id": m["id"], "result": {"content": [], "isError": m["id"] == 2}}
            for m in body
            if "id" in m
        ]
        return web.json_response(answers)

    async def stuck(self, request: web.Request) -> web.Response:
        self.stuck_requests += 1
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def half_answer(self, request: web.Request) -> web.StreamResponse:
        """A JSON answer whose headers and first bytes arrive, and then nothing more."""
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "100"})
        await response.prepare(request)
        await response.write(b'{"jsonrpc":"2.0","id":3,')
        self.stuck_requests += 1
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(
                b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress"}\n\n'
            )
            await self.release.wait()  # only the test, after it got the first event, lets the answer go
            await response.write(
                b'event: message\ndata: {"jsonrpc":"2.0","id":3,"result":{"content":[]}}\n\n'
            )
            while True:  # then keep the stream open, as a GET stream would
                await asyncio.sleep(0.05)
                await response.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response

    async def legacy_sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(
            f"event: endpoint\r\ndata: http://127.0.0.1:{self.port}/messages/?session_id=abc\r\n\r\n".encode()
        )
        await self.release.wait()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    fake = Upstream()
    app = web.Application()
    app.router.add_post("/mcp", fake.echo)
    app.router.add_post("/stuck", fake.stuck)
    app.router.add_post("/half", fake.half_answer)
    app.router.add_post("/batch", fake.batch)
    app.router.add_post("/stream", fake.stream)
    app.router.add_get("/sse", fake.legacy_sse)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", fake.port).start()
    yield fake
    fake.release.set()
    await runner.cleanup()


def bearer(idp: DevIdP) -> dict[str, str]:
    return {"Authorization": f"Bearer {idp.mint('alice', audience=RESOURCE)}"}


async def test_headers_are_rewritten_and_credentials_never_forwarded(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    caller = bearer(idp)
    headers = {**ACCEPT, **caller, "Connection": "keep-alive, X-Hop", "X-Hop": "drop me", "X-Keep": "keep me"}
    headers |= {"Mcp-Session-Id": "s-0", "Last-Event-ID": "ev-7", "MCP-Protocol-Version": "2025-11-25"}
    async with (
        # Session binding off: "s-0" was never opened through this sidecar (it would be a 404).
        make_sidecar(upstream.port, sessions={"enabled": False}) as sidecar,
        aiohttp.ClientSession() as session,
        session.post(sidecar.mcp_url(), json=CALL, headers=headers) as response,
    ):
        assert response.status == 200
        assert response.headers["Mcp-Session-Id"] == "s-1"
        assert "X-Upstream-Secret" not in response.headers  # named by the app's Connection header
        assert response.headers["Set-Cookie"].startswith("app-session=")  # the caller's business
        assert (await response.json())["id"] == 3
    (seen,) = upstream.seen_headers
    assert seen["Host"] == f"127.0.0.1:{upstream.port}"
    assert seen["X-Keep"] == "keep me"
    assert (seen["Mcp-Session-Id"], seen["Last-Event-ID"]) == ("s-0", "ev-7")
    assert seen["MCP-Protocol-Version"] == "2025-11-25"
    assert "X-Hop" not in seen
    assert seen["Authorization"].startswith("Bearer ")
    assert seen["Authorization"] != caller["Authorization"]


async def test_routing_headers_must_match_the_body(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    async with make_sidecar(upstream.port) as sidecar, aiohttp.ClientSession() as session:
        for extra in ({"Mcp-Method": "tools/list"}, {"Mcp-Method": "tools/call", "Mcp-Name": "whoami"}):
            headers = {**ACCEPT, **bearer(idp), "MCP-Protocol-Version": "2026-07-28", **extra}
            async with session.post(sidecar.mcp_url(), json=CALL, headers=headers) as response:
                assert response.status == 400
                body = await response.json()
                assert body["error"]["code"] == -32020 and body["id"] == 3
        # A base64-encoded Mcp-Name that matches is fine.
        headers = {**ACCEPT, **bearer(idp), "Mcp-Method": "tools/call", "Mcp-Name": "=?base64?ZWNobw==?="}
        async with session.post(sidecar.mcp_url(), json=CALL, headers=headers) as response:
            assert response.status == 200
    assert len(upstream.seen_headers) == 1


async def test_every_repeated_routing_header_must_match_the_body(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    """A second `Mcp-Method`/`Mcp-Name` used to go unchecked: the first agreed with the body, the
    second named another call, and a router or app that reads the last value saw that one."""
    base = [*ACCEPT.items(), *bearer(idp).items(), ("MCP-Protocol-Version", "2026-07-28")]
    lying = [
        [("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/list")],
        [("Mcp-Method", "tools/call"), ("Mcp-Name", "echo"), ("Mcp-Name", "whoami")],
        [("Mcp-Method", "tools/call"), ("Mcp-Name", "echo"), ("Mcp-Name", "=?base64?d2hvYW1p?=")],
    ]
    async with make_sidecar(upstream.port) as sidecar, aiohttp.ClientSession() as session:
        for extra in lying:
            headers = CIMultiDict([*base, *extra])
            async with session.post(sidecar.mcp_url(), json=CALL, headers=headers) as response:
                assert response.status == 400, extra
                body = await response.json()
                assert body["error"]["code"] == -32020 and body["id"] == 3
                assert "header does not match" in body["error"]["message"]
        assert upstream.seen_headers == []  # none of them reached the app
        # Repeated values that all agree (one of them base64-encoded) are fine.
        agreeing = [("Mcp-Method", "tools/call"), ("Mcp-Name", "echo"), ("Mcp-Name", "=?base64?ZWNobw==?=")]
        async with session.post(
            sidecar.mcp_url(), json=CALL, headers=CIMultiDict([*base, *agreeing])
        ) as response:
            assert response.status == 200
    assert len(upstream.seen_headers) == 1


async def test_oversized_body_is_refused_with_413(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    big = {**CALL, "params": {"name": "echo", "arguments": {"text": "x" * 8000}}}
    async with (
        make_sidecar(upstream.port, max_body_bytes=4096) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(sidecar.mcp_url(), json=big, headers={**ACCEPT, **bearer(idp)}) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == -32600

        # Chunked (no Content-Length) is capped as well.
        async def chunks() -> AsyncIterator[bytes]:
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        async with session.post(
            sidecar.mcp_url(), data=chunks(), headers={**ACCEPT, **bearer(idp)}
        ) as response:
            assert response.status == 413
    assert upstream.seen_headers == []


async def test_upstream_down_is_502_and_stuck_upstream_is_504(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    observer = RecordingObserver()
    async with (
        make_sidecar(free_port(), observer=observer) as sidecar,
        aiohttp.ClientSession() as session,
        session.post(sidecar.mcp_url(), json=CALL, headers={**ACCEPT, **bearer(idp)}) as response,
    ):
        assert response.status == 502
        body = await response.json()
        assert body["id"] == 3 and body["error"]["code"] == -32603
    assert observer.calls[-1].outcome["error_type"] == "upstream_unreachable"
    async with (
        make_sidecar(upstream.port, observer=observer, upstream_timeout_s=0.3) as sidecar,
        aiohttp.ClientSession() as session,
        session.post(sidecar.url + "/stuck", json=CALL, headers={**ACCEPT, **bearer(idp)}) as response,
    ):
        assert response.status == 504
        assert (await response.json())["error"]["message"] == "the MCP server did not answer in time"
    assert upstream.stuck_requests == 1
    assert observer.calls[-1].outcome["error_type"] == "timeout"


async def test_json_answer_stalled_after_its_headers_is_504(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    # A complete answer is read without a timer; one still arriving keeps `upstream_timeout_s`.
    observer = RecordingObserver()
    async with (
        make_sidecar(upstream.port, observer=observer, upstream_timeout_s=0.3) as sidecar,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(
            sidecar.url + "/half", json=CALL, headers={**ACCEPT, **bearer(idp)}
        ) as response:
            assert response.status == 504
            body = await response.json()
        assert body["error"]["message"] == "the MCP server did not finish its answer in time"
        assert body["id"] == 3
        async with session.post(sidecar.mcp_url(), json=CALL, headers={**ACCEPT, **bearer(idp)}) as response:
            assert response.status == 200  # and a whole answer still goes through
    assert upstream.stuck_requests == 1
    assert observer.calls[0].outcome["error_type"] == "timeout"


async def test_sse_is_streamed_unbuffered_and_client_disconnect_closes_upstream(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    observer = RecordingObserver()
    async with make_sidecar(upstream.port, observer=observer) as sidecar, aiohttp.ClientSession() as session:
        response = await session.post(sidecar.url + "/stream", json=CALL, headers={**ACCEPT, **bearer(idp)})
        assert response.headers["Content-Type"].startswith("text/event-stream")
        # The first event arrives while the app still holds the answer: nothing is buffered.
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
        assert b"notifications/progress" in first
        upstream.release.set()
        second = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
        assert b'"id":3' in second
        response.close()  # the client goes away mid-stream
        await asyncio.wait_for(upstream.disconnected.wait(), 10)
        for _ in range(200):
            if observer.calls and observer.calls[-1].closed:
                break
            await asyncio.sleep(0.02)
    (call,) = observer.calls
    # The answer was seen in the stream, so the call itself succeeded.
    assert call.outcome["outcome"] == "ok"
    assert call.outcome["response"].id == 3


async def test_legacy_endpoint_event_points_back_through_the_proxy(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    async with (
        make_sidecar(upstream.port) as sidecar,
        aiohttp.ClientSession() as session,
        session.get(sidecar.url + "/sse", headers={"Accept": "text/event-stream", **bearer(idp)}) as resp,
    ):
        event = await asyncio.wait_for(resp.content.readuntil(b"\r\n\r\n"), 10)
        upstream.release.set()
    assert event == b"event: endpoint\r\ndata: /messages/?session_id=abc\r\n\r\n"


async def test_exchange_failure_is_a_token_free_json_rpc_error(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    observer = RecordingObserver()
    async with make_sidecar(upstream.port, observer=observer) as sidecar, aiohttp.ClientSession() as session:
        caller = bearer(idp)
        await idp.go_down()  # signing keys are cached already; the token endpoint is gone
        async with session.post(sidecar.mcp_url(), json=CALL, headers={**ACCEPT, **caller}) as response:
            status = response.status
            body: dict[str, Any] = await response.json()
    assert status in (502, 503, 504)
    assert body["id"] == 3 and body["error"]["message"].startswith("token exchange failed:")
    assert caller["Authorization"][7:] not in json.dumps(body)
    (call,) = observer.calls
    assert call.principal.subject == "alice"
    assert call.exchanges and call.exchanges[0].outcome == "idp_unavailable"
    assert call.outcome["outcome"] == "error"
    assert upstream.seen_headers == []


async def test_unparseable_body_is_400_after_authentication(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    async with make_sidecar(upstream.port) as sidecar, aiohttp.ClientSession() as session:
        async with session.post(
            sidecar.mcp_url(), data=b"{nope", headers={**ACCEPT, **bearer(idp)}
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == -32700
        async with session.post(sidecar.mcp_url(), data=b"{nope", headers=ACCEPT) as response:
            assert response.status == 401
    assert upstream.seen_headers == []


async def test_batches_get_one_record_per_message(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    observer = RecordingObserver()
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "fetch"}},
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 0}},
    ]
    async with (
        make_sidecar(upstream.port, observer=observer) as sidecar,
        aiohttp.ClientSession() as session,
        session.post(sidecar.url + "/batch", json=batch, headers={**ACCEPT, **bearer(idp)}) as response,
    ):
        assert response.status == 200
        assert [a["id"] for a in await response.json()] == [1, 2]
    echo, fetch, note = observer.calls
    assert (echo.message.tool_name, echo.outcome["outcome"]) == ("echo", "ok")
    assert (fetch.message.tool_name, fetch.outcome["outcome"]) == ("fetch", "tool_error")
    assert note.message.kind == "notification" and note.outcome["outcome"] == "ok"
    assert all(c.principal.subject == "alice" and c.injected for c in observer.calls)


async def test_silent_sse_stream_is_closed_after_the_idle_timeout(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    observer = RecordingObserver()
    async with (
        make_sidecar(upstream.port, observer=observer, sse_idle_timeout_s=0.3) as sidecar,
        aiohttp.ClientSession() as session,
        session.post(sidecar.url + "/stream", json=CALL, headers={**ACCEPT, **bearer(idp)}) as response,
    ):
        # The app sends one event and then nothing: the proxy ends the stream instead of hanging.
        data = await asyncio.wait_for(response.content.read(), 10)
        assert b"notifications/progress" in data and b'"id":3' not in data
        await asyncio.wait_for(upstream.disconnected.wait(), 10)
    (call,) = observer.calls
    assert call.outcome["outcome"] == "error" and call.outcome["error_type"] == "timeout"


async def test_client_leaving_during_a_json_call_ends_the_record(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    observer = RecordingObserver()
    async with make_sidecar(upstream.port, observer=observer) as sidecar, aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(
            session.post(sidecar.url + "/stuck", json=CALL, headers={**ACCEPT, **bearer(idp)})
        )
        for _ in range(500):
            if upstream.stuck_requests:
                break
            await asyncio.sleep(0.02)
        request.cancel()  # the client gives up while the app is still working
        for _ in range(500):
            if observer.calls and observer.calls[-1].closed:
                break
            await asyncio.sleep(0.02)
    (call,) = observer.calls
    assert call.outcome["error_type"] == "client_disconnected" and call.outcome["http_status"] == 499


async def test_upstream_connections_are_reused(
    upstream: Upstream, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    async with make_sidecar(upstream.port) as sidecar, aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.post(
                sidecar.mcp_url(), json=CALL, headers={**ACCEPT, **bearer(idp)}
            ) as response:
                assert response.status == 200
    assert len(upstream.seen_headers) == 5
    # The proxy never replays an app cookie by itself (it keeps no cookie jar).
    assert all("Cookie" not in seen for seen in upstream.seen_headers)
    assert len(upstream.peers) == 1  # one keep-alive connection from the proxy to the app
