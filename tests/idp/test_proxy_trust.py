"""The inbound proxy with several issuers, introspection, DPoP and the Entra step-up, in process (fast
tier: the pod identity is the dev Workload API; the stand-ins authenticate the sidecar by secret).
The same flows with SPIRE and a real `outrider sidecar` process are in test_e2e_sidecar.py."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.inbound.config import InboundConfig
from outrider.sidecar.inbound.proxy import upstream_request_headers
from tests.inbound.conftest import run_sidecar

from .conftest import SIDECAR_ID, TRUST_DOMAIN, LeakGuard, free_port
from .dpop_client import DpopKey
from .standins.entra import AppRegistration, EntraStandIn, EntraUser
from .standins.okta import OktaStandIn, ServiceApp

MIDDLE = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
DOWNSTREAM = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d"
SECRET = "proxy-trust-secret-0123456789"  # a test value
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class Pod:
    url: str
    entra: EntraStandIn
    okta: OktaStandIn
    devidp: DevIdP

    async def call(self, authorization: str | None, **headers: str) -> tuple[int, dict[str, str], Any]:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "whoami", "arguments": {}},
        }
        extra = {"Authorization": authorization} if authorization else {}
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url, json=body, headers={**HEADERS, **extra, **headers}) as response,
        ):
            text = await response.text()
            return response.status, dict(response.headers), json.loads(text) if text else None


def downstream(answer: Any) -> dict[str, Any]:
    content = answer["result"]["structuredContent"]
    claims: dict[str, Any] = dict(content.get("result", content))["claims"]
    return claims


@pytest.fixture
async def pod(tmp_path: Path, leaks: LeakGuard) -> AsyncIterator[Pod]:
    leaks.secret(SECRET)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(
            DevWorkloadApi(tmp_path / "agent.sock", trust_domain=TRUST_DOMAIN, spiffe_id=SIDECAR_ID)
        )
        entra = await stack.enter_async_context(
            EntraStandIn(
                apps=[
                    AppRegistration(
                        MIDDLE,
                        "api://weather-mcp",
                        secret=SECRET,
                        permissions={"api://downstream": ("Data.Read",)},
                    ),
                    AppRegistration(DOWNSTREAM, "api://downstream"),
                ],
                users=[EntraUser("alice", "oid-alice"), EntraUser("carol", "oid-carol", mfa_policy="ca-1")],
                seen=leaks.secret,
            )
        )
        okta = await stack.enter_async_context(
            OktaStandIn(
                apps=[ServiceApp("0oa", secret=SECRET, grants={"api://downstream": ("r",)})],
                seen=leaks.secret,
            )
        )
        devidp = await stack.enter_async_context(
            DevIdP(
                clients=[
                    ClientRegistration(
                        "weather-mcp", spiffe_ids=(SIDECAR_ID,), audiences=("https://api.example.com",)
                    )
                ],
                spiffe_bundles=StaticJwtBundles({TRUST_DOMAIN: api.jwks()}),
            )
        )
        app = await stack.enter_async_context(mcp_server.running(0, "stateless"))
        port = free_port()
        public = f"http://127.0.0.1:{port}"
        secret_auth = {"auth": "client-secret", "client_secret_file": str(secret_file)}
        raw = {
            "identity": {"socket": api.target},
            "inbound": {
                "host": "127.0.0.1",
                "port": port,
                "mcp_port": app.port,
                "resource": public + "/mcp",
                "public_url": public,
                "dpop": {"nonce": False},
                "issuers": [
                    {
                        "issuer": entra.issuer,
                        "audience": MIDDLE,
                        "exchange": {
                            "profile": "entra-obo",
                            "token_endpoint": entra.token_endpoint,
                            "client_id": MIDDLE,
                            "scope": "api://downstream/.default",
                            "client_secret_method": "post",
                            **secret_auth,
                        },
                    },
                    {
                        "issuer": okta.issuer,
                        "audience": "api://mcp",
                        "introspection": {
                            "endpoint": okta.endpoint("introspect"),
                            "client_id": "0oa",
                            "cache_ttl_s": 60,
                            **secret_auth,
                        },
                        "exchange": {
                            "profile": "okta",
                            "token_endpoint": okta.token_endpoint,
                            "client_id": "0oa",
                            "audience": "api://downstream",
                            "scope": "r",
                            **secret_auth,
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
        sidecar = await stack.enter_async_context(run_sidecar(raw))
        yield Pod(sidecar.mcp_url(), entra, okta, devidp)


async def test_each_issuer_exchanges_at_its_own_idp(pod: Pod) -> None:
    status, _, answer = await pod.call("Bearer " + pod.entra.sign_in("alice", client_id=MIDDLE))
    assert status == 200, answer
    assert downstream(answer)["iss"] == pod.entra.issuer and downstream(answer)["oid"] == "oid-alice"
    status, _, answer = await pod.call("Bearer " + pod.okta.opaque("bob", audience="api://mcp"))
    assert status == 200 and downstream(answer)["iss"] == pod.okta.issuer
    assert downstream(answer)["sub"] == "bob@example.com"
    status, _, answer = await pod.call("Bearer " + pod.devidp.mint("dan", audience=pod.url))
    assert status == 200 and downstream(answer)["iss"] == pod.devidp.issuer
    assert (pod.entra.requests, pod.okta.requests["token"], pod.devidp.stats.exchange_requests) == (1, 1, 1)
    # An unknown issuer: refused without any IdP call.
    other = DevIdP()
    async with other:
        status, headers, _ = await pod.call("Bearer " + other.mint("eve", audience=pod.url))
    assert status == 401 and "untrusted issuer" in headers["WWW-Authenticate"]
    assert (pod.entra.requests, pod.okta.requests["token"], pod.devidp.stats.exchange_requests) == (1, 1, 1)


async def test_step_up_challenge_carries_the_claims(pod: Pod) -> None:
    status, headers, answer = await pod.call("Bearer " + pod.entra.sign_in("carol", client_id=MIDDLE))
    assert status == 403, answer
    challenge = headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge and "resource_metadata=" in challenge
    claims = json.loads(base64.b64decode(challenge.split('claims="')[1].split('"')[0]))
    assert claims["access_token"]["capolids"]["values"] == ["ca-1"]
    assert "Conditional Access" in answer["error"]["message"]


async def test_dpop_through_the_proxy(pod: Pod, leaks: LeakGuard) -> None:
    key = DpopKey()
    token = pod.devidp.mint("erin", audience=pod.url, extra={"cnf": {"jkt": key.jkt}})
    leaks.secret(token)

    def proof(url: str = pod.url, method: str = "POST") -> str:
        value = key.proof(method, url, token)
        leaks.secret(value)
        return value

    status, _, answer = await pod.call(f"DPoP {token}", DPoP=proof())
    assert status == 200 and downstream(answer)["sub"] == "erin"
    for authorization, extra, why in (
        (f"Bearer {token}", {}, "use the DPoP scheme"),
        (f"DPoP {token}", {}, "send a DPoP proof"),
        (f"DPoP {token}", {"DPoP": proof(pod.url.replace("/mcp", "/other"))}, "another URL"),
        (f"DPoP {token}", {"DPoP": proof(method="GET")}, "another HTTP method"),
    ):
        status, headers, _ = await pod.call(authorization, **extra)
        assert (
            status == 401
            and headers["WWW-Authenticate"].startswith("DPoP ")
            and why in headers["WWW-Authenticate"]
        )
    unbound = pod.devidp.mint("erin", audience=pod.url)
    status, _, _ = await pod.call(f"DPoP {unbound}", DPoP=proof())
    assert status == 401


def test_dpop_header_never_reaches_the_app() -> None:
    config = InboundConfig.from_mapping({"mcp_port": 9000})
    out = upstream_request_headers({"DPoP": "proof", "Authorization": "DPoP t", "X-Keep": "1"}, config)
    assert "DPoP" not in out and "Authorization" not in out and out["X-Keep"] == "1"
