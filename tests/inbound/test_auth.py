"""Caller-token decisions with real keys (RSA, PSS, EC, Ed25519) and a JWKS on a real aiohttp socket."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from outrider.sidecar.inbound.auth import (
    AuthFailure,
    JwksCache,
    TokenVerifier,
    bearer_token,
    metadata_url,
    peer_spiffe_id,
    principal_from_claims,
    protected_resource_metadata,
    www_authenticate,
)
from outrider.sidecar.inbound.config import InboundConfig
from outrider.sidecar.telemetry.observer import Principal

from .conftest import free_port

RESOURCE = "https://mcp.example.com/mcp"


@dataclass
class Key:
    alg: str
    private: Any
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def jwk(self) -> dict[str, Any]:
        algorithm = get_default_algorithms()[self.alg]
        data: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "use": "sig"}


def make_key(alg: str) -> Key:
    if alg in ("RS256", "PS256"):
        return Key(alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    if alg == "ES256":
        return Key(alg, ec.generate_private_key(ec.SECP256R1()))
    return Key(alg, ed25519.Ed25519PrivateKey.generate())


class Issuer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys: list[Key] = []
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.padding = ""  # an extra member that makes the JWKS document as large as wanted

    def token(self, key: Key, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.url, "sub": "alice", "aud": RESOURCE, "iat": now, "exp": now + 300, **claims}
        return jwt.encode(body, key.private, algorithm=key.alg, headers={"kid": key.kid})

    async def discovery(self, _: web.Request) -> web.Response:
        self.discovery_fetches += 1
        return web.json_response({"issuer": self.url, "jwks_uri": self.url + "/keys"})

    async def jwks(self, _: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response({"keys": [k.jwk for k in self.keys], "x": self.padding})


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    server = Issuer()
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", server.discovery)
    app.router.add_get("/keys", server.jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", server.port).start()
    yield server
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """Built by hand: PyJWT itself refuses to HMAC with a PEM public key."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def config_for(issuer: Issuer, **overrides: Any) -> InboundConfig:
    return InboundConfig.from_mapping({"issuer": issuer.url, "resource": RESOURCE, **overrides})


async def verifier_for(issuer: Issuer, session: aiohttp.ClientSession, **overrides: Any) -> TokenVerifier:
    jwks = JwksCache(config_for(issuer, **overrides), session)
    await jwks.refresh(force=True)
    return TokenVerifier(config_for(issuer, **overrides), jwks)


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
async def test_valid_tokens_of_every_allowed_algorithm(
    alg: str, issuer: Issuer, session: aiohttp.ClientSession
) -> None:
    key = make_key(alg)
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session)
    token = issuer.token(
        key,
        azp="agent-cli",
        scope="mcp:tools openid",
        act={"sub": "spiffe://a/agent", "act": {"sub": "svc-b"}},
    )
    principal = await verifier.verify(token)
    assert principal == Principal(
        kind="oidc",
        subject="alice",
        issuer=issuer.url,
        client_id="agent-cli",
        delegation=("spiffe://a/agent", "svc-b"),
        scopes=("mcp:tools", "openid"),
    )
    assert issuer.discovery_fetches == 1  # the JWKS URI came from OIDC discovery


async def test_claim_checks(issuer: Issuer, session: aiohttp.ClientSession) -> None:
    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session, leeway_s=5)
    now = int(time.time())
    cases = {
        "expired": issuer.token(key, exp=now - 60),
        "not valid yet": issuer.token(key, nbf=now + 600),
        "not meant for this resource": issuer.token(key, aud="https://elsewhere/mcp"),
        "untrusted issuer": issuer.token(key, iss="https://evil.example"),
    }
    for expected, token in cases.items():
        result = await verifier.verify(token)
        assert isinstance(result, AuthFailure) and result.status == 401, expected
        assert expected in result.description
    # Within the leeway is still fine.
    assert isinstance(await verifier.verify(issuer.token(key, exp=now - 2)), Principal)
    no_exp = jwt.encode(
        {"iss": issuer.url, "sub": "a", "aud": RESOURCE}, key.private, "ES256", {"kid": key.kid}
    )
    failure = await verifier.verify(no_exp)
    assert isinstance(failure, AuthFailure) and "'exp'" in failure.description


async def test_algorithm_confusion_is_refused(issuer: Issuer, session: aiohttp.ClientSession) -> None:
    rsa_key = make_key("RS256")
    issuer.keys.append(rsa_key)
    verifier = await verifier_for(issuer, session)
    public_pem = rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"iss": issuer.url, "sub": "mallory", "aud": RESOURCE, "exp": int(time.time()) + 60}
    # HS256 "signed" with the public key: the classic confusion attack.
    forged = hs256(claims, public_pem, rsa_key.kid)
    result = await verifier.verify(forged)
    assert isinstance(result, AuthFailure) and "algorithm is not allowed" in result.description
    none = jwt.encode(claims, None, algorithm="none", headers={"kid": rsa_key.kid})
    assert isinstance(await verifier.verify(none), AuthFailure)
    # An EC-signed token naming the RSA key's kid finds no key of its family.
    ec_key = make_key("ES256")
    cross = jwt.encode(claims, ec_key.private, algorithm="ES256", headers={"kid": rsa_key.kid})
    result = await verifier.verify(cross)
    assert isinstance(result, AuthFailure) and result.status == 401
    # An algorithm outside the configured allowlist is refused even with a good signature.
    strict = await verifier_for(issuer, session, algorithms=["ES256"])
    result = await strict.verify(issuer.token(rsa_key))
    assert isinstance(result, AuthFailure) and "algorithm is not allowed" in result.description


async def test_a_critical_header_extension_nobody_understands_is_refused(
    issuer: Issuer, session: aiohttp.ClientSession
) -> None:
    """RFC 7515 section 4.1.11: a JWS whose `crit` names an extension the verifier does not implement
    is invalid, however good its signature (PyJWT before 2.12 accepted it: CVE-2026-32597)."""
    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session)
    now = int(time.time())
    claims = {"iss": issuer.url, "sub": "alice", "aud": RESOURCE, "exp": now + 300}
    plain = jwt.encode(claims, key.private, algorithm="ES256", headers={"kid": key.kid})
    assert isinstance(await verifier.verify(plain), Principal)
    for crit in (["x-require-mfa"], [], "x-require-mfa", ["b64"]):
        headers = {"kid": key.kid, "crit": crit, "x-require-mfa": True}
        critical = jwt.encode(claims, key.private, algorithm="ES256", headers=headers)
        result = await verifier.verify(critical)
        assert isinstance(result, AuthFailure) and result.status == 401, crit


async def test_unknown_kid_refreshes_once_and_is_rate_limited(
    issuer: Issuer, session: aiohttp.ClientSession
) -> None:
    old = make_key("ES256")
    issuer.keys.append(old)
    verifier = await verifier_for(issuer, session, jwks_min_refresh_interval_s=3600)
    assert issuer.jwks_fetches == 1
    # The IdP rotates in a new key after we cached the set: first sight of its kid refreshes.
    new = make_key("ES256")
    issuer.keys.append(new)
    jwks_first = JwksCache(config_for(issuer, jwks_min_refresh_interval_s=3600), session)
    rotated = TokenVerifier(config_for(issuer), jwks_first)
    assert isinstance(await rotated.verify(issuer.token(new)), Principal)
    fetches = issuer.jwks_fetches
    # A flood of random kids makes no further IdP calls inside the rate-limit window.
    stranger = make_key("ES256")
    for _ in range(20):
        stranger.kid = uuid.uuid4().hex
        result = await rotated.verify(issuer.token(stranger))
        assert isinstance(result, AuthFailure)
    assert issuer.jwks_fetches == fetches
    # The first verifier (refreshed at start, before rotation) is rate-limited too: it refuses the new
    # key until its window passes, rather than hammering the IdP.
    assert isinstance(await verifier.verify(issuer.token(new)), AuthFailure)


async def test_unreachable_issuer_is_not_ready_and_refuses(session: aiohttp.ClientSession) -> None:
    config = InboundConfig.from_mapping({"issuer": f"http://127.0.0.1:{free_port()}", "resource": RESOURCE})
    jwks = JwksCache(config, session)
    await jwks.refresh(force=True)
    assert not jwks.loaded and jwks.last_error
    key = make_key("ES256")
    token = jwt.encode({"sub": "a"}, key.private, algorithm="ES256", headers={"kid": key.kid})
    result = await TokenVerifier(config, jwks).verify(token)
    assert isinstance(result, AuthFailure) and "not available" in result.description


def test_metadata_and_challenge() -> None:
    config = InboundConfig.from_mapping(
        {"issuer": "https://idp.example", "resource": RESOURCE, "required_scopes": ["mcp:tools"]}
    )
    assert metadata_url(RESOURCE) == "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
    assert (
        metadata_url("https://mcp.example.com")
        == "https://mcp.example.com/.well-known/oauth-protected-resource"
    )
    doc = protected_resource_metadata(config)
    assert doc["resource"] == RESOURCE and doc["authorization_servers"] == ["https://idp.example"]
    assert doc["scopes_supported"] == ["mcp:tools"]
    missing = www_authenticate(AuthFailure(401, None, "authentication required"), config)
    assert missing == f'Bearer resource_metadata="{metadata_url(RESOURCE)}"'
    bad = www_authenticate(AuthFailure(401, "invalid_token", 'bad "quoted"\n'), config)
    assert 'error="invalid_token"' in bad and 'error_description="bad quoted"' in bad
    scope = www_authenticate(AuthFailure(403, "insufficient_scope", "lacks"), config)
    assert 'scope="mcp:tools"' in scope


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer a b", None),
        (None, None),
    ],
)
def test_bearer_token_parsing(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


# --- decisions pinned down by mutation testing (issue 17) --------------------------------------


def _refused(result: object, text: str) -> None:
    assert isinstance(result, AuthFailure), result
    assert (result.status, result.error) == (401, "invalid_token"), result
    assert text in result.description, result.description


async def test_a_jwks_key_that_fails_to_decode_refuses_the_token(
    issuer: Issuer, session: aiohttp.ClientSession
) -> None:
    key = make_key("ES256")
    broken = {**key.jwk, "x": b64(b"not a curve point"), "y": b64(b"\x00")}
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session)
    # the only candidate for this kid is a key PyJWT cannot load: refused, never let in
    verifier._jwks._keys = [broken]
    assert await verifier.verify(issuer.token(key)) == AuthFailure(
        401, "invalid_token", "the access token is malformed"
    )
    # a broken key listed before the good one does not hide the good one
    verifier._jwks._keys = [broken, key.jwk]
    assert isinstance(await verifier.verify(issuer.token(key)), Principal)


async def test_a_jwks_key_that_fails_to_decode_is_refused_when_served_by_the_idp(
    issuer: Issuer, session: aiohttp.ClientSession
) -> None:
    key = make_key("RS256")

    class Broken(Key):
        @property
        def jwk(self) -> dict[str, Any]:
            return {"kty": "RSA", "kid": self.kid, "use": "sig", "n": "!!!", "e": "AQAB"}

    issuer.keys.append(Broken("RS256", key.private, kid=key.kid))
    verifier = await verifier_for(issuer, session)
    _refused(await verifier.verify(issuer.token(key)), "the access token is malformed")


@pytest.mark.parametrize(
    ("changes", "usable"),
    [
        ({}, True),
        ({"alg": "ES256"}, True),
        ({"alg": "ES384"}, False),  # a key made for another algorithm
        ({"use": "enc"}, False),  # an encryption key
        ({"use": "sig"}, True),
        ({"kty": "RSA"}, False),  # a key of another family
    ],
)
async def test_keys_are_filtered_by_alg_use_and_family(
    changes: dict[str, str], usable: bool, issuer: Issuer, session: aiohttp.ClientSession
) -> None:
    from outrider.sidecar.inbound.auth import key_matches_alg

    key = make_key("ES256")
    jwk = {k: v for k, v in {**key.jwk, **changes}.items() if k not in ("alg", "use") or k in changes}
    assert key_matches_alg(jwk, "ES256") is usable
    verifier = await verifier_for(issuer, session)
    verifier._jwks._keys = [jwk]
    result = await verifier.verify(issuer.token(key))
    if usable:
        assert isinstance(result, Principal)
    else:
        _refused(result, "not signed by a key of the trusted issuer")


def test_key_family_needs_the_right_kty() -> None:
    from outrider.sidecar.inbound.auth import key_matches_alg

    assert key_matches_alg({"kty": "RSA"}, "PS256") and key_matches_alg({"kty": "OKP"}, "EdDSA")
    assert not key_matches_alg({"kty": "oct"}, "HS256")
    assert not key_matches_alg({}, "RS256")


async def test_unknown_kid_after_the_first_load_refreshes_the_jwks(
    issuer: Issuer, session: aiohttp.ClientSession
) -> None:
    old = make_key("ES256")
    issuer.keys.append(old)
    verifier = await verifier_for(issuer, session, jwks_min_refresh_interval_s=0)
    assert isinstance(await verifier.verify(issuer.token(old)), Principal)
    assert issuer.jwks_fetches == 1  # a known kid does not refetch
    new = make_key("ES256")
    issuer.keys.append(new)
    assert isinstance(await verifier.verify(issuer.token(new)), Principal)
    assert issuer.jwks_fetches == 2


class _Clock:
    """`time` as the verifier sees it, with the wall clock moved on (monotonic left alone)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


async def test_cached_tokens_expire_with_the_leeway(
    issuer: Issuer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    from outrider.sidecar.inbound import auth

    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session, leeway_s=30)
    exp = int(time.time()) + 300
    token = issuer.token(key, exp=exp)
    assert isinstance(await verifier.verify(token), Principal)
    verifier._jwks._keys = []
    clock = _Clock(exp + 20 - time.time())
    monkeypatch.setattr(auth, "time", clock)
    assert isinstance(await verifier.verify(token), Principal)  # inside the leeway: cached
    clock.offset = exp + 40 - time.time()
    _refused(await verifier.verify(token), "the access token has expired")
    clock.offset = 0
    # the expired entry was dropped: the next try goes to the (now empty) key set
    _refused(await verifier.verify(token), "not signed by a key of the trusted issuer")


class _At:
    """`time` stopped at one instant (monotonic left alone)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic()


async def test_a_cached_token_expires_at_exactly_exp_plus_the_leeway(
    issuer: Issuer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PyJWT's rule (`exp <= now - leeway` is expired) holds for a cached token too, to the instant
    from outrider.sidecar.inbound import auth

    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session, leeway_s=30)
    exp = int(time.time()) + 300
    token = issuer.token(key, exp=exp)
    assert isinstance(await verifier.verify(token), Principal)
    monkeypatch.setattr(auth, "time", _At(exp + 29.5))
    assert isinstance(await verifier.verify(token), Principal)
    monkeypatch.setattr(auth, "time", _At(exp + 30))
    _refused(await verifier.verify(token), "the access token has expired")


async def test_token_cache_evicts_the_least_recently_used(
    issuer: Issuer, session: aiohttp.ClientSession
) -> None:
    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session, token_cache_size=2)
    first, second, third = (issuer.token(key, jti=str(n)) for n in range(3))
    for token in (first, second, first, third):  # `first` is used again, so `second` is the oldest
        assert isinstance(await verifier.verify(token), Principal)
    verifier._jwks._keys = []
    assert isinstance(await verifier.verify(first), Principal)
    assert isinstance(await verifier.verify(third), Principal)
    _refused(await verifier.verify(second), "not signed by a key of the trusted issuer")


async def test_no_token_cache_when_its_size_is_zero(issuer: Issuer, session: aiohttp.ClientSession) -> None:
    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session, token_cache_size=0)
    token = issuer.token(key)
    assert isinstance(await verifier.verify(token), Principal)
    verifier._jwks._keys = []
    _refused(await verifier.verify(token), "not signed by a key of the trusted issuer")


async def test_refusals_are_401_invalid_token(issuer: Issuer, session: aiohttp.ClientSession) -> None:
    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session)
    head = b64(json.dumps({"alg": "ES256", "kid": key.kid}).encode())
    _refused(await verifier.verify("not-a-jwt"), "not a JWT")
    # PyJWT itself refuses a payload that is not a JSON object
    _refused(await verifier.verify(f"{head}.{b64(b'[1, 2]')}.{b64(b'sig')}"), "malformed")
    _refused(await verifier.verify(f"{head}.{b64(b'{not json')}.{b64(b'sig')}"), "malformed")
    _refused(await verifier.verify(issuer.token(key, exp="9999999999")), "exp")
    other = make_key("ES256")
    other.kid = key.kid
    _refused(await verifier.verify(issuer.token(other)), "signature is invalid")
    stranger = make_key("ES256")
    _refused(await verifier.verify(issuer.token(stranger)), "not signed by a key of the trusted issuer")


def test_metadata_document_and_challenges_in_full() -> None:
    config = InboundConfig.from_mapping(
        {
            "issuer": "https://idp.example",
            "resource": RESOURCE,
            "required_scopes": ["mcp:tools", "mcp:read"],
            "algorithms": ["ES256", "RS256"],
        }
    )
    assert metadata_url("https://mcp.example.com/a/b/?q=1#f") == (
        "https://mcp.example.com/.well-known/oauth-protected-resource/a/b"
    )
    assert protected_resource_metadata(config) == {
        "resource": RESOURCE,
        "authorization_servers": ["https://idp.example"],
        "bearer_methods_supported": ["header"],
        "resource_signing_alg_values_supported": ["ES256", "RS256"],
        "scopes_supported": ["mcp:tools", "mcp:read"],
    }
    no_scopes = InboundConfig.from_mapping({"issuer": "https://idp.example", "resource": RESOURCE})
    assert "scopes_supported" not in protected_resource_metadata(no_scopes)
    meta = f'resource_metadata="{metadata_url(RESOURCE)}"'
    assert www_authenticate(AuthFailure(403, "insufficient_scope", "lacks"), config) == (
        f'Bearer {meta}, error="insufficient_scope", error_description="lacks", scope="mcp:tools mcp:read"'
    )
    # only printable ASCII without quotes or backslashes goes into the header
    assert www_authenticate(AuthFailure(401, "invalid_token", 'a\\b"c\x7fd\x1fé ok'), config) == (
        f'Bearer {meta}, error="invalid_token", error_description="abcd ok"'
    )
    assert www_authenticate(AuthFailure(401, "invalid_token", "x"), no_scopes) == (
        f'Bearer {meta}, error="invalid_token", error_description="x"'
    )
    assert www_authenticate(AuthFailure(401, None, "no credentials"), config) == f"Bearer {meta}"


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scope": "a b"}, ("a", "b")),
        ({"scp": ["a", 7, "b"]}, ("a", "b")),
        ({"scp": "a  b"}, ("a", "b")),
        ({"scope": "a", "scp": ["b"]}, ("a",)),
        ({"scp": 7}, ()),
        ({}, ()),
    ],
)
def test_scopes_from_scope_or_scp(claims: dict[str, Any], scopes: tuple[str, ...]) -> None:
    from outrider.sidecar.inbound.auth import principal_from_claims

    assert principal_from_claims({"sub": "a", **claims}).scopes == scopes


def test_delegation_chain_is_bounded_and_skips_odd_subjects() -> None:
    from outrider.sidecar.inbound.auth import principal_from_claims

    act: dict[str, Any] = {"sub": "last"}
    for n in range(30):
        act = {"sub": f"a{n}", "act": act}
    chain = principal_from_claims({"sub": "x", "act": act}).delegation
    assert len(chain) == 16 and chain[0] == "a29" and chain[-1] == "a14"
    odd = principal_from_claims({"sub": "x", "act": {"sub": 7, "act": {"sub": "b"}}}).delegation
    assert odd == ("b",)


async def test_missing_scopes_are_refused_with_403(issuer: Issuer, session: aiohttp.ClientSession) -> None:
    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session, required_scopes=["mcp:tools", "mcp:read"])
    for claims, missing in (({}, "mcp:tools mcp:read"), ({"scope": "mcp:read other"}, "mcp:tools")):
        result = await verifier.verify(issuer.token(key, **claims))
        assert result == AuthFailure(403, "insufficient_scope", f"the token lacks scope(s): {missing}")
    assert isinstance(await verifier.verify(issuer.token(key, scp=["mcp:read", "mcp:tools"])), Principal)


async def test_a_stale_key_set_is_refetched_even_for_a_known_kid(
    issuer: Issuer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    from outrider.sidecar.inbound import auth

    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session, jwks_refresh_interval_s=60, token_cache_size=0)
    assert isinstance(await verifier.verify(issuer.token(key)), Principal)
    assert issuer.jwks_fetches == 1

    class Later(_Clock):
        def monotonic(self) -> float:
            return time.monotonic() + 61

    monkeypatch.setattr(auth, "time", Later(0))
    assert isinstance(await verifier.verify(issuer.token(key)), Principal)
    assert issuer.jwks_fetches == 2


async def test_a_configured_jwks_uri_skips_discovery(issuer: Issuer, session: aiohttp.ClientSession) -> None:
    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session, jwks_uri=issuer.url + "/keys")
    assert isinstance(await verifier.verify(issuer.token(key)), Principal)
    assert (issuer.discovery_fetches, issuer.jwks_fetches) == (0, 1)


def test_groups_roles_and_client_id_from_claims() -> None:
    from outrider.sidecar.inbound.auth import claim_strings, principal_from_claims

    claims = {
        "sub": "a",
        "client_id": "cli",
        "realm_access": {"roles": ["admin", "admin", "", 7, "ops"]},
        "groups": "team-a",
        "roles": ["ops", "x"],
    }
    principal = principal_from_claims(claims, ("groups",), ("realm_access.roles", "roles"))
    assert (principal.client_id, principal.groups, principal.roles) == (
        "cli",
        ("team-a",),
        ("admin", "ops", "x"),
    )
    assert principal_from_claims({"sub": "a", "azp": "agent", "client_id": "cli"}).client_id == "agent"
    assert claim_strings({"a": {"b": "x"}}, ("a.b.c", "a.b", "missing")) == ("x",)
    assert len(claim_strings({"g": [f"g{n}" for n in range(300)]}, ("g",))) == 256


@pytest.mark.parametrize(
    ("sans", "expected"),
    [
        ((("URI", "spiffe://td/ns/a/sa/b"),), "spiffe://td/ns/a/sa/b"),
        ((("DNS", "x"), ("URI", "spiffe://td/a")), "spiffe://td/a"),
        ((("URI", "spiffe://td/a"), ("URI", "spiffe://td/b")), None),
        ((("URI", "https://td/a"),), None),
        ((), None),
    ],
)
def test_peer_spiffe_id_needs_exactly_one_spiffe_uri(
    sans: tuple[tuple[str, str], ...], expected: str | None
) -> None:
    from outrider.sidecar.inbound.auth import peer_spiffe_id

    assert peer_spiffe_id({"subjectAltName": sans}) == expected
    assert peer_spiffe_id(None) is None and peer_spiffe_id({}) is None


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_discovery_falls_back_to_rfc8414_and_refuses_odd_jwks_uris(
    session: aiohttp.ClientSession,
) -> None:
    key = make_key("ES256")
    served: dict[str, Any] = {}

    async def as_metadata(_: web.Request) -> web.Response:
        return web.json_response(served)

    async def keys(_: web.Request) -> web.Response:
        return web.json_response({"keys": [key.jwk]})

    app = web.Application()
    app.router.add_get("/.well-known/oauth-authorization-server", as_metadata)
    app.router.add_get("/keys", keys)
    runner, url = await _serve(app)
    try:
        served["jwks_uri"] = url + "/keys"
        config = InboundConfig.from_mapping({"issuer": url + "/", "resource": RESOURCE})
        jwks = JwksCache(config, session)
        await jwks.refresh(force=True)
        assert jwks.loaded and await jwks.keys_for(None) == [key.jwk]
        for odd in ("file:///etc/passwd", 7, None):
            served["jwks_uri"] = odd
            other = JwksCache(config, session)
            await other.refresh(force=True)
            assert not other.loaded
            assert other.last_error == f"no discovery document with a jwks_uri under {url}"
    finally:
        await runner.cleanup()


async def test_unreachable_issuer_refuses_with_401(session: aiohttp.ClientSession) -> None:
    config = InboundConfig.from_mapping({"issuer": f"http://127.0.0.1:{free_port()}", "resource": RESOURCE})
    jwks = JwksCache(config, session)
    await jwks.refresh(force=True)
    key = make_key("ES256")
    token = jwt.encode({"sub": "a"}, key.private, algorithm="ES256", headers={"kid": key.kid})
    _refused(
        await TokenVerifier(config, jwks).verify(token), "the issuer's signing keys are not available yet"
    )


async def test_a_wrong_key_under_the_same_kid_does_not_hide_the_right_one(
    issuer: Issuer, session: aiohttp.ClientSession
) -> None:
    key = make_key("ES256")
    impostor = make_key("ES256")
    impostor.kid = key.kid
    issuer.keys += [impostor, key]
    verifier = await verifier_for(issuer, session)
    assert isinstance(await verifier.verify(issuer.token(key)), Principal)
    roles = await verifier_for(issuer, session, group_claims=["groups"], role_claims=["roles"])
    principal = await roles.verify(issuer.token(key, groups=["g"], roles=["r"]))
    assert isinstance(principal, Principal) and (principal.groups, principal.roles) == (("g",), ("r",))


async def test_every_refusal_in_full(issuer: Issuer, session: aiohttp.ClientSession) -> None:
    """The exact answer for each way a token fails: status, RFC 6750 code and the description the caller
    reads in `error_description` (token-free)."""
    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session)
    now = int(time.time())
    rsa_key = make_key("RS256")
    public_pem = rsa_key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"iss": issuer.url, "sub": "mallory", "aud": RESOURCE, "exp": now + 60}
    head = b64(json.dumps({"alg": "ES256", "kid": key.kid}).encode())
    twin = make_key("ES256")
    twin.kid = key.kid
    without_sub = jwt.encode(
        {"iss": issuer.url, "aud": RESOURCE, "exp": now + 60}, key.private, "ES256", {"kid": key.kid}
    )
    cases = {
        "not-a-jwt": "the access token is not a JWT",
        hs256(claims, public_pem, key.kid): "the token's signing algorithm is not allowed",
        f"{head}.{b64(b'{not json')}.{b64(b'sig')}": "the access token is malformed",
        issuer.token(make_key("ES256")): "the token was not signed by a key of the trusted issuer",
        issuer.token(twin): "the token signature is invalid",
        issuer.token(key, exp=now - 60): "the access token has expired",
        issuer.token(key, nbf=now + 600): "the access token is not valid yet",
        issuer.token(key, aud="https://elsewhere/mcp"): "the access token is not meant for this resource",
        issuer.token(key, iss="https://evil.example"): "the access token was issued by an untrusted issuer",
        without_sub: "the access token lacks the 'sub' claim",
        jwt.encode(
            {"iss": issuer.url, "sub": "a", "aud": RESOURCE}, key.private, "ES256", {"kid": key.kid}
        ): "the access token lacks the 'exp' claim",
        jwt.encode(
            {"iss": issuer.url, "sub": "a", "exp": now + 60}, key.private, "ES256", {"kid": key.kid}
        ): "the access token lacks the 'aud' claim",
    }
    for token, description in cases.items():
        assert await verifier.verify(token) == AuthFailure(401, "invalid_token", description), description


async def test_why_the_keys_are_missing_is_said_and_cleared_once_they_load(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """`last_error` is what /readyz shows while the keys are not loaded: one line per kind of failure,
    logged once (not per retry), gone after a good fetch; a failed refresh keeps the keys it had."""
    key = make_key("ES256")
    answer: dict[str, Any] = {"status": 500, "body": b"oops"}

    async def keys(_: web.Request) -> web.Response:
        return web.Response(status=answer["status"], body=answer["body"], content_type="application/json")

    app = web.Application()
    app.router.add_get("/keys", keys)
    runner, url = await _serve(app)
    try:
        config = InboundConfig.from_mapping({"issuer": url, "resource": RESOURCE, "jwks_uri": url + "/keys"})
        jwks = JwksCache(config, session)
        previous = None
        for status, body, why in (
            (500, b"oops", f"JWKS {url}/keys answered HTTP 500"),
            (200, b'{"keys": 5}', f"JWKS {url}/keys has no 'keys' list"),
            (200, b"[1]", f"JWKS {url}/keys has no 'keys' list"),
            (200, b"not json", "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"),
        ):
            answer.update(status=status, body=body)
            with caplog.at_level(logging.WARNING, logger="outrider.inbound.auth"):
                caplog.clear()
                await jwks.refresh(force=True)
                await jwks.refresh(force=True)  # the same failure again: not logged twice
            assert not jwks.loaded and jwks.last_error == why
            warnings = [r.getMessage() for r in caplog.records]
            expected = [f"cannot fetch the issuer's signing keys: {why} (check inbound.issuer/jwks_uri)"]
            assert warnings == ([] if why == previous else expected), warnings
            previous = why
        answer.update(status=200, body=json.dumps({"keys": [key.jwk, "junk", 7]}).encode())
        with caplog.at_level(logging.INFO, logger="outrider.inbound.auth"):
            caplog.clear()
            await jwks.refresh(force=True)
        assert [r.getMessage() for r in caplog.records] == [f"JWKS fetched again from {url}/keys (1 keys)"]
        assert jwks.loaded and jwks.last_error is None and await jwks.keys_for(key.kid) == [key.jwk]
        answer.update(status=503, body=b"")
        await jwks.refresh(force=True)
        assert jwks.loaded and await jwks.keys_for(key.kid) == [key.jwk]  # the last good keys stay
        assert jwks.last_error == f"JWKS {url}/keys answered HTTP 503"
    finally:
        await runner.cleanup()


def test_principal_from_odd_claims_keeps_only_strings() -> None:
    """Introspection answers (RFC 7662) use it too: `iss`, `azp`, `sub` may be missing or odd."""
    odd = principal_from_claims({"iss": 5, "azp": ["x"], "client_id": {"a": 1}})
    assert (odd.subject, odd.issuer, odd.client_id) == ("", None, None)
    assert principal_from_claims({"sub": 7, "client_id": "cli"}).subject == "7"
    assert principal_from_claims({"sub": "a", "client_id": "cli"}).client_id == "cli"


def test_challenge_and_metadata_text_edges() -> None:
    config = InboundConfig.from_mapping(
        {"issuer": "https://idp.example", "resource": "https://h.example/tX/"}
    )
    assert metadata_url(config.resource) == "https://h.example/.well-known/oauth-protected-resource/tX"
    failure = AuthFailure(401, "invalid_token", 'X-ray "quoted" \\ back\x01slash\u00e9')
    assert www_authenticate(failure, config) == (
        'Bearer resource_metadata="https://h.example/.well-known/oauth-protected-resource/tX", '
        'error="invalid_token", error_description="X-ray quoted  backslash"'
    )
    assert peer_spiffe_id({"subject": ((("commonName", "x"),),)}) is None  # no SAN at all


async def test_a_cached_token_past_its_leeway_is_refused_in_full(
    issuer: Issuer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    from outrider.sidecar.inbound import auth

    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session, leeway_s=0)
    exp = int(time.time()) + 300
    token = issuer.token(key, exp=exp)
    assert isinstance(await verifier.verify(token), Principal)
    monkeypatch.setattr(auth, "time", _Clock(exp + 5 - time.time()))
    assert await verifier.verify(token) == AuthFailure(401, "invalid_token", "the access token has expired")


async def test_a_kid_that_is_not_a_string_is_refused(issuer: Issuer, session: aiohttp.ClientSession) -> None:
    """PyJWT refuses it before any key is looked up (so `auth.py`'s own str check is belt and braces)."""
    key = make_key("ES256")
    issuer.keys.append(key)
    verifier = await verifier_for(issuer, session)
    head = b64(json.dumps({"alg": "ES256", "kid": 5}).encode())
    token = f"{head}.{b64(json.dumps({'sub': 'a'}).encode())}.{b64(b'sig')}"
    assert await verifier.verify(token) == AuthFailure(401, "invalid_token", "the access token is not a JWT")


async def test_no_keys_yet_is_said_in_full(session: aiohttp.ClientSession) -> None:
    config = InboundConfig.from_mapping({"issuer": f"http://127.0.0.1:{free_port()}", "resource": RESOURCE})
    jwks = JwksCache(config, session)
    await jwks.refresh(force=True)
    key = make_key("ES256")
    token = jwt.encode({"sub": "a"}, key.private, algorithm="ES256", headers={"kid": key.kid})
    assert await TokenVerifier(config, jwks).verify(token) == AuthFailure(
        401, "invalid_token", "the issuer's signing keys are not available yet"
    )


async def test_discovery_under_an_issuer_path_and_odd_documents(session: aiohttp.ClientSession) -> None:
    """An issuer with a path (Keycloak realms, Entra tenants) ending in any character; a discovery
    document that is not a JSON object is no document."""
    key = make_key("ES256")
    served: dict[str, Any] = {}

    async def discovery(_: web.Request) -> web.Response:
        return web.json_response(served["doc"])

    async def keys(_: web.Request) -> web.Response:
        return web.json_response({"keys": [key.jwk]})

    app = web.Application()
    app.router.add_get("/realms/teamX/.well-known/openid-configuration", discovery)
    app.router.add_get("/keys", keys)
    runner, url = await _serve(app)
    try:
        issuer = url + "/realms/teamX"
        config = InboundConfig.from_mapping({"issuer": issuer, "resource": RESOURCE})
        served["doc"] = {"issuer": issuer, "jwks_uri": url + "/keys"}
        jwks = JwksCache(config, session)
        await jwks.refresh(force=True)
        assert jwks.loaded and await jwks.keys_for(key.kid) == [key.jwk]
        served["doc"] = ["jwks_uri", url + "/keys"]
        odd = JwksCache(config, session)
        await odd.refresh(force=True)
        assert not odd.loaded and odd.last_error == f"no discovery document with a jwks_uri under {issuer}"
    finally:
        await runner.cleanup()


async def test_concurrent_refreshes_share_one_fetch_and_a_first_load_is_quiet(
    issuer: Issuer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    key = make_key("ES256")
    issuer.keys.append(key)
    jwks = JwksCache(config_for(issuer), session)
    with caplog.at_level(logging.INFO, logger="outrider.inbound.auth"):
        await asyncio.gather(jwks.refresh(), jwks.refresh(), jwks.refresh())
    assert jwks.loaded and issuer.jwks_fetches == 1 and jwks.last_error is None
    assert [r.getMessage() for r in caplog.records] == []  # nothing was wrong: nothing "fetched again"


async def test_discovery_accepts_an_https_jwks_uri(session: aiohttp.ClientSession) -> None:
    async def discovery(_: web.Request) -> web.Response:
        return web.json_response({"jwks_uri": f"https://127.0.0.1:{closed}/keys"})

    closed = free_port()
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    runner, url = await _serve(app)
    try:
        jwks = JwksCache(InboundConfig.from_mapping({"issuer": url, "resource": RESOURCE}), session)
        await jwks.refresh(force=True)
        # the https URI was taken: the failure is fetching it, not finding it
        assert jwks.last_error is not None and not jwks.last_error.startswith("no discovery document")
        assert f"127.0.0.1:{closed}" in jwks.last_error
    finally:
        await runner.cleanup()


async def test_jwks_is_bounded_in_keys_and_in_bytes(issuer: Issuer, session: aiohttp.ClientSession) -> None:
    keys = [make_key("ES256") for _ in range(5)]
    issuer.keys.extend(keys)
    verifier = await verifier_for(issuer, session, jwks_max_keys=2)
    # Only the first two keys are kept: a token signed with the third is refused (unknown kid).
    assert isinstance(await verifier.verify(issuer.token(keys[1])), Principal)
    assert isinstance(await verifier.verify(issuer.token(keys[4])), AuthFailure)
    # A JWKS document over 1 MiB is refused whole; the keys held before stay in use.
    issuer.padding = "a" * (1 << 20)
    cache = JwksCache(config_for(issuer), session)
    await cache.refresh(force=True)
    assert not cache.loaded and cache.last_error is not None and "larger than" in cache.last_error
    issuer.padding = ""
    await cache.refresh(force=True)
    assert cache.loaded
    # exactly 1 MiB is still taken, one byte more is not
    async with session.get(issuer.url + "/keys") as response:
        size = len(await response.read())
    for extra, loaded in ((0, True), (1, False)):
        issuer.padding = "a" * ((1 << 20) - size + extra)
        cache = JwksCache(config_for(issuer), session)
        await cache.refresh(force=True)
        assert cache.loaded is loaded, cache.last_error
    assert cache.last_error == f"JWKS {issuer.url}/keys is larger than {1 << 20} bytes"


async def test_a_jwks_over_the_key_limit_is_logged_with_what_is_kept(
    issuer: Issuer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    issuer.keys.extend(make_key("ES256") for _ in range(2))
    with caplog.at_level(logging.WARNING, logger="outrider.inbound.auth"):
        await verifier_for(issuer, session, jwks_max_keys=2)  # exactly the limit: nothing to say
        assert not caplog.records
        issuer.keys.append(make_key("ES256"))
        cache = JwksCache(config_for(issuer, jwks_max_keys=2), session)
        await cache.refresh(force=True)
        await cache.refresh(force=True)  # the same JWKS again: said once, not at every refresh
        issuer.keys.append(make_key("ES256"))
        await cache.refresh(force=True)
    assert [r.getMessage() for r in caplog.records] == [
        f"JWKS {issuer.url}/keys lists 3 keys; keeping the first 2 (inbound.jwks_max_keys)",
        f"JWKS {issuer.url}/keys lists 4 keys; keeping the first 2 (inbound.jwks_max_keys)",
    ]
