"""Refusals on a real socket: missing, expired, wrong-audience, wrongly signed tokens get the MCP 401."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP

from .conftest import RESOURCE, RecordingObserver, SidecarFactory

CALL = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "tools/call",
    "params": {"name": "echo", "arguments": {"text": "x"}},
}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
METADATA = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"


def forged(idp: DevIdP, **claims: Any) -> str:
    """Right kid and issuer, signed by a key the IdP never had."""
    now = int(time.time())
    body = {"iss": idp.issuer, "sub": "alice", "aud": RESOURCE, "iat": now, "exp": now + 300, **claims}
    return jwt.encode(
        body, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": idp.kid}
    )


def unsigned(idp: DevIdP) -> str:
    now = int(time.time())
    body = {"iss": idp.issuer, "sub": "alice", "aud": RESOURCE, "iat": now, "exp": now + 300}
    return jwt.encode(body, None, algorithm="none")


async def post(url: str, token: str | None, body: Any = CALL) -> tuple[int, dict[str, str], Any]:
    headers = dict(HEADERS)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as response:
        text = await response.text()
        return response.status, dict(response.headers), json.loads(text) if text else None


@pytest.mark.parametrize(
    ("case", "error", "description"),
    [
        ("missing", None, None),
        ("expired", "invalid_token", "expired"),
        ("wrong_audience", "invalid_token", "not meant for this resource"),
        ("forged", "invalid_token", "signature is invalid"),
        ("unknown_kid", "invalid_token", "not signed by a key of the trusted issuer"),
        ("alg_none", "invalid_token", "algorithm is not allowed"),
        ("not_a_jwt", "invalid_token", "not a JWT"),
    ],
)
async def test_bad_tokens_get_401_with_resource_metadata(
    case: str,
    error: str | None,
    description: str | None,
    mcp_app: mcp_server.RunningServer,
    make_sidecar: SidecarFactory,
    idp: DevIdP,
) -> None:
    tokens: dict[str, str | None] = {
        "missing": None,
        "expired": idp.mint("alice", audience=RESOURCE, expires_in=-3600),
        "wrong_audience": idp.mint("alice", audience="https://other.example.com/mcp"),
        "forged": forged(idp),
        "unknown_kid": jwt.encode(
            {"iss": idp.issuer, "sub": "a", "aud": RESOURCE, "exp": int(time.time()) + 60},
            ec.generate_private_key(ec.SECP256R1()),
            algorithm="ES256",
            headers={"kid": "someone-else"},
        ),
        "alg_none": unsigned(idp),
        "not_a_jwt": "opaque-token-value",
    }
    token = tokens[case]
    observer = RecordingObserver()
    async with make_sidecar(mcp_app.port, observer=observer) as sidecar:
        status, headers, body = await post(sidecar.mcp_url(), token)
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{METADATA}"' in challenge
    if error is None:
        assert "error=" not in challenge
    else:
        assert f'error="{error}"' in challenge
        assert description is not None and description in challenge
    if token:
        assert token not in challenge and token not in json.dumps(body)
    assert body["id"] == 7 and body["error"]["code"] == -32001
    # Telemetry saw the refused call, with its method and tool, as denied.
    (call,) = observer.calls
    assert call.message.method == "tools/call" and call.message.tool_name == "echo"
    assert call.principal is None
    assert call.outcome["outcome"] == "denied" and call.outcome["http_status"] == 401


async def test_protected_resource_metadata_is_served(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    async with make_sidecar(mcp_app.port) as sidecar, aiohttp.ClientSession() as session:
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
            async with session.get(sidecar.url + path) as response:
                assert response.status == 200
                document = await response.json()
            assert document["resource"] == RESOURCE
            assert document["authorization_servers"] == [idp.issuer]
            assert "none" not in document["resource_signing_alg_values_supported"]
        async with session.head(sidecar.url + "/.well-known/oauth-protected-resource/mcp") as response:
            assert response.status == 200
        # Counted apart from the MCP requests (they used to go uncounted: the pipeline never saw them);
        # a POST there is not a metadata request: the pipeline refuses it (401) and counts it as mcp.
        async with session.post(sidecar.url + "/.well-known/oauth-protected-resource", json=CALL) as response:
            assert response.status == 401
        metrics = sidecar.proxy.metrics_text().decode()
    (family,) = [f for f in text_string_to_metric_families(metrics) if f.name == "outrider_inbound_requests"]
    assert {s.labels["kind"]: s.value for s in family.samples} == {
        "mcp": 1,
        "cors_preflight": 0,
        "resource_metadata": 3,
    }


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_insufficient_scope_is_403(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    async with make_sidecar(mcp_app.port, required_scopes=["mcp:tools"]) as sidecar:
        status, headers, _ = await post(
            sidecar.mcp_url(), idp.mint("bob", audience=RESOURCE)
        )  # bob lacks mcp:tools
        assert status == 403
        assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
        assert 'scope="mcp:tools"' in headers["WWW-Authenticate"]
        status, _, body = await post(sidecar.mcp_url(), idp.mint("alice", audience=RESOURCE), INITIALIZE)
        assert status == 200, body


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_an_id_token_for_the_resource_is_not_an_access_token(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    """Signed by the trusted issuer with `aud` equal to the resource (a client id may be both), an
    ID token passed as an access token. Real tokens of the real IdP, on a real socket."""
    refused = {
        "keycloak_id_token": (idp.mint("alice", typ="JWT", extra={"typ": "ID"}), "its 'typ' claim is 'ID'"),
        "at_hash": (idp.mint("alice", typ="JWT", extra={"nonce": "n", "at_hash": "x"}), "'at_hash'"),
        "c_hash": (idp.mint("alice", typ=None, extra={"c_hash": "x"}), "'c_hash'"),
    }
    accepted = {
        "rfc9068": idp.mint("alice"),
        "rfc9068_media_type": idp.mint("alice", typ="application/AT+JWT", extra={"at_hash": "x"}),
        "no_typ": idp.mint("alice", typ=None),
        "keycloak_access_token": idp.mint("alice", typ="JWT", extra={"typ": "Bearer", "nonce": "n"}),
    }
    async with make_sidecar(mcp_app.port) as sidecar:
        for case, (token, why) in refused.items():
            status, headers, body = await post(sidecar.mcp_url(), token, INITIALIZE)
            assert status == 401, case
            challenge = headers["WWW-Authenticate"]
            assert 'error="invalid_token"' in challenge and why in challenge, (case, challenge)
            assert "ID token" in challenge and token not in challenge + json.dumps(body)
        for case, token in accepted.items():
            status, _, body = await post(sidecar.mcp_url(), token, INITIALIZE)
            assert status == 200, (case, body)


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_require_access_token_typ_refuses_every_token_without_it(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    async with make_sidecar(mcp_app.port, require_access_token_typ=True) as sidecar:
        for typ in (None, "JWT"):
            status, headers, _ = await post(sidecar.mcp_url(), idp.mint("alice", typ=typ), INITIALIZE)
            assert status == 401, typ
            assert "not an RFC 9068 access token" in headers["WWW-Authenticate"]
        for typ in ("at+jwt", "application/at+jwt", "AT+JWT"):
            status, _, body = await post(sidecar.mcp_url(), idp.mint("alice", typ=typ), INITIALIZE)
            assert status == 200, (typ, body)
