"""`python -m outrider.sidecar.dev.idp` as `make demo` runs it: discovery, the password grant, /dev/mint."""

from __future__ import annotations

import asyncio
import socket
import sys

import aiohttp
import jwt

from outrider.sidecar.dev.idp import _parse_client


def test_client_spec_parsing():
    client = _parse_client("outrider-proxy=spiffe://example.org/a,spiffe://example.org/b;audiences=x,y")
    assert client.spiffe_ids == ("spiffe://example.org/a", "spiffe://example.org/b")
    assert client.audiences == ("x", "y") and not client.public
    assert _parse_client("cli=;public").public and _parse_client("cli=;public=yes").public
    assert _parse_client("s=;secret=abc").secret == "abc"


async def test_cli_serves_discovery_and_tokens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    issuer = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outrider.sidecar.dev.idp",
        "--port",
        str(port),
        "--client",
        "demo-cli=;public",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"{issuer}/.well-known/openid-configuration") as r:
                        discovery = await r.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the dev IdP did not start")
            assert discovery["issuer"] == issuer
            assert discovery["token_endpoint"] == f"{issuer}/token"
            async with session.get(discovery["jwks_uri"]) as r:
                jwks = jwt.PyJWKSet.from_dict(await r.json())
            form = {
                "grant_type": "password",
                "username": "bob",
                "password": "bob-password",
                "client_id": "demo-cli",
                "resource": "https://mcp.example.com/mcp",
            }
            async with session.post(discovery["token_endpoint"], data=form) as r:
                assert r.status == 200
                token = (await r.json())["access_token"]
            claims = jwt.decode(
                token,
                jwks.keys[0].key,
                algorithms=["ES256"],
                audience="https://mcp.example.com/mcp",
                issuer=issuer,
            )
            assert claims["sub"] == "bob" and claims["client_id"] == "demo-cli"
            async with session.post(discovery["token_endpoint"], data={**form, "password": "nope"}) as r:
                assert r.status == 400 and (await r.json())["error"] == "invalid_grant"
            async with session.post(f"{issuer}/dev/mint", json={"sub": "alice", "expires_in": -60}) as r:
                expired = (await r.json())["access_token"]
            assert jwt.decode(expired, options={"verify_signature": False})["exp"] < claims["exp"]
    finally:
        proc.terminate()
        await proc.wait()
