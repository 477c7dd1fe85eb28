"""Interop with a real IdP: the sidecar's exchanger against Keycloak's standard token exchange (v2),
authenticated with a client secret and with a JWT-SVID (`jwt-spiffe`, Keycloak's preview feature).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import jwt
import pytest

from outrider.sidecar.exchange import ExchangeError
from outrider.sidecar.exchange.client import build_exchanger
from outrider.sidecar.exchange.config import ExchangeConfig

from .keycloak import KeycloakServer, RealmLayout, Unavailable, create_outrider_realm
from .spiffe_fakes import SIDECAR_ID, FakeIdentity, SpiffeAuthority

pytestmark = [pytest.mark.keycloak, pytest.mark.slow]


@dataclass
class KeycloakWorld:
    server: KeycloakServer
    realm: RealmLayout
    authority: SpiffeAuthority
    alice_id: str


def _bundle_endpoint(authority: SpiffeAuthority) -> ThreadingHTTPServer:
    """A SPIFFE bundle endpoint (https_web profile, plain HTTP on loopback for the test)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            doc = authority.jwks
            doc["spiffe_refresh_hint"] = 60
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="session")
def keycloak() -> Iterator[KeycloakWorld]:
    """One Keycloak per test session (start-up takes ~30-60 s on two cores)."""
    authority = SpiffeAuthority()
    bundle = _bundle_endpoint(authority)
    try:
        with KeycloakServer() as server:
            realm = create_outrider_realm(
                server,
                spiffe_id=SIDECAR_ID,
                bundle_endpoint=f"http://127.0.0.1:{bundle.server_address[1]}/bundle",
            )
            alice_id = server.admin().user_id(realm.realm, "alice")
            yield KeycloakWorld(server, realm, authority, alice_id)
    except Unavailable as exc:
        print(f"SKIP keycloak: {exc}")
        pytest.skip(f"Keycloak cannot run here: {exc}")
    finally:
        bundle.shutdown()


async def alice_token(session: aiohttp.ClientSession, realm: RealmLayout) -> str:
    async with session.post(
        realm.token_endpoint,
        data={
            "grant_type": "password",
            "client_id": realm.cli_client,
            "username": realm.user,
            "password": realm.user_password,
            "scope": "openid",
        },
    ) as response:
        assert response.status == 200, await response.text()
        token = (await response.json())["access_token"]
    assert isinstance(token, str)
    return token


async def verified_claims(session: aiohttp.ClientSession, realm: RealmLayout, token: str) -> dict:
    async with session.get(f"{realm.issuer}/protocol/openid-connect/certs") as response:
        jwks = jwt.PyJWKSet.from_dict(await response.json())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    return jwt.decode(token, key.key, algorithms=["RS256"], audience=realm.downstream, issuer=realm.issuer)


async def test_keycloak_exchange_with_client_secret(keycloak, tmp_path):
    realm = keycloak.realm
    secret_file = tmp_path / "secret"
    secret_file.write_text(realm.secret)
    config = ExchangeConfig.from_mapping(
        {
            "token_endpoint": realm.token_endpoint,
            "audience": realm.downstream,
            "auth": "client-secret",
            "client_id": realm.secret_client,
            "client_secret_file": str(secret_file),
            "timeout_seconds": 30,
        }
    )
    identity = FakeIdentity(keycloak.authority)
    async with aiohttp.ClientSession() as session:
        user = await alice_token(session, realm)
        exchanger = build_exchanger(config, identity, session)
        issued = await exchanger.exchange(user)
        claims = await verified_claims(session, realm, issued.access_token)
        assert claims["sub"] == keycloak.alice_id
        assert claims["preferred_username"] == "alice"
        assert claims["aud"] == realm.downstream
        assert claims["azp"] == realm.secret_client
        assert (await exchanger.exchange(user)).cache_hit

        # Keycloak's refusals come back as token-free ExchangeErrors with the documented statuses.
        with pytest.raises(ExchangeError) as info:
            await exchanger.exchange(user, audience="no-such-api")
        print(f"keycloak unknown audience -> {info.value.oauth_error} {info.value.http_status}: {info.value}")
        assert info.value.http_status in (403, 502) and info.value.oauth_error
        assert user not in str(info.value)

        # An audience that exists in the realm but that this client may not get: the user's exchange
        # is refused by policy, which must not look like a gateway fault to the operator's IdP.
        with pytest.raises(ExchangeError) as info:
            await exchanger.exchange(user, audience=realm.cli_client)
        print(f"keycloak audience refused -> {info.value.oauth_error} {info.value.http_status}: {info.value}")
        assert info.value.oauth_error and user not in str(info.value)

        secret_file.write_text("wrong-secret")
        with pytest.raises(ExchangeError) as info:
            await exchanger.exchange(user, audience=realm.downstream, scope="openid")
        print(f"keycloak wrong secret -> {info.value.oauth_error} {info.value.http_status}: {info.value}")
        assert info.value.http_status == 502
        assert "wrong-secret" not in str(info.value)


async def test_keycloak_exchange_with_jwt_svid(keycloak):
    realm = keycloak.realm
    config = ExchangeConfig.from_mapping(
        {
            "token_endpoint": realm.token_endpoint,
            "issuer": realm.issuer,
            "audience": realm.downstream,
            "auth": "jwt-svid",
            "timeout_seconds": 30,
        }
    )
    identity = FakeIdentity(keycloak.authority)
    async with aiohttp.ClientSession() as session:
        user = await alice_token(session, realm)
        issued = await build_exchanger(config, identity, session).exchange(user)
        claims = await verified_claims(session, realm, issued.access_token)
    assert claims["sub"] == keycloak.alice_id
    assert claims["aud"] == realm.downstream
    assert claims["azp"] == realm.spiffe_client
    # The client assertion was a JWT-SVID whose only audience is the realm's issuer.
    assert identity.jwt_audiences == [realm.issuer]


async def test_keycloak_actor_token(keycloak):
    """Keycloak's standard token exchange has no delegation (`act`): record what it says to actor_token."""
    realm = keycloak.realm
    config = ExchangeConfig.from_mapping(
        {
            "token_endpoint": realm.token_endpoint,
            "issuer": realm.issuer,
            "audience": realm.downstream,
            "actor_token": True,
            "timeout_seconds": 30,
        }
    )
    async with aiohttp.ClientSession() as session:
        user = await alice_token(session, realm)
        try:
            issued = await build_exchanger(config, FakeIdentity(keycloak.authority), session).exchange(user)
        except ExchangeError as exc:
            print(f"keycloak actor_token -> {exc.oauth_error} {exc.http_status}: {exc}")
            assert exc.http_status == 502 and user not in str(exc)
        else:
            claims = await verified_claims(session, realm, issued.access_token)
            print(f"keycloak actor_token accepted; act={claims.get('act')}")
            assert claims["sub"] == keycloak.alice_id
