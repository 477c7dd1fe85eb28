"""Agent-to-server callers over mTLS with a SPIFFE X.509-SVID: the peer's SPIFFE ID is the principal."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_der_private_key,
)

from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.dev.workload_api import DevWorkloadApi

from .conftest import AGENT_ID, RESOURCE, SIDECAR_ID, RecordingObserver, SidecarFactory

WHOAMI = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-06-18",
}


@contextmanager
def client_context(api: DevWorkloadApi, tmp: Path, spiffe_id: str | None) -> Iterator[ssl.SSLContext]:
    """A TLS client trusting the SPIFFE bundle (SVIDs carry no host name), with an SVID if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=api.bundle_pem.decode())
    if spiffe_id is not None:
        leaf_der, key_der, _ = api.ca.issue_x509(spiffe_id, 600)
        pem = x509.load_der_x509_certificate(leaf_der).public_bytes(Encoding.PEM)
        key = load_der_private_key(key_der, None).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
        path = tmp / "client.pem"
        path.write_bytes(pem + key)
        context.load_cert_chain(path)
    yield context


async def call(url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=WHOAMI, headers={**HEADERS, **(headers or {})}, ssl=context) as response,
    ):
        return response.status, await response.json()


@pytest.mark.parametrize("mcp_app", ["stateless"], indirect=True)
async def test_spiffe_callers_over_mtls(
    mcp_app: mcp_server.RunningServer,
    make_sidecar: SidecarFactory,
    workload_api: DevWorkloadApi,
    idp: DevIdP,
    tmp_path: Path,
) -> None:
    observer = RecordingObserver()
    mtls = {"enabled": True, "allowed_spiffe_ids": [AGENT_ID]}
    async with make_sidecar(mcp_app.port, observer=observer, mtls=mtls) as sidecar:
        assert sidecar.url.startswith("https://")
        with client_context(workload_api, tmp_path, AGENT_ID) as agent:
            status, body = await call(sidecar.mcp_url(), agent)
        assert status == 200, body
        who = body["result"]["structuredContent"]
        assert who["authorization"] is None  # no user to act for: no downstream token, never a caller token
        assert observer.calls[-1].principal.kind == "spiffe"
        assert observer.calls[-1].principal.subject == AGENT_ID
        # A SPIFFE ID that is not allowed is refused.
        with client_context(workload_api, tmp_path, "spiffe://example.org/ns/other/sa/x") as other:
            status, body = await call(sidecar.mcp_url(), other)
        assert status == 403
        # No certificate and no token: the usual 401 challenge.
        with client_context(workload_api, tmp_path, None) as anonymous:
            status, body = await call(sidecar.mcp_url(), anonymous)
            assert status == 401
            # Bearer tokens still work on the TLS port, and then the user is the principal.
            token = idp.mint("alice", audience=RESOURCE)
            status, body = await call(sidecar.mcp_url(), anonymous, {"Authorization": f"Bearer {token}"})
        assert status == 200, body
        assert body["result"]["structuredContent"]["claims"]["sub"] == "alice"
        assert observer.calls[-1].principal.subject == "alice"


async def presented_certificate(port: int, context: ssl.SSLContext) -> x509.Certificate:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


async def test_server_presents_the_current_svid_across_rotations(
    mcp_app: mcp_server.RunningServer,
    make_sidecar: SidecarFactory,
    workload_api: DevWorkloadApi,
    tmp_path: Path,
) -> None:
    async with make_sidecar(mcp_app.port, mtls={"enabled": True}) as sidecar:
        port = int(sidecar.url.rsplit(":", 1)[1])
        with client_context(workload_api, tmp_path, None) as context:
            first = await presented_certificate(port, context)
        uris = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [SIDECAR_ID]
        # A new root signs a new SVID; new handshakes get it without restarting the listener.
        workload_api.rotate_ca()
        for _ in range(500):
            with client_context(workload_api, tmp_path, None) as context:
                current = await presented_certificate(port, context)
            if current.serial_number != first.serial_number:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the listener kept presenting the old SVID")

        def signer(cert: x509.Certificate) -> bytes | None:
            return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier

        assert signer(current) != signer(first)  # signed by the new root
