"""The exchange with real SPIFFE plumbing: the sidecar's Workload API identity gets its JWT-SVID and
X.509-SVID from the dev Workload API over gRPC, and the dev IdP reads the JWT bundle from it too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import aiohttp
import pytest

from outrider.sidecar.dev.idp import (
    CallableJwtBundles,
    ClientRegistration,
    DevIdP,
    WorkloadApiJwtBundles,
)
from outrider.sidecar.dev.workload_api import DevWorkloadApi
from outrider.sidecar.exchange import ExchangeError
from outrider.sidecar.exchange.client import build_exchanger
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.identity.workload import WorkloadApiIdentity

from .spiffe_fakes import idp_tls

SIDECAR = "spiffe://example.org/ns/mcp/sa/weather"
DOWNSTREAM = "https://api.example.com"


@pytest.fixture
def socket_dir():
    # Unix socket paths are limited to ~100 bytes: pytest's tmp_path can be too long.
    with tempfile.TemporaryDirectory(prefix="ox-") as tmp:
        yield Path(tmp)


@pytest.mark.parametrize("bundle_source", ["in-process", "py-spiffe"])
async def test_exchange_with_dev_workload_api(socket_dir, bundle_source):
    async with DevWorkloadApi(socket_dir / "agent.sock", spiffe_id=SIDECAR) as api:

        async def fetch_bundles():
            return {api.trust_domain: api.jwks()}

        bundles = (
            CallableJwtBundles(fetch_bundles)
            if bundle_source == "in-process"
            else WorkloadApiJwtBundles(api.target)
        )
        identity = WorkloadApiIdentity(IdentityConfig.from_mapping({"socket": api.target}))
        clients = [ClientRegistration("weather-mcp", spiffe_ids=(SIDECAR,), audiences=(DOWNSTREAM,))]
        async with (
            identity,
            DevIdP(clients=clients, spiffe_bundles=bundles) as idp,
            aiohttp.ClientSession() as session,
        ):
            assert await identity.wait_ready(10)
            config = ExchangeConfig.from_mapping(
                {
                    "token_endpoint": idp.token_endpoint,
                    "issuer": idp.issuer,
                    "audience": DOWNSTREAM,
                    "actor_token": True,
                }
            )
            # The IdP loaded the bundle before the trust domain rotated its JWT key: an SVID with
            # the new key id must make it fetch the bundle again rather than refuse the client.
            await bundles.authorities(api.trust_domain, None)
            api.rotate_ca()
            exchanger = build_exchanger(config, identity, session)
            user_token = idp.mint("alice", audience="https://mcp.example.com/mcp")
            issued = await exchanger.exchange(user_token)
            claims = idp.verify(issued.access_token, audience=DOWNSTREAM)
            assert (claims["sub"], claims["act"], claims["client_id"]) == (
                "alice",
                {"sub": SIDECAR},
                "weather-mcp",
            )


async def test_mtls_with_x509_svid_from_workload_api(socket_dir):
    async with DevWorkloadApi(socket_dir / "agent.sock", spiffe_id=SIDECAR) as api:
        server_ctx, ca_file = idp_tls(socket_dir, api.bundle_pem)

        identity = WorkloadApiIdentity(IdentityConfig.from_mapping({"socket": api.target}))
        clients = [ClientRegistration("weather-mcp", spiffe_ids=(SIDECAR,), audiences=(DOWNSTREAM,))]
        async with (
            identity,
            DevIdP(clients=clients, ssl_context=server_ctx) as idp,
            aiohttp.ClientSession() as session,
        ):
            assert await identity.wait_ready(10)
            config = ExchangeConfig.from_mapping(
                {
                    "token_endpoint": idp.token_endpoint,
                    "auth": "x509-svid",
                    "client_id": "weather-mcp",
                    "audience": DOWNSTREAM,
                    "ca_file": ca_file,
                }
            )
            exchanger = build_exchanger(config, identity, session)
            issued = await exchanger.exchange(idp.mint("bob", audience="https://mcp.example.com/mcp"))
            claims = idp.verify(issued.access_token, audience=DOWNSTREAM)
            assert (claims["sub"], claims["act"]) == ("bob", {"sub": SIDECAR})

            # A workload whose SVID the IdP's registration does not list is refused as invalid_client.
            api.set_identity(None, "spiffe://example.org/ns/other/sa/intruder")
            await identity.next_update(identity.x509())
            with pytest.raises(ExchangeError) as info:
                await exchanger.exchange(idp.mint("bob", audience="x"))
            assert (info.value.oauth_error, info.value.http_status) == ("invalid_client", 502)
