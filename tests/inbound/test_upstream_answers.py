"""How the proxy asks the MCP server and lets go of its answers: the request coroutine itself, and
an answer read to its end left as aiohttp released it (JSON and SSE answers of the real `mcp` SDK).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import httpx2
import pytest

from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.inbound.proxy import upstream_sender

from .conftest import RESOURCE, SidecarFactory

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}


def rpc(method: str, i: int | None, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if i is not None:
        message["id"] = i
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


@pytest.mark.parametrize("mcp_app", ["stateless", "streamable"], indirect=True)
async def test_answers_are_asked_for_without_the_context_wrapper_and_not_closed_twice(
    mcp_app: mcp_server.RunningServer,
    make_sidecar: SidecarFactory,
    idp: DevIdP,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No `_RequestContextManager` per call (a typing-level call and a dropped AttributeError), and
    `close()` only for an answer not read to its end (closing a released one only marks its drained
    content as cut, through a dropped AttributeError in asyncio.isfuture): the same answers."""

    wrapped: list[str] = []  # URLs asked for through `ClientSession.request` (and its wrapper)
    original_request = aiohttp.ClientSession.request

    def request(self: aiohttp.ClientSession, method: str, url: Any, **kwargs: Any) -> Any:
        wrapped.append(str(url))
        return original_request(self, method, url, **kwargs)

    closes: list[bool] = []  # whether the answer was closed already when close() was called
    original_close = aiohttp.ClientResponse.close

    def close(self: aiohttp.ClientResponse) -> None:
        closes.append(self.closed)
        original_close(self)

    monkeypatch.setattr(aiohttp.ClientSession, "request", request)
    monkeypatch.setattr(aiohttp.ClientResponse, "close", close)
    headers = {**HEADERS, "MCP-Protocol-Version": "2025-06-18"}
    headers["Authorization"] = f"Bearer {idp.mint('alice', audience=RESOURCE)}"
    async with make_sidecar(mcp_app.port) as sidecar, httpx2.AsyncClient(timeout=20) as http:
        url = sidecar.mcp_url()
        init = await http.post(url, content=rpc("initialize", 1, INIT), headers=headers)
        assert init.status_code == 200, init.text
        if "mcp-session-id" in init.headers:
            headers["Mcp-Session-Id"] = init.headers["mcp-session-id"]
            done = await http.post(url, content=rpc("notifications/initialized", None), headers=headers)
            assert done.status_code == 202
        for i in range(3):
            body = rpc("tools/call", 10 + i, {"name": "echo", "arguments": {"text": f"hi {i}"}})
            answered = await http.post(url, content=body, headers=headers)
            assert answered.status_code == 200 and f"hi {i}" in answered.text
    assert True not in closes
    assert not [u for u in wrapped if f":{mcp_app.port}/" in u]  # (the IdP's and JWKS's may be)


async def test_the_public_request_stands_in_when_aiohttp_has_no_private_request_coroutine() -> None:
    """`ClientSession._request` is aiohttp's private name: with it the proxy awaits it; should a
    release drop or rename it, the public `request` (awaitable too) is what the proxy calls."""
    async with aiohttp.ClientSession() as session:
        assert upstream_sender(session) == session._request

    class NoPrivate:  # an aiohttp without `_request`
        def __init__(self) -> None:
            self.asked: list[str] = []

        async def request(self, method: str, url: str, **kwargs: Any) -> str:
            self.asked.append(f"{method} {url}")
            return "answer"

    class NotCallable(NoPrivate):
        _request = None

    for stand_in in (NoPrivate(), NotCallable()):
        send = upstream_sender(stand_in)  # type: ignore[arg-type]
        assert await send("POST", "http://127.0.0.1:1/mcp") == "answer"
        assert stand_in.asked == ["POST http://127.0.0.1:1/mcp"]
