"""An unchanged MCP server for Outrider's in-cluster tests: the `mcp` SDK and nothing of Outrider.

Tools: `echo`, `whoami` (the Authorization header it received and that JWT's claims, unverified:
it reports what arrived), `fetch` (HTTP GET through urllib, which honours HTTP(S)_PROXY/NO_PROXY).
Streamable HTTP on 0.0.0.0:$PORT/mcp (default 8080), as a typical containerised MCP server listens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import urllib.error
import urllib.request
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer


def decode_claims(authorization: str | None) -> dict[str, Any] | None:
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    parts = authorization[7:].strip().split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


server = MCPServer("mcp-example-server", instructions="echo, whoami, fetch")


@server.tool(description="Echo the text back.")
def echo(text: str) -> str:
    return text


@server.tool(description="Report the Authorization header this server received and its JWT claims.")
def whoami(ctx: Context) -> dict[str, Any]:
    headers = ctx.headers or {}
    authorization = headers.get("authorization")
    return {"authorization": authorization, "claims": decode_claims(authorization)}


def _get(url: str, max_bytes: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (a test tool)
            return {"status": response.status, "body": response.read(max_bytes).decode("utf-8", "replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": ""}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}


@server.tool(description="HTTP GET a URL and report the status and the start of the body.")
async def fetch(url: str, max_bytes: int = 4096) -> dict[str, Any]:
    return await asyncio.to_thread(_get, url, max_bytes)


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    app = server.streamable_http_app(host="0.0.0.0")
    uvicorn.run(app, host="0.0.0.0", port=port, log_level=os.environ.get("LOG_LEVEL", "info"))


if __name__ == "__main__":
    main()
