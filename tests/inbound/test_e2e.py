"""End to end: the real `mcp` SDK client -> the inbound proxy -> the real `mcp` SDK server.

Identity comes from the dev Workload API through the real identity client; tokens from the dev IdP,
exchanged with RFC 8693 by the real exchange client.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import aiohttp
import pytest
from mcp_types import CallToolResult, TextContent

from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP

from .conftest import (
    DOWNSTREAM,
    RESOURCE,
    SIDECAR_ID,
    SidecarFactory,
    legacy_sse_client,
    streamable_client,
)


def tool_json(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result
    if result.structured_content is not None:
        content = result.structured_content
        return dict(content.get("result", content))
    block = result.content[0]
    assert isinstance(block, TextContent)
    data: dict[str, Any] = json.loads(block.text)
    return data


def assert_exchanged(who: dict[str, Any], caller_token: str, idp: DevIdP) -> None:
    authorization = who["authorization"]
    assert authorization is not None and authorization.startswith("Bearer ")
    received = authorization.removeprefix("Bearer ")
    assert received != caller_token, "the caller's own token reached the MCP server"
    claims = idp.verify(received, audience=DOWNSTREAM)  # signed by the IdP, for the downstream API
    assert claims["sub"] == "alice"
    assert claims["aud"] == DOWNSTREAM
    assert claims["act"]["sub"] == SIDECAR_ID
    assert who["claims"]["aud"] == DOWNSTREAM


@pytest.mark.parametrize("mcp_app", ["streamable", "json"], indirect=True)
async def test_streamable_http_lists_and_calls_tools_with_exchanged_token(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    async with make_sidecar(mcp_app.port) as sidecar, streamable_client(sidecar.mcp_url(), token) as client:
        tools = await client.list_tools()
        assert {t.name for t in tools.tools} >= {"whoami", "fetch", "echo"}
        echoed = await client.call_tool("echo", {"text": "héllo"})
        assert isinstance(echoed.content[0], TextContent) and echoed.content[0].text == "héllo"
        who = tool_json(await client.call_tool("whoami", {}))
        assert_exchanged(who, token, idp)
        assert who["host"] == f"127.0.0.1:{mcp_app.port}"
        fetched = tool_json(await client.call_tool("fetch", {"url": idp.url + "/jwks"}))
        assert fetched["status"] == 200 and idp.kid in fetched["body"]
    assert sidecar.proxy.requests_total >= 3


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_the_caller_token_is_hashed_once_per_request(
    mcp_app: mcp_server.RunningServer,
    make_sidecar: SidecarFactory,
    idp: DevIdP,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The verified-token cache and the exchange cache both key on the token's SHA-256: one digest per
    request serves both (the exchange cache key used to hash the token a second time)."""
    token = idp.mint("alice", audience=RESOURCE)
    hashed: list[bytes] = []
    sha256 = hashlib.sha256

    def counting(data: bytes = b"", **kwargs: Any) -> Any:
        hashed.append(bytes(data))
        return sha256(data, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counting)
    async with make_sidecar(mcp_app.port) as sidecar, streamable_client(sidecar.mcp_url(), token) as client:
        assert_exchanged(tool_json(await client.call_tool("whoami", {})), token, idp)
        assert_exchanged(tool_json(await client.call_tool("whoami", {})), token, idp)
    assert sidecar.proxy.requests_total >= 3
    assert hashed.count(token.encode()) == sidecar.proxy.requests_total


@pytest.mark.parametrize("mcp_app", ["stateless"], indirect=True)
async def test_stateless_revision_through_the_proxy(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    async with (
        make_sidecar(mcp_app.port) as sidecar,
        streamable_client(sidecar.mcp_url(), token, mode="2026-07-28") as client,
    ):
        assert client.protocol_version == "2026-07-28"
        who = tool_json(await client.call_tool("whoami", {}))
        assert_exchanged(who, token, idp)
        echoed = await client.call_tool("echo", {"text": "stateless"})
        assert isinstance(echoed.content[0], TextContent) and echoed.content[0].text == "stateless"


@pytest.mark.parametrize("mcp_app", ["sse"], indirect=True)
async def test_legacy_http_sse_transport_through_the_proxy(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    async with (
        make_sidecar(mcp_app.port) as sidecar,
        legacy_sse_client(sidecar.mcp_url("/sse"), token) as client,
    ):
        tools = await client.list_tools()
        assert "whoami" in {t.name for t in tools.tools}
        who = tool_json(await client.call_tool("whoami", {}))
        assert_exchanged(who, token, idp)


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_session_lifecycle_with_delete(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {idp.mint('alice', audience=RESOURCE)}",
    }
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    async with make_sidecar(mcp_app.port) as sidecar, aiohttp.ClientSession() as session:
        async with session.post(sidecar.mcp_url(), json=initialize, headers=headers) as response:
            assert response.status == 200
            session_id = response.headers["Mcp-Session-Id"]
        headers |= {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-06-18"}
        async with session.post(sidecar.mcp_url(), json=ping, headers=headers) as response:
            assert response.status == 200 and (await response.json())["id"] == 2
        async with session.delete(sidecar.mcp_url(), headers=headers) as response:
            assert response.status == 200
        async with session.post(sidecar.mcp_url(), json=ping, headers=headers) as response:
            assert response.status == 404  # the app ended the session: DELETE went through
