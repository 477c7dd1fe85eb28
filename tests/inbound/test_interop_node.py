"""Real clients and servers the proxy was not written against: the official TypeScript MCP SDK client
and `@modelcontextprotocol/server-everything` (npm), through the sidecar over streamable HTTP.

npm installs both (pinned) into `~/.cache/outrider/`; the tests skip, saying why, only when npm or
the registry is unreachable.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp_types import TextContent

from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP

from .conftest import RESOURCE, SidecarFactory, free_port, streamable_client
from .test_e2e import assert_exchanged

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SDK_VERSION = "1.32.2"
EVERYTHING_VERSION = "2026.8.31"
CACHE = Path.home() / ".cache" / "outrider" / f"npm-mcp-sdk{SDK_VERSION}-everything{EVERYTHING_VERSION}"
CLIENT_SCRIPT = Path(__file__).parent / "node" / "ts_client.mjs"


@pytest.fixture(scope="session")
def npm_cache() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm are not installed: cannot run the TypeScript SDK interop tests")
    ready = CACHE / "node_modules" / "@modelcontextprotocol" / "server-everything" / "package.json"
    if not ready.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(CACHE),
                "--no-audit",
                "--no-fund",
                f"@modelcontextprotocol/sdk@{SDK_VERSION}",
                f"@modelcontextprotocol/server-everything@{EVERYTHING_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0 or not ready.exists():
            reason = f"npm could not install the MCP TypeScript packages: {result.stderr.strip()[-400:]}"
            print(reason)
            pytest.skip(reason)
    # Next to node_modules, so the script's bare imports resolve to the pinned SDK.
    shutil.copy(CLIENT_SCRIPT, CACHE / "ts_client.mjs")
    return CACHE


async def ts_client(cache: Path, url: str, token: str | None, tool: str, arguments: dict[str, Any]) -> Any:
    process = await asyncio.create_subprocess_exec(
        "node",
        str(cache / "ts_client.mjs"),
        url,
        token or "-",
        tool,
        json.dumps(arguments),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    lines = stdout.decode().strip().splitlines()
    assert lines, f"ts client printed nothing; stderr: {stderr.decode()[-2000:]}"
    return json.loads(lines[-1])


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
async def everything(npm_cache: Path, tmp_path: Path) -> AsyncIterator[int]:
    """`server-everything streamableHttp` on its own port (its CLI takes the port from `PORT`)."""
    port = free_port()
    entry = npm_cache / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
    log = (tmp_path / "everything.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        "node", str(entry), "streamableHttp", env={**os.environ, "PORT": str(port)}, stdout=log, stderr=log
    )
    try:
        for _ in range(300):
            if await asyncio.to_thread(_port_open, port):
                break
            assert process.returncode is None, (tmp_path / "everything.log").read_text()
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(
                "server-everything did not start: " + (tmp_path / "everything.log").read_text()
            )
        yield port
    finally:
        process.terminate()
        await process.wait()
        log.close()


async def test_typescript_client_through_the_sidecar_gets_the_exchanged_token(
    npm_cache: Path, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    async with mcp_server.running(0, "streamable") as app, make_sidecar(app.port) as sidecar:
        answer = await ts_client(npm_cache, sidecar.mcp_url(), token, "whoami", {})
        assert "error" not in answer, answer
        assert {"whoami", "echo", "fetch"} <= set(answer["tools"])
        assert answer["session"]  # Mcp-Session-Id made it through both ways
        result = answer["result"]
        assert not result.get("isError")
        who = result.get("structuredContent") or json.loads(result["content"][0]["text"])
        assert_exchanged(who.get("result", who), token, idp)
        # Without a token, the TypeScript client sees the 401 (and no tool runs).
        refused = await ts_client(npm_cache, sidecar.mcp_url(), None, "echo", {"text": "x"})
        assert refused.get("code") == 401 and "authentication required" in refused["error"], refused


async def test_typescript_client_and_server_everything_through_the_sidecar(
    npm_cache: Path, everything: int, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    async with make_sidecar(everything) as sidecar:
        answer = await ts_client(npm_cache, sidecar.mcp_url(), token, "echo", {"message": "héllo"})
    assert "error" not in answer, answer
    assert "everything" in answer["server"]["name"]
    assert {"echo", "get-sum"} <= set(answer["tools"])
    assert answer["result"]["content"][0]["text"] == "Echo: héllo"


async def test_python_client_and_server_everything_through_the_sidecar(
    everything: int, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    async with (
        make_sidecar(everything) as sidecar,
        streamable_client(sidecar.mcp_url(), token) as client,
    ):
        tools = await client.list_tools()
        assert {"echo", "get-sum"} <= {t.name for t in tools.tools}
        result = await client.call_tool("get-sum", {"a": 2, "b": 40})
        assert not result.is_error
        block = result.content[0]
        assert isinstance(block, TextContent) and "42" in block.text
