"""Fixtures for the token-exchange tests: the SPIFFE fakes and the dev IdP on a loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, StaticJwtBundles

from .spiffe_fakes import DOWNSTREAM, SIDECAR_ID, TRUST_DOMAIN, FakeIdentity, SpiffeAuthority

# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def authority() -> SpiffeAuthority:
    return SpiffeAuthority()


@pytest.fixture
def identity(authority: SpiffeAuthority) -> FakeIdentity:
    return FakeIdentity(authority)


def default_clients() -> list[ClientRegistration]:
    return [
        ClientRegistration(
            "weather-mcp",
            spiffe_ids=(SIDECAR_ID,),
            audiences=(DOWNSTREAM, "https/other.example.com"),
        ),
        ClientRegistration("secret-client", secret="s3cr3t&:/+ value", audiences=(DOWNSTREAM,)),
        ClientRegistration("demo-cli", public=True),
    ]


@pytest.fixture
async def idp(authority: SpiffeAuthority) -> AsyncIterator[DevIdP]:
    async with DevIdP(
        clients=default_clients(),
        spiffe_bundles=StaticJwtBundles({TRUST_DOMAIN: authority.jwks}),
        default_audience="https://mcp.example.com/mcp",
    ) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def password_token(session: aiohttp.ClientSession, idp: DevIdP, user: str = "alice") -> str:
    """The user's token, fetched over HTTP with the password grant like a CLI would."""
    async with session.post(
        idp.token_endpoint,
        data={
            "grant_type": "password",
            "username": user,
            "password": f"{user}-password",
            "client_id": "demo-cli",
            "resource": "https://mcp.example.com/mcp",
        },
    ) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    token = body["access_token"]
    assert isinstance(token, str)
    return token


@pytest.fixture
def secret_file(tmp_path: Any) -> Iterator[Any]:
    path = tmp_path / "client-secret"
    path.write_text("s3cr3t&:/+ value\n")
    yield path
