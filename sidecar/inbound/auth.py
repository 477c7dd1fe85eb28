"""Caller authentication as an OAuth resource server (MCP authorization) and as a SPIFFE mTLS peer.

Decisions are pure functions over plain data; `JwksCache` is the only part that talks to the IdP.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import jwt

from outrider.sidecar.inbound.claims import claim_problem, not_an_access_token
from outrider.sidecar.inbound.config import InboundConfig
from outrider.sidecar.telemetry.observer import Principal

log = logging.getLogger("outrider.inbound.auth")

WELL_KNOWN = "/.well-known/oauth-protected-resource"
# RFC 6750 §2.1 b64token: anything else (spaces, raw bytes, non-ASCII) is not a bearer token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_FAMILY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


@dataclass(frozen=True)
class AuthFailure:
    """Why a caller is refused; `description` is token-free and safe to send back."""

    status: int  # 401, or 403 for missing scopes
    error: str | None  # RFC 6750 error code, None when no credentials were sent
    description: str


def metadata_url(resource: str) -> str:
    """RFC 9728 §3.1: the well-known path goes between the host and the resource's path."""
    parts = urlsplit(resource)
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, WELL_KNOWN + path, "", ""))


def protected_resource_metadata(config: InboundConfig) -> dict[str, Any]:
    document: dict[str, Any] = {
        "resource": config.resource,
        "authorization_servers": list(config.metadata_servers),
        "bearer_methods_supported": ["header"],
        "resource_signing_alg_values_supported": list(config.algorithms),
    }
    if config.required_scopes:
        document["scopes_supported"] = list(config.required_scopes)
    return document


def www_authenticate(failure: AuthFailure, config: InboundConfig) -> str:
    """The `WWW-Authenticate` challenge (RFC 6750 §3 + RFC 9728 §5.1); values never echo the token."""
    params: list[str] = []
    if config.resource:
        params.append(f'resource_metadata="{metadata_url(config.resource)}"')
    if failure.error:
        params.append(f'error="{failure.error}"')
        params.append(f'error_description="{_quote_safe(failure.description)}"')
    if failure.error == "insufficient_scope" and config.required_scopes:
        params.append(f'scope="{" ".join(config.required_scopes)}"')
    return "Bearer " + ", ".join(params) if params else "Bearer"


def _quote_safe(text: str) -> str:
    return "".join(c for c in text if c not in '"\\' and 0x20 <= ord(c) < 0x7F)


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _B64TOKEN.fullmatch(token):
        return None
    return token


def token_fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _delegation(claims: Mapping[str, Any]) -> tuple[str, ...]:
    chain: list[str] = []
    act = claims.get("act")
    while isinstance(act, dict) and len(chain) < 16:
        sub = act.get("sub")
        if isinstance(sub, str):
            chain.append(sub)
        act = act.get("act")
    return tuple(chain)


def _scopes(claims: Mapping[str, Any]) -> tuple[str, ...]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return tuple(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        return tuple(s for s in scp if isinstance(s, str))
    if isinstance(scp, str):
        return tuple(scp.split())
    return ()


def claim_strings(claims: Mapping[str, Any], paths: tuple[str, ...]) -> tuple[str, ...]:
    """The strings at the dotted claim `paths` (a list, or one string), in order, without repeats.

    Keycloak puts realm roles at `realm_access.roles`; Entra ID and Okta use top-level `groups`/`roles`.
    """
    found: list[str] = []
    for path in paths:
        value: Any = claims
        for part in path.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for item in items[:256]:
            if isinstance(item, str) and item and item not in found:
                found.append(item)
    return tuple(found)


def principal_from_claims(
    claims: Mapping[str, Any], group_claims: tuple[str, ...] = (), role_claims: tuple[str, ...] = ()
) -> Principal:
    client_id = claims.get("azp") or claims.get("client_id")
    issuer = claims.get("iss")
    return Principal(
        kind="oidc",
        subject=str(claims.get("sub", "")),
        issuer=issuer if isinstance(issuer, str) else None,
        client_id=client_id if isinstance(client_id, str) else None,
        delegation=_delegation(claims),
        scopes=_scopes(claims),
        groups=claim_strings(claims, group_claims),
        roles=claim_strings(claims, role_claims),
    )


def missing_scopes(principal: Principal, required: tuple[str, ...]) -> tuple[str, ...]:
    have = set(principal.scopes)
    return tuple(s for s in required if s not in have)


def key_matches_alg(jwk: Mapping[str, Any], alg: str) -> bool:
    """A key only verifies the algorithm family it was made for (no RSA key under ES256, no HS*)."""
    if jwk.get("alg") not in (None, alg):
        return False
    if jwk.get("use") not in (None, "sig"):
        return False
    return jwk.get("kty") == _FAMILY.get(alg[:2])


class JwksCache:
    """The issuer's signing keys, fetched with OIDC/RFC 8414 discovery, refreshed on an unknown `kid`.

    Refreshes are single-flight and rate-limited, so a flood of tokens with random `kid`s makes at
    most one IdP call per `min_interval`.
    """

    def __init__(self, config: InboundConfig, session: aiohttp.ClientSession) -> None:
        self._config = config
        self._session = session
        self._keys: list[dict[str, Any]] = []
        self._listed = 0  # keys the last fetched JWKS listed, before `jwks_max_keys` cut them
        self._fetched_at = 0.0
        self._attempted_at = float("-inf")
        self._inflight: asyncio.Task[None] | None = None
        self._jwks_uri = config.jwks_uri
        self.last_error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._fetched_at > 0

    async def refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._attempted_at < self._config.jwks_min_refresh_interval_s:
            if self._inflight is not None:
                await asyncio.shield(self._inflight)
            return
        if self._inflight is None:
            self._attempted_at = now
            self._inflight = asyncio.create_task(self._fetch())
        task = self._inflight
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._inflight is task:
                self._inflight = None

    async def keys_for(self, kid: str | None) -> list[dict[str, Any]]:
        """Keys that may have signed a token with this `kid`, refreshing once if none is known."""
        stale = time.monotonic() - self._fetched_at > self._config.jwks_refresh_interval_s
        found = self._select(kid)
        if not found or stale:
            await self.refresh()
            found = self._select(kid)
        return found

    def _select(self, kid: str | None) -> list[dict[str, Any]]:
        if kid is None:
            return list(self._keys)
        return [k for k in self._keys if k.get("kid") == kid]

    async def _fetch(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            if self._jwks_uri is None:
                self._jwks_uri = await self._discover()
            async with self._session.get(self._jwks_uri, timeout=timeout) as response:
                if response.status != 200:
                    raise _FetchError(f"JWKS {self._jwks_uri} answered HTTP {response.status}")
                document = json.loads(await _read_bounded(response, JWKS_MAX_BYTES, self._jwks_uri))
            keys = document.get("keys") if isinstance(document, dict) else None
            if not isinstance(keys, list):
                raise _FetchError(f"JWKS {self._jwks_uri} has no 'keys' list")
            usable = [k for k in keys if isinstance(k, dict)]
            limit = self._config.jwks_max_keys
            if len(usable) > limit and len(usable) != self._listed:  # once per change, not per refresh
                log.warning(
                    "JWKS %s lists %d keys; keeping the first %d (inbound.jwks_max_keys)",
                    self._jwks_uri,
                    len(usable),
                    limit,
                )
            self._keys = usable[:limit]
            self._listed = len(usable)
            self._fetched_at = time.monotonic()
            if self.last_error is not None:
                log.info("JWKS fetched again from %s (%d keys)", self._jwks_uri, len(self._keys))
            self.last_error = None
        except (aiohttp.ClientError, TimeoutError, ValueError, _FetchError) as exc:
            message = str(exc) if isinstance(exc, _FetchError) else f"{type(exc).__name__}: {exc}"
            if message != self.last_error:
                log.warning(
                    "cannot fetch the issuer's signing keys: %s (check inbound.issuer/jwks_uri)", message
                )
            self.last_error = message

    async def _discover(self) -> str:
        timeout = aiohttp.ClientTimeout(total=10)
        issuer = (self._config.issuer or "").rstrip("/")
        for suffix in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
            url = issuer + suffix
            async with self._session.get(url, timeout=timeout) as response:
                if response.status != 200:
                    continue
                document = json.loads(await response.read())
            uri = document.get("jwks_uri") if isinstance(document, dict) else None
            if isinstance(uri, str) and uri.startswith(("https://", "http://")):
                return uri
        raise _FetchError(f"no discovery document with a jwks_uri under {issuer}")


class _FetchError(Exception):
    pass


# A JWKS document is a few KB; the cap keeps a broken or hostile endpoint from filling the heap.
JWKS_MAX_BYTES = 1 << 20


async def _read_bounded(response: aiohttp.ClientResponse, limit: int, url: str) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            raise _FetchError(f"JWKS {url} is larger than {limit} bytes")
    return bytes(body)


class TokenVerifier:
    """Checks a bearer JWT: allowed algorithm, key from the JWKS, iss, aud, exp/nbf/iat, scopes."""

    def __init__(self, config: InboundConfig, jwks: JwksCache) -> None:
        self._config = config
        self._jwks = jwks
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    async def verify(self, token: str, *, fingerprint: str | None = None) -> Principal | AuthFailure:
        """`fingerprint`: `token_fingerprint(token)` when the caller already computed it."""
        fingerprint = fingerprint or token_fingerprint(token)
        cached = self._cache.get(fingerprint)
        now = time.time()
        if cached is not None:
            principal, expires = cached
            if now < expires + self._config.leeway_s:
                self._cache.move_to_end(fingerprint)
                return principal
            del self._cache[fingerprint]
            return AuthFailure(401, "invalid_token", "the access token has expired")
        result = await self._verify_uncached(token)
        if isinstance(result, tuple):
            principal, expires = result
            missing = missing_scopes(principal, self._config.required_scopes)
            if missing:
                return AuthFailure(
                    403, "insufficient_scope", f"the token lacks scope(s): {' '.join(missing)}"
                )
            if self._config.token_cache_size:
                self._cache[fingerprint] = (principal, expires)
                while len(self._cache) > self._config.token_cache_size:
                    self._cache.popitem(last=False)
            return principal
        return result

    async def _verify_uncached(self, token: str) -> tuple[Principal, float] | AuthFailure:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return AuthFailure(401, "invalid_token", "the access token is not a JWT")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._config.algorithms:
            return AuthFailure(401, "invalid_token", "the token's signing algorithm is not allowed")
        # Claim shapes before PyJWT sees them: it would coerce `"exp": "9999999999"` with int() and
        # crash on `1e400`. Refusing an unverified token for its shape reveals nothing.
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except (jwt.InvalidTokenError, ValueError, TypeError):
            return AuthFailure(401, "invalid_token", "the access token is malformed")
        if not isinstance(unverified, dict):
            return AuthFailure(401, "invalid_token", "the access token's payload is not a JSON object")
        problem = claim_problem(unverified) or not_an_access_token(
            header, unverified, self._config.require_access_token_typ
        )
        if problem is not None:
            return AuthFailure(401, "invalid_token", problem)
        kid = header.get("kid")
        candidates = [k for k in await self._jwks.keys_for(kid if isinstance(kid, str) else None)]
        candidates = [k for k in candidates if key_matches_alg(k, alg)]
        if not candidates:
            if not self._jwks.loaded:
                return AuthFailure(401, "invalid_token", "the issuer's signing keys are not available yet")
            return AuthFailure(
                401, "invalid_token", "the token was not signed by a key of the trusted issuer"
            )
        failure = AuthFailure(401, "invalid_token", "the token signature is invalid")
        for jwk in candidates:
            try:
                key = jwt.PyJWK(jwk, algorithm=alg).key
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self._config.resource,
                    issuer=self._config.issuer,
                    leeway=self._config.leeway_s,
                    options={"require": ["exp", "iss", "aud", "sub"]},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                return AuthFailure(401, "invalid_token", "the access token has expired")
            except jwt.ImmatureSignatureError:
                return AuthFailure(401, "invalid_token", "the access token is not valid yet")
            except jwt.InvalidAudienceError:
                return AuthFailure(401, "invalid_token", "the access token is not meant for this resource")
            except jwt.InvalidIssuerError:
                return AuthFailure(401, "invalid_token", "the access token was issued by an untrusted issuer")
            except jwt.MissingRequiredClaimError as exc:
                return AuthFailure(401, "invalid_token", f"the access token lacks the {exc.claim!r} claim")
            except (jwt.PyJWTError, ValueError, TypeError):
                # The rest of PyJWT's errors, a JWKS key it cannot load (`InvalidKeyError`, which is
                # neither an InvalidTokenError nor a PyJWKError) included: this key cannot vouch for
                # the token, another candidate still may.
                failure = AuthFailure(401, "invalid_token", "the access token is malformed")
                continue
            principal = principal_from_claims(claims, self._config.group_claims, self._config.role_claims)
            return principal, float(claims["exp"])
        return failure


def peer_spiffe_id(peercert: Mapping[str, Any] | None) -> str | None:
    """The SPIFFE ID from a verified peer certificate (`ssl.getpeercert()`): its only URI SAN."""
    if not peercert:
        return None
    uris = [v for k, v in peercert.get("subjectAltName", ()) if k == "URI"]
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        return None
    return str(uris[0])
