"""The exchange with a REAL SPIRE server and agent: the sidecar's JWT-SVID and X.509-SVID come from
SPIRE, and the dev IdP verifies them against the bundles it fetches from the same agent (py-spiffe).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest

from outrider.sidecar.dev.idp import ClientRegistration, DevIdP, WorkloadApiJwtBundles
from outrider.sidecar.dev.spire import SpireDev, SpireOptions, find_binaries
from outrider.sidecar.exchange.client import build_exchanger
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.identity.workload import WorkloadApiIdentity

from .spiffe_fakes import idp_tls

pytestmark = [pytest.mark.spire, pytest.mark.slow]

TD = "example.org"
SIDECAR = f"spiffe://{TD}/ns/mcp/sa/weather"
DOWNSTREAM = "https://api.example.com"


@pytest.fixture
async def spire() -> AsyncIterator[SpireDev]:
    bin_dir = find_binaries(build=True)
    assert bin_dir is not None, "scripts/build-upstream.sh spire did not produce binaries"
    async with SpireDev(bin_dir=bin_dir, options=SpireOptions(trust_domain=TD, log_level="WARN")) as running:
        await running.create_entry(SIDECAR, [f"unix:uid:{os.getuid()}"])
        yield running


async def test_exchange_with_spire_svids(spire):
    identity = WorkloadApiIdentity(
        IdentityConfig(socket=spire.agent_socket_uri, backoff_min_s=0.2, backoff_max_s=2.0)
    )
    async with identity:
        assert await identity.wait_ready(60), identity.status
        material = identity.x509()

        # The IdP's TLS: a web CA for its server certificate, the SPIRE bundle for client SVIDs.
        with tempfile.TemporaryDirectory(prefix="ox-") as tmp:
            server_ctx, ca_file = idp_tls(Path(tmp), material.bundles_pem[TD])
            clients = [ClientRegistration("weather-mcp", spiffe_ids=(SIDECAR,), audiences=(DOWNSTREAM,))]
            async with (
                DevIdP(
                    clients=clients,
                    spiffe_bundles=WorkloadApiJwtBundles(spire.agent_socket_uri),
                    ssl_context=server_ctx,
                ) as idp,
                aiohttp.ClientSession() as session,
            ):
                user_token = idp.mint("alice", audience="https://mcp.example.com/mcp")
                common = {
                    "token_endpoint": idp.token_endpoint,
                    "audience": DOWNSTREAM,
                    "ca_file": ca_file,
                }

                # jwt-spiffe client assertion + actor token, both SPIRE JWT-SVIDs for the IdP's issuer.
                jwt_config = ExchangeConfig.from_mapping(
                    {**common, "issuer": idp.issuer, "actor_token": True}
                )
                issued = await build_exchanger(jwt_config, identity, session).exchange(user_token)
                claims = idp.verify(issued.access_token, audience=DOWNSTREAM)
                assert (claims["sub"], claims["act"], claims["client_id"]) == (
                    "alice",
                    {"sub": SIDECAR},
                    "weather-mcp",
                )
                svid = await identity.jwt_svid(idp.issuer)
                assert jwt.decode(svid, options={"verify_signature": False})["aud"] == [idp.issuer]

                # RFC 8705: the SPIRE X.509-SVID as the TLS client certificate.
                mtls_config = ExchangeConfig.from_mapping(
                    {**common, "auth": "x509-svid", "client_id": "weather-mcp"}
                )
                issued = await build_exchanger(mtls_config, identity, session).exchange(user_token)
                claims = idp.verify(issued.access_token, audience=DOWNSTREAM)
                assert (claims["sub"], claims["act"]) == ("alice", {"sub": SIDECAR})
