"""A plain `mcp` SDK server for tests and the demo: tools `whoami`, `fetch`, `echo` on 127.0.0.1.

Unchanged-style on purpose (the SDK's Host/Origin protection stays on): it stands for the app
image the sidecar protects. `python -m outrider.sidecar.dev.mcp_server --port 8080 --mode streamable`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

# `mcp` is a dev dependency: this module is only imported by tests, the demo and the benchmark.
from mcp.server.mcpserver import Context, MCPServer

Mode = Literal["streamable", "json", "stateless", "sse"]
MODES: tuple[Mode, ...] = ("streamable", "json", "stateless", "sse")


def decode_claims(authorization: str | None) -> dict[str, Any] | None:
    """The payload of a bearer JWT, *unverified*: this tool reports what arrived, it trusts nothing."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    parts = authorization[7:].strip().split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def build_server(name: str = "outrider-dev-mcp") -> MCPServer:
    server = MCPServer(name, instructions="Outrider's dev MCP server: whoami, fetch, echo.")

    @server.tool(description="Report the Authorization header this server received and its JWT claims.")
    def whoami(ctx: Context) -> dict[str, Any]:
        headers = ctx.headers or {}
        authorization = headers.get("authorization")
        return {
            "authorization": authorization,
            "claims": decode_claims(authorization),
            "host": headers.get("host"),
            "traceparent": headers.get("traceparent"),
        }

    @server.tool(description="Echo the text back.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="HTTP GET a URL (honours HTTP(S)_PROXY/NO_PROXY) and report status and body.")
    async def fetch(url: str, max_bytes: int = 4096) -> dict[str, Any]:
        try:
            async with (
                aiohttp.ClientSession(trust_env=True, timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.get(url) as response,
            ):
                body = await response.content.read(max_bytes)
                return {"status": response.status, "body": body.decode("utf-8", "replace")}
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return {"status": None, "error": f"{type(exc).__name__}: {exc}"}

    @server.tool(description="Pretend to delete a named item (a destructive tool for policy tests).")
    def delete(item: str) -> str:
        return f"deleted {item}"

    @server.tool(description="Sleep, then answer (for timeout tests).")
    async def sleep(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    return server


def asgi_app(server: MCPServer, mode: Mode, host: str = "127.0.0.1") -> Any:
    if mode == "sse":
        return server.sse_app(host=host)
    return server.streamable_http_app(
        host=host,
        json_response=mode in ("json", "stateless"),
        stateless_http=mode == "stateless",
    )


@dataclass(frozen=True)
class RunningServer:
    port: int
    mode: Mode

    @property
    def url(self) -> str:
        path = "/sse" if self.mode == "sse" else "/mcp"
        return f"http://127.0.0.1:{self.port}{path}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def running(
    port: int = 0,
    mode: Mode = "streamable",
    *,
    log_level: str = "warning",
    server: MCPServer | None = None,
) -> AsyncIterator[RunningServer]:
    """Serve `server` (default: `build_server()`) on 127.0.0.1 in this event loop (uvicorn) until the
    block exits."""
    import uvicorn

    port = port or free_port()
    app = asgi_app(server or build_server(), mode)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level, lifespan="on")
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve())
    try:
        while not uv.started:
            if task.done():
                task.result()
                raise RuntimeError("the dev MCP server stopped during start-up")
            await asyncio.sleep(0.01)
        yield RunningServer(port, mode)
    finally:
        uv.should_exit = True
        try:
            await asyncio.wait_for(task, 5)
        except TimeoutError:
            uv.force_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m outrider.sidecar.dev.mcp_server", description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--mode", choices=MODES, default="streamable")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    async def forever() -> None:
        async with running(args.port, args.mode, log_level=args.log_level) as srv:
            print(f"dev MCP server ({srv.mode}) on {srv.url}", flush=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(forever())
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
