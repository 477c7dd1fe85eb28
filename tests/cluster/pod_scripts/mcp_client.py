"""Runs *inside* a client pod (the MCP example image: python + the `mcp` SDK), fed on stdin by kubectl.

`python - call URL TOOL ARGS_JSON [--idp URL --user U --password P --client-id C --resource R]`
prints one JSON line: the tool result, or the error and the HTTP status. `--repeat N` calls the
tool N times in one session. `python - status URL [--token T]` prints the HTTP status of a bare
initialize POST. Tokens are never printed: only their SHA-256, so the test can compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def password_token(args: argparse.Namespace) -> str:
    form = {
        "grant_type": "password",
        "username": args.user,
        "password": args.password,
        "client_id": args.client_id,
        "resource": args.resource,
    }
    body = urllib.parse.urlencode(form).encode()
    with urllib.request.urlopen(f"{args.idp}/token", data=body, timeout=10) as response:  # noqa: S310
        return str(json.load(response)["access_token"])


async def call(url: str, tool: str, arguments: dict[str, Any], token: str | None, repeat: int) -> Any:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    headers = {"Authorization": f"Bearer {token}"} if token else None
    http = create_mcp_http_client(headers=headers)
    async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
        result = None
        for _ in range(repeat):
            result = await client.call_tool(tool, arguments)
        return result.model_dump(mode="json", by_alias=True) if result is not None else None


def status(url: str, token: str | None) -> dict[str, Any]:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "e2e", "version": "1"},
            },
        }
    ).encode()
    request = urllib.request.Request(url, data=body, method="POST")  # noqa: S310
    request.add_header("Content-Type", "application/json")
    request.add_header("Accept", "application/json, text/event-stream")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return {"status": response.status, "www_authenticate": response.headers.get("WWW-Authenticate")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "www_authenticate": exc.headers.get("WWW-Authenticate")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["call", "status"])
    parser.add_argument("url")
    parser.add_argument("tool", nargs="?", default="whoami")
    parser.add_argument("arguments", nargs="?", default="{}")
    parser.add_argument("--idp")
    parser.add_argument("--user", default="alice")
    parser.add_argument("--password", default="alice-password")
    parser.add_argument("--client-id", default="e2e-cli")
    parser.add_argument("--resource")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    out: dict[str, Any] = {}
    token = None
    try:
        if args.idp:
            token = password_token(args)
            out["subject_token_sha256"] = hashlib.sha256(token.encode()).hexdigest()
        if args.mode == "status":
            out.update(status(args.url, token))
        else:
            out["result"] = asyncio.run(
                call(args.url, args.tool, json.loads(args.arguments), token, args.repeat)
            )
            out["ok"] = True
    except BaseException as exc:  # every failure is data for the test
        status_code = getattr(getattr(exc, "response", None), "status_code", None)
        errors = getattr(exc, "exceptions", None)
        if errors:  # an ExceptionGroup from the SDK's task group: report the first leaf
            first = errors[0]
            while getattr(first, "exceptions", None):
                first = first.exceptions[0]
            status_code = status_code or getattr(getattr(first, "response", None), "status_code", None)
            exc = first
        out.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500], status=status_code)
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
