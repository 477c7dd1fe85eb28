"""The dev IdP's own rules, spoken to directly over HTTP: what it refuses, and why."""

from __future__ import annotations

import aiohttp
import pytest

from outrider.sidecar.dev.idp import (
    ASSERTION_TYPE_JWT_SPIFFE,
    GRANT_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS,
    DevIdP,
)

from .spiffe_fakes import DOWNSTREAM, SIDECAR_ID, SpiffeAuthority


async def exchange(session: aiohttp.ClientSession, idp: DevIdP, **fields: str) -> tuple[int, dict]:
    form = {
        "grant_type": GRANT_TOKEN_EXCHANGE,
        "subject_token_type": TOKEN_TYPE_ACCESS,
        "audience": DOWNSTREAM,
        "client_assertion_type": ASSERTION_TYPE_JWT_SPIFFE,
        **fields,
    }
    async with session.post(idp.token_endpoint, data=form) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("make_assertion", "why"),
    [
        (lambda a, idp: a.jwt_svid(SIDECAR_ID, [idp.issuer, "https://elsewhere"]), "only audience"),
        (lambda a, idp: a.jwt_svid(SIDECAR_ID, "https://elsewhere"), "audience must be"),
        (lambda a, idp: a.jwt_svid(SIDECAR_ID, idp.issuer, ttl=-60), "expired"),
        (lambda a, idp: a.jwt_svid("spiffe://other.org/x", idp.issuer), "trust domain other.org"),
        (lambda a, idp: SpiffeAuthority(kid=a.kid).jwt_svid(SIDECAR_ID, idp.issuer), "not valid"),
        (lambda a, idp: "not-a-jwt", "not a JWT"),
    ],
)
async def test_bad_client_assertions_are_invalid_client(idp, authority, session, make_assertion, why):
    status, body = await exchange(
        session,
        idp,
        subject_token=idp.mint("alice"),
        client_assertion=make_assertion(authority, idp),
    )
    assert status == 401 and body["error"] == "invalid_client"
    assert why in body["error_description"]


async def test_subject_token_of_another_issuer_is_invalid_grant(idp, authority, session):
    async with DevIdP() as other:
        foreign = other.mint("alice", extra={"iss": idp.issuer})
    status, body = await exchange(
        session, idp, subject_token=foreign, client_assertion=authority.jwt_svid(SIDECAR_ID, idp.issuer)
    )
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_scope_beyond_subject_is_invalid_scope(idp, authority, session):
    status, body = await exchange(
        session,
        idp,
        subject_token=idp.mint("bob"),  # bob holds "openid profile" only
        scope="mcp:tools",
        client_assertion=authority.jwt_svid(SIDECAR_ID, idp.issuer),
    )
    assert (status, body["error"]) == (400, "invalid_scope")


async def test_missing_audience_and_client_auth(idp, session):
    async with session.post(
        idp.token_endpoint,
        data={
            "grant_type": GRANT_TOKEN_EXCHANGE,
            "subject_token": idp.mint("alice"),
            "subject_token_type": TOKEN_TYPE_ACCESS,
        },
    ) as response:
        assert response.status == 401 and (await response.json())["error"] == "invalid_client"
    async with session.post(idp.token_endpoint, data={"grant_type": "client_credentials"}) as response:
        assert (await response.json())["error"] == "unsupported_grant_type"


async def test_endpoints_are_advertised_under_the_issuer_url_when_one_is_set():
    # in a pod the IdP listens on 0.0.0.0: clients can only use the issuer's (the Service's) URL
    async with (
        DevIdP(issuer="http://idp.ns.svc.cluster.local:8080/") as idp,
        aiohttp.ClientSession() as http,
        http.get(f"{idp.url}/.well-known/openid-configuration") as response,
    ):
        doc = await response.json()
    assert doc["jwks_uri"] == "http://idp.ns.svc.cluster.local:8080/jwks"
    assert doc["token_endpoint"] == "http://idp.ns.svc.cluster.local:8080/token"
    async with DevIdP() as plain:  # without an issuer: the listening URL, as before
        assert plain.token_endpoint == f"{plain.url}/token"
