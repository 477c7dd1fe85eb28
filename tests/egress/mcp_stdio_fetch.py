"""Run the PyPI `mcp-server-fetch` server over stdio with the `mcp` SDK client and call its `fetch` tool.

`python mcp_stdio_fetch.py SERVER_PYTHON URL`: the server inherits this process's environment (the
proxy variables in explicit mode); prints the tool result as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client


async def call(server_python: str, url: str) -> Any:
    params = StdioServerParameters(
        command=server_python,
        args=["-m", "mcp_server_fetch", "--allow-private-ips", "--ignore-robots-txt"],
        env=dict(os.environ),
    )
    async with Client(stdio_client(params), mode="legacy") as client:
        result = await client.call_tool("fetch", {"url": url, "raw": True})
        return result.model_dump(mode="json", by_alias=True)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(call(sys.argv[1], sys.argv[2]))))
