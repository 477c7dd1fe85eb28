"""Call one tool of an MCP server over streamable HTTP with the real `mcp` SDK client; print the result.

`python mcp_call.py http://127.0.0.1:18080/mcp fetch '{"url": "http://allowed.test/"}'`
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def call(url: str, tool: str, arguments: dict[str, Any]) -> Any:
    async with Client(streamable_http_client(url), mode="legacy") as client:
        result = await client.call_tool(tool, arguments)
        return result.model_dump(mode="json", by_alias=True)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(call(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))))
