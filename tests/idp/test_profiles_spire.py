"""Each profile's client authentication with a REAL SPIRE JWT-SVID, checked by the provider stand-ins
the way the providers document it: they fetch SPIRE's own oidc-discovery-provider (discovery document
and JWKS) over HTTP and validate the assertion's issuer, subject, audience, expiry and signature.
"""

from __future__ import annotations

import aiohttp
import jwt
import pytest

from outrider.sidecar.exchange import ExchangeError
from outrider.sidecar.exchange.client import build_exchanger
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.inbound.introspection import Introspected, Introspector
from outrider.sidecar.inbound.issuers import ASSERTION_TYPES, IntrospectionConfig

from .conftest import SIDECAR_ID, LeakGuard, spire_identity, spire_with_oidc
from .standins.entra import AppRegistration, EntraStandIn, EntraUser, FederatedCredential
from .standins.okta import OktaStandIn, ServiceApp

pytestmark = [pytest.mark.spire, pytest.mark.slow]

MIDDLE = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"  # the MCP server's app registration (client ID)
DOWNSTREAM = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d"


def entra_apps(issuer: str, subject: str = SIDECAR_ID) -> list[AppRegistration]:
    return [
        AppRegistration(
            MIDDLE,
            "api://weather-mcp",
            federated=(FederatedCredential(issuer=issuer, subject=subject),),
            permissions={"api://downstream": ("Data.Read",)},
        ),
        AppRegistration(DOWNSTREAM, "api://downstream", scopes=("Data.Read",)),
    ]


USERS = [EntraUser("alice", "oid-alice"), EntraUser("carol", "oid-carol", mfa_policy="ca-policy-mfa")]


async def test_entra_obo_with_a_spire_jwt_svid(leaks: LeakGuard) -> None:
    async with (
        spire_with_oidc() as (spire, oidc),
        spire_identity(spire) as identity,
        EntraStandIn(apps=entra_apps(oidc.url), users=USERS, seen=leaks.secret) as entra,
        aiohttp.ClientSession() as session,
    ):
        config = ExchangeConfig.from_mapping(
            {
                "profile": "entra-obo",
                "token_endpoint": entra.token_endpoint,
                "client_id": MIDDLE,
                "scope": "api://downstream/.default",
            }
        )
        exchanger = build_exchanger(config, identity, session)
        alice = entra.sign_in("alice", client_id=MIDDLE)
        issued = await exchanger.exchange(alice)
        claims = entra.verify(issued.access_token, audience=DOWNSTREAM)
        assert (claims["oid"], claims["azp"], claims["azpacr"], claims["scp"]) == (
            "oid-alice",
            MIDDLE,
            "2",  # authenticated with a client assertion, not a secret
            "Data.Read",
        )
        # The assertion really is SPIRE's JWT-SVID: issuer = the discovery provider, sub = SPIFFE ID.
        svid = await identity.jwt_svid("api://AzureADTokenExchange")
        leaks.secret(svid)
        svid_claims = jwt.decode(svid, options={"verify_signature": False})
        assert (svid_claims["iss"], svid_claims["sub"], svid_claims["aud"]) == (
            oidc.url,
            SIDECAR_ID,
            ["api://AzureADTokenExchange"],
        )

        # Conditional Access: a step-up the MCP client can act on, not a 502.
        with pytest.raises(ExchangeError) as step_up:
            await exchanger.exchange(entra.sign_in("carol", client_id=MIDDLE))
        assert step_up.value.http_status == 403 and step_up.value.step_up is not None
        assert "ca-policy-mfa" in (step_up.value.step_up.claims or "")
        # ... and after signing in again with MFA the same user gets through.
        issued = await exchanger.exchange(entra.sign_in("carol", client_id=MIDDLE, mfa=True))
        assert entra.verify(issued.access_token, audience=DOWNSTREAM)["oid"] == "oid-carol"

        # An app-only token: a clear 403 that says why.
        with pytest.raises(ExchangeError) as app_only:
            await exchanger.exchange(entra.app_only(client_id=MIDDLE))
        assert app_only.value.http_status == 403 and "app-only" in app_only.value.message


async def test_entra_refuses_an_svid_its_federated_credential_does_not_name(leaks: LeakGuard) -> None:
    async with spire_with_oidc() as (spire, oidc), spire_identity(spire) as identity:
        apps = entra_apps(oidc.url, subject="spiffe://example.org/ns/other/sa/someone")
        async with (
            EntraStandIn(apps=apps, users=USERS, seen=leaks.secret) as entra,
            aiohttp.ClientSession() as session,
        ):
            base = {
                "profile": "entra-obo",
                "token_endpoint": entra.token_endpoint,
                "client_id": MIDDLE,
                "scope": "api://downstream/.default",
            }
            exchanger = build_exchanger(ExchangeConfig.from_mapping(base), identity, session)
            with pytest.raises(ExchangeError) as wrong_subject:
                await exchanger.exchange(entra.sign_in("alice", client_id=MIDDLE))
            assert wrong_subject.value.http_status == 502 and "AADSTS700213" in wrong_subject.value.message
        async with (
            EntraStandIn(apps=entra_apps(oidc.url), users=USERS, seen=leaks.secret) as entra,
            aiohttp.ClientSession() as session,
        ):
            other_audience = {
                **base,
                "token_endpoint": entra.token_endpoint,
                "client_assertion_audience": "api://x",
            }
            exchanger = build_exchanger(ExchangeConfig.from_mapping(other_audience), identity, session)
            with pytest.raises(ExchangeError) as wrong_audience:
                await exchanger.exchange(entra.sign_in("alice", client_id=MIDDLE))
            assert wrong_audience.value.http_status == 502 and "AADSTS700212" in wrong_audience.value.message


async def test_okta_private_key_jwt_with_the_svid_key(leaks: LeakGuard) -> None:
    """Okta requires iss = sub = client_id in a private_key_jwt: a JWT-SVID meets that only when the
    Okta client_id is the SPIFFE ID and SPIRE's jwt_issuer is too (docs/token-exchange.md says why)."""
    async with spire_with_oidc(jwt_issuer=SIDECAR_ID) as (spire, oidc), spire_identity(spire) as identity:
        app = ServiceApp(
            SIDECAR_ID, jwks_uri=oidc.jwks_uri, grants={"api://downstream": ("downstream.read",)}
        )
        async with OktaStandIn(apps=[app], seen=leaks.secret) as okta, aiohttp.ClientSession() as session:
            config = ExchangeConfig.from_mapping(
                {
                    "profile": "okta",
                    "token_endpoint": okta.token_endpoint,
                    "client_id": SIDECAR_ID,
                    "audience": "api://downstream",
                    "scope": "downstream.read",
                }
            )
            exchanger = build_exchanger(config, identity, session)
            alice = okta.sign_in("alice", audience="api://weather-mcp")
            issued = await exchanger.exchange(alice)
            claims = okta.verify(issued.access_token, audience="api://downstream")
            assert (claims["sub"], claims["cid"], claims["scp"]) == (
                "alice@example.com",
                SIDECAR_ID,
                ["downstream.read"],
            )
            # A second user: a second exchange with an assertion Okta accepts again.
            issued = await exchanger.exchange(okta.sign_in("bob", audience="api://weather-mcp"))
            assert okta.verify(issued.access_token, audience="api://downstream")["sub"] == "bob@example.com"
            # A scope the access policy does not grant: the user's request is refused (403).
            narrow_config = ExchangeConfig.from_mapping(
                {
                    "profile": "okta",
                    "token_endpoint": okta.token_endpoint,
                    "client_id": SIDECAR_ID,
                    "audience": "api://downstream",
                    "scope": "downstream.admin",
                }
            )
            narrow = build_exchanger(narrow_config, identity, session)
            with pytest.raises(ExchangeError) as denied:
                await narrow.exchange(alice)
            assert denied.value.http_status == 403 and denied.value.oauth_error == "invalid_scope"

            # Introspection authenticated with the same SVID key (private_key_jwt, aud = /v1/introspect).
            introspector = Introspector(
                IntrospectionConfig(
                    endpoint=okta.endpoint("introspect"),
                    client_id=SIDECAR_ID,
                    assertion_type=ASSERTION_TYPES["jwt-bearer"],
                    assertion_audience=okta.endpoint("introspect"),
                ),
                issuer=okta.issuer,
                audience="api://weather-mcp",
                required_scopes=(),
                leeway_s=5,
                identity=identity,
                session=session,
            )
            opaque = okta.opaque("carol", audience="api://weather-mcp")
            result = await introspector.introspect(opaque)
            assert isinstance(result, Introspected) and result.principal.subject == "carol@example.com"
            assert okta.requests["introspect"] == 1 and "invalid_client" not in okta.errors


async def test_okta_refuses_a_plain_svid_as_private_key_jwt(leaks: LeakGuard) -> None:
    """With SPIRE's usual jwt_issuer (the discovery URL) the JWT-SVID's iss is not the client_id:
    Okta's documented rule refuses it, and the operator gets a 502 naming the reason."""
    async with spire_with_oidc() as (spire, oidc), spire_identity(spire) as identity:
        app = ServiceApp(
            SIDECAR_ID, jwks_uri=oidc.jwks_uri, grants={"api://downstream": ("downstream.read",)}
        )
        async with OktaStandIn(apps=[app], seen=leaks.secret) as okta, aiohttp.ClientSession() as session:
            config = ExchangeConfig.from_mapping(
                {
                    "profile": "okta",
                    "token_endpoint": okta.token_endpoint,
                    "client_id": SIDECAR_ID,
                    "audience": "api://downstream",
                    "scope": "downstream.read",
                }
            )
            with pytest.raises(ExchangeError) as refused:
                await build_exchanger(config, identity, session).exchange(okta.sign_in("alice", audience="x"))
            assert refused.value.http_status == 502 and refused.value.oauth_error == "invalid_client"
