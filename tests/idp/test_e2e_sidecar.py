"""End to end: the real `mcp` SDK client -> `outrider sidecar` (a real process) -> the real `mcp` server,
with three trusted issuers in one pod and the pod's identity from a REAL SPIRE (+ its OIDC discovery
provider, which the Entra stand-in resolves the JWT-SVID issuer through):

- Entra stand-in (JWT access tokens, on-behalf-of with the JWT-SVID as federated credential);
- Okta stand-in (opaque access tokens checked by RFC 7662 introspection, Okta token exchange);
- the dev IdP (DPoP-bound JWTs, RFC 8693 with the jwt-spiffe assertion).

The sidecar runs with DEBUG logs, OTLP export to a local receiver and an audit file; the leak guard
scans all of them (and /metrics) for every credential the test or the stand-ins handled.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator, Generator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import jwt
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import CallToolResult, TextContent

from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, WorkloadApiJwtBundles
from tests.telemetry.otlp_receiver import Received, otlp_http_receiver

from .conftest import SIDECAR_ID, LeakGuard, free_port, spire_with_oidc
from .dpop_client import DpopKey
from .standins.entra import AppRegistration, EntraStandIn, EntraUser, FederatedCredential
from .standins.okta import OktaStandIn, ServiceApp

pytestmark = [pytest.mark.spire, pytest.mark.slow]

MIDDLE = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"  # the MCP server's Entra app registration
DOWNSTREAM = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d"
OKTA_SECRET = "okta-client-secret-0123456789abcdef"
OKTA_AUDIENCE = "api://weather-mcp-okta"
CACHE_TTL_S = 5.0  # long enough that one client session's calls all fall inside it


@dataclass
class World:
    sidecar: str  # http://127.0.0.1:port
    admin: str
    entra: EntraStandIn
    okta: OktaStandIn
    devidp: DevIdP
    received: Received
    responses: list[httpx2.Response] = field(default_factory=list)

    @property
    def mcp_url(self) -> str:
        return self.sidecar + "/mcp"


class DpopAuth(httpx2.Auth):
    """An MCP client's DPoP: `Authorization: DPoP <token>` and a fresh proof on every request."""

    def __init__(self, token: str, key: DpopKey, leaks: LeakGuard) -> None:
        self.token, self.key, self.leaks = token, key, leaks

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        proof = self.key.proof(request.method, str(request.url), self.token)
        self.leaks.secret(proof)
        request.headers["Authorization"] = f"DPoP {self.token}"
        request.headers["DPoP"] = proof
        yield request


def client(world: World, token: str | None = None, auth: httpx2.Auth | None = None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    http = create_mcp_http_client(headers=headers, auth=auth)

    async def record(response: httpx2.Response) -> None:
        if response.status_code >= 400:
            await response.aread()
        world.responses.append(response)

    http.event_hooks["response"].append(record)
    return Client(streamable_http_client(world.mcp_url, http_client=http), mode="legacy")


def tool_json(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result
    if result.structured_content is not None:
        return dict(result.structured_content.get("result", result.structured_content))
    block = result.content[0]
    assert isinstance(block, TextContent)
    data: dict[str, Any] = json.loads(block.text)
    return data


async def whoami(world: World, token: str | None = None, auth: httpx2.Auth | None = None) -> dict[str, Any]:
    async with client(world, token, auth) as mcp:
        return tool_json(await mcp.call_tool("whoami", {}))


async def refused(world: World, token: str | None = None, auth: httpx2.Auth | None = None) -> httpx2.Response:
    """Call, expect the sidecar to refuse; the refusal as the client's HTTP layer saw it."""
    world.responses.clear()
    with pytest.raises(Exception):
        await whoami(world, token, auth)
    failures = [r for r in world.responses if r.status_code >= 400]
    assert failures, [r.status_code for r in world.responses]
    return failures[0]


def downstream_claims(who: dict[str, Any]) -> dict[str, Any]:
    authorization = who["authorization"]
    assert authorization.startswith("Bearer ")
    claims: dict[str, Any] = jwt.decode(authorization[7:], options={"verify_signature": False})
    return claims


@pytest.fixture
async def world(tmp_path: Path, leaks: LeakGuard) -> AsyncIterator[World]:
    async with AsyncExitStack() as stack:
        spire, oidc = await stack.enter_async_context(spire_with_oidc())
        endpoint, received = await stack.enter_async_context(otlp_http_receiver())
        entra = await stack.enter_async_context(
            EntraStandIn(
                apps=[
                    AppRegistration(
                        MIDDLE,
                        "api://weather-mcp",
                        federated=(FederatedCredential(issuer=oidc.url, subject=SIDECAR_ID),),
                        permissions={"api://downstream": ("Data.Read",)},
                    ),
                    AppRegistration(DOWNSTREAM, "api://downstream", scopes=("Data.Read",)),
                ],
                users=[
                    EntraUser("alice", "oid-alice"),
                    EntraUser("carol", "oid-carol", mfa_policy="ca-policy-mfa"),
                    EntraUser("dave", "oid-dave", must_enrol=True),
                ],
                seen=leaks.secret,
            )
        )
        okta = await stack.enter_async_context(
            OktaStandIn(
                apps=[
                    ServiceApp(
                        "0oa-weather", secret=OKTA_SECRET, grants={"api://downstream": ("downstream.read",)}
                    )
                ],
                seen=leaks.secret,
            )
        )
        leaks.secret(OKTA_SECRET)
        devidp = await stack.enter_async_context(
            DevIdP(
                clients=[
                    ClientRegistration(
                        "weather-mcp", spiffe_ids=(SIDECAR_ID,), audiences=("https://api.example.com",)
                    )
                ],
                spiffe_bundles=WorkloadApiJwtBundles(spire.agent_socket_uri),
            )
        )
        app = await stack.enter_async_context(mcp_server.running(0, "streamable"))
        secret_file = tmp_path / "okta-secret"
        secret_file.write_text(OKTA_SECRET + "\n")
        port, admin_port = free_port(), free_port()
        public = f"http://127.0.0.1:{port}"
        config = {
            "identity": {"socket": spire.agent_socket_uri},
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "egress": {"mode": "explicit", "port": free_port(), "policy_file": None},
            "telemetry": {"audit": str(tmp_path / "audit.jsonl")},
            "inbound": {
                "host": "127.0.0.1",
                "port": port,
                "mcp_port": app.port,
                "resource": public + "/mcp",
                "public_url": public,
                "issuers": [
                    {
                        "issuer": entra.issuer,
                        "audience": MIDDLE,
                        "exchange": {
                            "profile": "entra-obo",
                            "token_endpoint": entra.token_endpoint,
                            "client_id": MIDDLE,
                            "scope": "api://downstream/.default",
                        },
                    },
                    {
                        "issuer": okta.issuer,
                        "audience": OKTA_AUDIENCE,
                        "introspection": {
                            "endpoint": okta.endpoint("introspect"),
                            "auth": "client-secret",
                            "client_id": "0oa-weather",
                            "client_secret_file": str(secret_file),
                            "cache_ttl_s": CACHE_TTL_S,
                        },
                        "exchange": {
                            "profile": "okta",
                            "token_endpoint": okta.token_endpoint,
                            "client_id": "0oa-weather",
                            "auth": "client-secret",
                            "client_secret_file": str(secret_file),
                            "audience": "api://downstream",
                            "scope": "downstream.read",
                        },
                    },
                    {
                        "issuer": devidp.issuer,
                        "exchange": {
                            "token_endpoint": devidp.token_endpoint,
                            "issuer": devidp.issuer,
                            "audience": "https://api.example.com",
                        },
                    },
                ],
            },
        }
        config_path = tmp_path / "sidecar.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = tmp_path / "sidecar.log"
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
        }
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "outrider"), "sidecar", "--config", str(config_path),
                "--log-level", "DEBUG",
                stdout=log_file, stderr=log_file, env=env,
            )  # fmt: skip

        async def stop() -> None:
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)

        stack.push_async_callback(stop)
        admin = f"http://127.0.0.1:{admin_port}"
        async with aiohttp.ClientSession() as session:
            for _ in range(600):
                assert proc.returncode is None, log_path.read_text()[-3000:]
                try:
                    async with session.get(admin + "/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("sidecar never ready:\n" + log_path.read_text()[-3000:])
        world = World(public, admin, entra, okta, devidp, received)
        metrics: list[str] = []

        async def scrape() -> None:
            async with aiohttp.ClientSession() as session, session.get(admin + "/metrics") as response:
                metrics.append(await response.text())

        leaks.output("sidecar log (DEBUG)", log_path.read_text)
        leaks.output("audit log", lambda: (tmp_path / "audit.jsonl").read_text())
        leaks.output("OTLP payloads", lambda: b"".join(received.raw))
        leaks.output("/metrics", lambda: "".join(metrics))
        yield world
        await scrape()
        await stop()
        assert received.raw, "the sidecar exported no telemetry: the leak check would be empty"


async def test_entra_on_behalf_of_names_the_user(world: World) -> None:
    alice = world.entra.sign_in("alice", client_id=MIDDLE)
    who = await whoami(world, alice)
    claims = downstream_claims(who)
    assert (claims["iss"], claims["aud"], claims["oid"], claims["azp"]) == (
        world.entra.issuer,
        DOWNSTREAM,
        "oid-alice",
        MIDDLE,
    )
    assert alice not in json.dumps(who)  # the caller's token never reaches the MCP server
    assert world.okta.requests["token"] == 0 and world.devidp.stats.exchange_requests == 0


async def test_conditional_access_reaches_the_client_as_a_step_up(world: World) -> None:
    response = await refused(world, world.entra.sign_in("carol", client_id=MIDDLE))
    assert response.status_code == 403
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'error="insufficient_scope"' in challenge
    claims = challenge.split('claims="', 1)[1].split('"', 1)[0]
    assert json.loads(base64.b64decode(claims)) == {
        "access_token": {"capolids": {"essential": True, "values": ["ca-policy-mfa"]}}
    }
    enrol = await refused(world, world.entra.sign_in("dave", client_id=MIDDLE))
    assert enrol.status_code == 403 and 'error="interaction_required"' in enrol.headers["WWW-Authenticate"]
    # The client steps up (signs in with MFA) and the same user is served.
    who = await whoami(world, world.entra.sign_in("carol", client_id=MIDDLE, mfa=True))
    assert downstream_claims(who)["oid"] == "oid-carol"
    app_only = await refused(world, world.entra.app_only(client_id=MIDDLE))
    assert app_only.status_code == 403 and b"app-only" in app_only.content


async def test_opaque_token_introspected_then_revoked(world: World) -> None:
    token = world.okta.opaque("alice", audience=OKTA_AUDIENCE)
    who = await whoami(world, token)
    claims = downstream_claims(who)
    assert (claims["iss"], claims["sub"], claims["aud"]) == (
        world.okta.issuer,
        "alice@example.com",
        "api://downstream",
    )
    introspections = world.okta.requests["introspect"]
    await whoami(world, token)  # within the cache bound: no second introspection
    assert world.okta.requests["introspect"] == introspections
    world.okta.revoke(token)
    await asyncio.sleep(CACHE_TTL_S + 0.3)  # the cache bound: a revoked token stops after it
    response = await refused(world, token)
    assert response.status_code == 401 and 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    # An opaque token Okta never issued is refused too, and never exchanged anywhere.
    exchanges = world.okta.requests["token"]
    assert (await refused(world, "an-opaque-token-nobody-issued-0123456789")).status_code == 401
    assert world.okta.requests["token"] == exchanges and world.entra.requests == 0


async def test_dpop_bound_calls_need_proofs(world: World, leaks: LeakGuard) -> None:
    key = DpopKey()
    token = world.devidp.mint("erin", audience=world.mcp_url, extra={"cnf": {"jkt": key.jkt}})
    leaks.secret(token)
    who = await whoami(world, auth=DpopAuth(token, key, leaks))
    claims = downstream_claims(who)
    assert (claims["sub"], claims["iss"]) == ("erin", world.devidp.issuer)
    # Without a proof (bearer downgrade), with another key's proof: 401 with a DPoP challenge.
    no_proof = await refused(world, token)
    assert no_proof.status_code == 401 and no_proof.headers["WWW-Authenticate"].startswith("DPoP ")
    assert 'algs="' in no_proof.headers["WWW-Authenticate"]
    other = await refused(world, auth=DpopAuth(token, DpopKey(), leaks))
    assert other.status_code == 401 and "invalid_dpop_proof" in other.headers["WWW-Authenticate"]
    # The RFC 9728 metadata advertises DPoP.
    well_known = world.sidecar + "/.well-known/oauth-protected-resource/mcp"
    async with aiohttp.ClientSession() as session, session.get(well_known) as response:
        metadata = await response.json()
    assert "ES256" in metadata["dpop_signing_alg_values_supported"]
    async with aiohttp.ClientSession() as session, session.get(world.admin + "/metrics") as response:
        metrics = await response.text()
    refused_count = next(
        line for line in metrics.splitlines() if line.startswith("outrider_dpop_refused_total")
    )
    assert int(refused_count.split()[1]) >= 2
    assert set(metadata["authorization_servers"]) == {
        world.entra.issuer,
        world.okta.issuer,
        world.devidp.issuer,
    }


async def test_replayed_proof_is_refused(world: World, leaks: LeakGuard) -> None:
    key = DpopKey()
    token = world.devidp.mint("erin", audience=world.mcp_url, extra={"cnf": {"jkt": key.jkt}})
    leaks.secret(token)
    proof = key.proof("POST", world.mcp_url, token)
    leaks.secret(proof)
    headers = {
        "Authorization": f"DPoP {token}",
        "DPoP": proof,
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with aiohttp.ClientSession() as session:
        async with session.post(world.mcp_url, json=body, headers=headers) as first:
            assert first.status != 401, await first.text()
        async with session.post(world.mcp_url, json=body, headers=headers) as replay:
            assert replay.status == 401 and "replay" in await replay.text()


async def test_issuers_stay_separate(world: World) -> None:
    before = (world.entra.requests, world.okta.requests["token"], world.devidp.stats.exchange_requests)
    who = await whoami(world, world.devidp.mint("bob", audience=world.mcp_url))
    assert downstream_claims(who)["iss"] == world.devidp.issuer
    after = (world.entra.requests, world.okta.requests["token"], world.devidp.stats.exchange_requests)
    assert after == (before[0], before[1], before[2] + 1)  # exchanged at its own issuer only
    # A dev-IdP token claiming to be Entra's: judged by Entra's keys, refused, exchanged nowhere.
    forged = world.devidp.mint("mallory", audience=MIDDLE, extra={"iss": world.entra.issuer})
    assert (await refused(world, forged)).status_code == 401
    # An Entra token for another audience (the Okta issuer's) is not accepted either.
    wrong_aud = world.entra.sign_in("alice", client_id=OKTA_AUDIENCE)
    assert (await refused(world, wrong_aud)).status_code == 401
    assert (world.entra.requests, world.okta.requests["token"], world.devidp.stats.exchange_requests) == after
