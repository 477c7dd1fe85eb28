"""The same profile, introspection and DPoP checks against a REAL Keycloak, where Keycloak supports
the flow: Okta's request shape (RFC 8693, access-token subject, audience) is standard token exchange
v2 there; RFC 7662 introspection and revocation; DPoP-bound tokens (cnf.jkt) from a DPoP proof at
the token endpoint. Keycloak has no Entra-style on-behalf-of grant, so `entra-obo` is not run here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from outrider.sidecar.exchange.client import build_exchanger
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.inbound.callers import Presented, build_caller_verifier
from outrider.sidecar.inbound.config import InboundConfig
from outrider.sidecar.inbound.dpop import DpopFailure
from outrider.sidecar.inbound.introspection import Introspected, Introspector
from outrider.sidecar.inbound.issuers import IntrospectionConfig
from outrider.sidecar.telemetry.observer import Principal
from tests.exchange.keycloak import KeycloakServer, RealmLayout, Unavailable, create_outrider_realm

from .conftest import LeakGuard
from .dpop_client import DpopKey

pytestmark = [pytest.mark.keycloak, pytest.mark.slow]


@dataclass
class Keycloak:
    server: KeycloakServer
    realm: RealmLayout
    alice_id: str


@pytest.fixture(scope="module")
def keycloak() -> Iterator[Keycloak]:
    try:
        # DPoP is a default feature in 26.4 (Profile.Feature.DPOP, Type.DEFAULT): the same features as
        # tests/exchange/test_keycloak.py, so the cached distribution is not re-augmented.
        with KeycloakServer(startup_timeout=900) as server:
            realm = create_outrider_realm(server)
            yield Keycloak(server, realm, server.admin().user_id(realm.realm, "alice"))
    except Unavailable as exc:
        print(f"SKIP keycloak: {exc}")
        pytest.skip(f"Keycloak cannot run here: {exc}")


async def password_token(
    session: aiohttp.ClientSession, realm: RealmLayout, dpop: str | None = None
) -> dict[str, Any]:
    headers = {"DPoP": dpop} if dpop else {}
    form = {
        "grant_type": "password",
        "client_id": realm.cli_client,
        "username": realm.user,
        "password": realm.user_password,
        "scope": "openid",
    }
    async with session.post(realm.token_endpoint, data=form, headers=headers) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
    return answer


async def test_okta_profile_request_against_keycloak(
    keycloak: Keycloak, tmp_path: Path, leaks: LeakGuard
) -> None:
    realm = keycloak.realm
    leaks.secret(realm.secret)
    secret_file = tmp_path / "secret"
    secret_file.write_text(realm.secret)
    config = ExchangeConfig.from_mapping(
        {
            "profile": "okta",
            "token_endpoint": realm.token_endpoint,
            "audience": realm.downstream,
            "auth": "client-secret",
            "client_id": realm.secret_client,
            "client_secret_file": str(secret_file),
            "timeout_seconds": 30,
        }
    )
    async with aiohttp.ClientSession() as session:
        user = (await password_token(session, realm))["access_token"]
        leaks.secret(user)
        issued = await build_exchanger(config, _NoIdentity(), session).exchange(user)
        leaks.secret(issued.access_token)
        claims = jwt.decode(issued.access_token, options={"verify_signature": False})
        assert (claims["sub"], claims["aud"], claims["azp"]) == (
            keycloak.alice_id,
            realm.downstream,
            realm.secret_client,
        )


async def test_introspection_and_revocation_at_keycloak(
    keycloak: Keycloak, tmp_path: Path, leaks: LeakGuard
) -> None:
    realm = keycloak.realm
    leaks.secret(realm.secret)
    secret_file = tmp_path / "secret"
    secret_file.write_text(realm.secret)
    config = IntrospectionConfig(
        endpoint=f"{realm.issuer}/protocol/openid-connect/token/introspect",
        client_id=realm.secret_client,
        auth="client-secret",
        client_secret_file=str(secret_file),
        cache_ttl_s=0.5,
    )
    async with aiohttp.ClientSession() as session:
        answer = await password_token(session, realm)
        token = answer["access_token"]
        leaks.secret(token)
        leaks.secret(answer.get("refresh_token"))
        introspector = Introspector(
            config,
            issuer=realm.issuer,
            audience=realm.secret_client,
            required_scopes=(),
            leeway_s=5,
            identity=None,
            session=session,
        )
        first = await introspector.introspect(token)
        assert isinstance(first, Introspected) and first.principal.subject == keycloak.alice_id
        assert isinstance(await introspector.introspect(token), Introspected) and introspector.calls == 1
        # Revocation (RFC 7009) at Keycloak, then the cache bound: the token stops working.
        async with session.post(
            f"{realm.issuer}/protocol/openid-connect/revoke",
            data={"token": token, "token_type_hint": "access_token", "client_id": realm.cli_client},
        ) as response:
            assert response.status == 200, await response.text()
        await asyncio.sleep(0.7)
        after = await introspector.introspect(token)
        assert not isinstance(after, Introspected) and after.status == 401 and introspector.calls == 2


async def test_dpop_bound_keycloak_tokens(keycloak: Keycloak, leaks: LeakGuard) -> None:
    realm = keycloak.realm
    key = DpopKey()
    async with aiohttp.ClientSession() as session:
        proof = key.proof("POST", realm.token_endpoint, None)
        answer = await password_token(session, realm, dpop=proof)
    token = answer["access_token"]
    leaks.secret(token)
    leaks.secret(answer.get("refresh_token"))
    assert answer["token_type"].lower() == "dpop"
    assert jwt.decode(token, options={"verify_signature": False})["cnf"] == {"jkt": key.jkt}
    # The token's audience is the sidecar's client; the proofs are made for the public MCP URL.
    inbound = InboundConfig.from_mapping(
        {
            "issuer": realm.issuer,
            "resource": "https://mcp.example.com/mcp",
            "public_url": "https://mcp.example.com",
        }
    )
    inbound = replace(inbound, resource=realm.secret_client)
    async with aiohttp.ClientSession() as session:
        verifier = build_caller_verifier(inbound, session, None)
        for jwks in verifier.jwks_caches:
            await jwks.refresh(force=True)
        good = key.proof("POST", "https://mcp.example.com/mcp", token)
        leaks.secret(good)
        principal = await verifier.authenticate(Presented("dpop", token, (good,), "POST", "/mcp"))
        assert isinstance(principal, Principal) and principal.subject == keycloak.alice_id
        replayed = await verifier.authenticate(Presented("dpop", token, (good,), "POST", "/mcp"))
        assert isinstance(replayed, DpopFailure) and "replay" in replayed.description
        bearer = await verifier.authenticate(Presented("bearer", token, (), "POST", "/mcp"))
        assert isinstance(bearer, DpopFailure)
        other = DpopKey().proof("POST", "https://mcp.example.com/mcp", token)
        wrong_key = await verifier.authenticate(Presented("dpop", token, (other,), "POST", "/mcp"))
        assert isinstance(wrong_key, DpopFailure) and "another key" in wrong_key.description


class _NoIdentity:
    """Client-secret authentication needs no SVID; asking for one is a test failure."""

    async def jwt_svid(self, audience: str) -> str:
        raise AssertionError("no SVID expected with auth client-secret")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"no identity expected ({name})")
