"""The project's test identity provider: OIDC discovery, JWKS, users alice/bob and RFC 8693.

Real HTTP(S) on loopback for tests and `make demo`; verifies `jwt-spiffe` client assertions against
a SPIFFE JWT bundle, client secrets and RFC 8705 SVID mTLS. DEVELOPMENT ONLY: users, passwords and
the /dev/mint endpoint exist so tests can make any token they need.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

log = logging.getLogger("outrider.dev.idp")

GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
ASSERTION_TYPE_JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
SVID_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"]


# ---------------------------------------------------------------------------------------------
# Registrations and knobs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevUser:
    name: str
    password: str
    scope: str = "openid profile mcp:tools"
    email: str | None = None
    groups: tuple[str, ...] = ()  # the `groups` claim (Cedar policies test `principal in Group::"..."`)


DEFAULT_USERS: Mapping[str, DevUser] = {
    "alice": DevUser("alice", "alice-password", email="alice@example.com"),
    "bob": DevUser(
        "bob", "bob-password", scope="openid profile", email="bob@example.com", groups=("admins",)
    ),
}


@dataclass(frozen=True)
class ClientRegistration:
    """Who may exchange tokens, how it authenticates, and which audiences it may ask for.

    `spiffe_ids`: accepted `sub` of a jwt-spiffe assertion, or URI SAN of an mTLS client SVID.
    `audiences`: what it may request (`"*"` for any). `subject_audiences`: whose tokens it may
    exchange (the subject token's `aud` must contain one; empty accepts any).
    """

    client_id: str
    spiffe_ids: tuple[str, ...] = ()
    secret: str | None = None
    audiences: tuple[str, ...] = ("*",)
    subject_audiences: tuple[str, ...] = ()
    public: bool = False  # may use the password grant without authenticating (a CLI, the demo)


@dataclass
class Faults:
    """Fault injection for the token-exchange grant (other grants are unaffected)."""

    delay_seconds: float = 0.0  # answer this much later
    http_status: int | None = None  # answer this status with a plain-text body (500, 503, ...)
    oauth_error: str | None = None  # answer 400 {"error": oauth_error}
    oauth_error_status: int = 400
    oauth_error_description: str = "injected OAuth error"
    raw_body: bytes | None = None  # answer 200 with this body (a malformed success)

    def clear(self) -> None:
        self.delay_seconds = 0.0
        self.http_status = None
        self.oauth_error = None
        self.oauth_error_status = 400
        self.oauth_error_description = "injected OAuth error"
        self.raw_body = None


@dataclass
class IdpStats:
    token_requests: int = 0
    exchange_requests: int = 0  # token-exchange grant requests that reached the endpoint
    issued: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class OAuthError(Exception):
    def __init__(self, code: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.status = status


# ---------------------------------------------------------------------------------------------
# SPIFFE JWT bundle sources: trust domain -> {kid: public key}
# ---------------------------------------------------------------------------------------------

Authorities = Mapping[str, Any]  # kid -> cryptography public key


def parse_jwks(jwks: Mapping[str, Any]) -> dict[str, Any]:
    """A JWKS (or SPIFFE bundle document) to {kid: public key}; keys without a kid are skipped."""
    keys: dict[str, Any] = {}
    for entry in jwks.get("keys", []):
        if not isinstance(entry, Mapping) or entry.get("use", "jwt-svid") not in ("jwt-svid", "sig"):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str):
            continue
        keys[kid] = jwt.PyJWK(dict(entry)).key
    return keys


class JwtBundleSource:
    """Where the IdP gets SPIFFE JWT signing keys. Subclasses implement `_load`."""

    def __init__(self, max_age: float = 30.0) -> None:
        self._cache: dict[str, dict[str, Any]] = {}
        self._loaded_at = 0.0
        self._max_age = max_age

    async def _load(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    async def authorities(self, trust_domain: str, kid: str | None) -> Authorities:
        stale = time.monotonic() - self._loaded_at > self._max_age
        unknown_kid = kid is not None and kid not in self._cache.get(trust_domain, {})
        if stale or unknown_kid:
            self._cache = await self._load()
            self._loaded_at = time.monotonic()
        return self._cache.get(trust_domain, {})


class StaticJwtBundles(JwtBundleSource):
    """Fixed JWKS documents by trust domain (tests, or keys known at start-up)."""

    def __init__(self, jwks_by_trust_domain: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__(max_age=float("inf"))
        self._parsed = {td: parse_jwks(doc) for td, doc in jwks_by_trust_domain.items()}

    async def _load(self) -> dict[str, dict[str, Any]]:
        return self._parsed


class CallableJwtBundles(JwtBundleSource):
    """Asks a function each time (an in-process Workload API that rotates its keys)."""

    def __init__(self, fetch: Callable[[], Awaitable[Mapping[str, Mapping[str, Any]]]]) -> None:
        super().__init__(max_age=0.0)
        self._fetch = fetch

    async def _load(self) -> dict[str, dict[str, Any]]:
        return {td: parse_jwks(doc) for td, doc in (await self._fetch()).items()}


class FileJwtBundles(JwtBundleSource):
    """A JSON file: {"trust-domain": JWKS, ...}, re-read when stale (a mounted ConfigMap)."""

    def __init__(self, path: str | Path, max_age: float = 10.0) -> None:
        super().__init__(max_age=max_age)
        self._path = Path(path)

    async def _load(self) -> dict[str, dict[str, Any]]:
        raw = await asyncio.to_thread(self._path.read_text)
        data = json.loads(raw)
        return {td: parse_jwks(doc) for td, doc in data.items()}


class UrlJwtBundles(JwtBundleSource):
    """SPIFFE bundle endpoints (`https_web` profile) by trust domain, fetched over HTTP(S)."""

    def __init__(self, urls: Mapping[str, str], max_age: float = 60.0) -> None:
        super().__init__(max_age=max_age)
        self._urls = dict(urls)

    async def _load(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for td, url in self._urls.items():
                async with session.get(url) as response:
                    response.raise_for_status()
                    out[td] = parse_jwks(await response.json(content_type=None))
        return out


class WorkloadApiJwtBundles(JwtBundleSource):
    """JWT bundles from a SPIFFE Workload API socket via py-spiffe (blocking: run in a thread)."""

    def __init__(self, socket_path: str, max_age: float = 30.0) -> None:
        super().__init__(max_age=max_age)
        self._socket = socket_path if "://" in socket_path else f"unix://{socket_path}"

    def _fetch_sync(self) -> dict[str, dict[str, Any]]:
        from spiffe import WorkloadApiClient

        client = WorkloadApiClient(self._socket)
        try:
            bundle_set = client.fetch_jwt_bundles(timeout=5)
        finally:
            client.close()
        return {str(b.trust_domain): dict(b.jwt_authorities) for b in bundle_set.bundles}

    async def _load(self) -> dict[str, dict[str, Any]]:
        return await asyncio.to_thread(self._fetch_sync)


# ---------------------------------------------------------------------------------------------
# The IdP
# ---------------------------------------------------------------------------------------------


def _trust_domain(spiffe_id: str) -> str | None:
    if not spiffe_id.startswith("spiffe://"):
        return None
    td = spiffe_id.removeprefix("spiffe://").split("/", 1)[0]
    return td or None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class DevIdP:
    """`async with DevIdP(...) as idp:` serves on `idp.url`; `idp.issuer` is its issuer."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        issuer: str | None = None,
        clients: Sequence[ClientRegistration] = (),
        users: Mapping[str, DevUser] | None = None,
        spiffe_bundles: JwtBundleSource | None = None,
        token_ttl: float = 300.0,
        ssl_context: ssl.SSLContext | None = None,
        default_audience: str | None = None,
        dev_mint: bool = True,
        leeway: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self._issuer = issuer
        self.clients = {c.client_id: c for c in clients}
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.spiffe_bundles = spiffe_bundles
        self.token_ttl = token_ttl
        self.ssl_context = ssl_context
        self.default_audience = default_audience
        self.dev_mint = dev_mint
        self.leeway = leeway
        self.faults = Faults()
        self.stats = IdpStats()
        self._key = ec.generate_private_key(ec.SECP256R1())
        public_jwk = json.loads(ECAlgorithm(ECAlgorithm.SHA256).to_jwk(self._key.public_key()))
        # RFC 7638 thumbprint (members in lexicographic order, no spaces) as the key id.
        thumb_input = json.dumps({k: public_jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
        self.kid = _b64url(hashlib.sha256(thumb_input.encode()).digest())
        self._jwk = {**public_jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def issuer(self) -> str:
        return self._issuer or self.url

    @property
    def public_url(self) -> str:
        """The base of the advertised endpoints: the issuer (an http(s) URL when set), else `url`.

        Listening on 0.0.0.0 in a pod, the listening URL is no address a client can use; the issuer
        (the Service's URL) is.
        """
        if self._issuer and self._issuer.startswith(("http://", "https://")):
            return self._issuer.rstrip("/")
        return self.url

    @property
    def token_endpoint(self) -> str:
        return f"{self.public_url}/token"

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._jwk)]}

    def sidecar_config(
        self, *, workload_socket: str, port: int, mcp_port: int, resource: str, audience: str
    ) -> dict[str, Any]:
        """The identity, inbound and exchange sections of a sidecar that trusts this IdP.

        Callers (tests, benchmarks) add their own admin/egress/telemetry sections.
        """
        return {
            "identity": {"socket": workload_socket},
            "inbound": {
                "host": "127.0.0.1",
                "port": port,
                "mcp_port": mcp_port,
                "resource": resource,
                "issuer": self.issuer,
            },
            "exchange": {
                "enabled": True,
                "token_endpoint": self.token_endpoint,
                "issuer": self.issuer,
                "audience": audience,
                "auth": "jwt-svid",
                "actor_token": True,
            },
        }

    async def __aenter__(self) -> DevIdP:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/.well-known/oauth-authorization-server", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_post("/token", self._token)
        app.router.add_get("/userinfo", self._userinfo)
        if self.dev_mint:
            app.router.add_post("/dev/mint", self._mint_endpoint)
        # Short shutdown: a fault-injected slow answer must not hold up the test that asked for it.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await self._listen()
        log.info("dev IdP listening on %s (issuer %s)", self.url, self.issuer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await self._site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def go_down(self) -> None:
        """Stop listening (connections are refused) until `come_back`; same port afterwards."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        assert self._runner is not None
        if self._runner.server is not None:
            # Kept-alive client connections would still be served: drop them too.
            await self._runner.server.shutdown(0.1)

    async def come_back(self) -> None:
        if self._site is None:
            await self._listen()

    # -- tokens ----------------------------------------------------------------------------

    def mint(
        self,
        sub: str,
        *,
        audience: str | Sequence[str] | None = None,
        expires_in: float | None = None,
        scope: str | None = None,
        client_id: str | None = None,
        act: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        typ: str | None = "at+jwt",
    ) -> str:
        """Sign an access token as this IdP. `expires_in` may be negative (an expired token); `typ`
        is the header's (None: none, as many IdPs send; "JWT" with ID-token claims: an ID token)."""
        now = time.time()
        ttl = self.token_ttl if expires_in is None else expires_in
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "iat": int(now),
            "nbf": int(now) - 1,
            "exp": int(now + ttl),
            "jti": uuid.uuid4().hex,
        }
        aud = audience if audience is not None else self.default_audience
        if aud is not None:
            claims["aud"] = aud if isinstance(aud, str) else list(aud)
        user = self.users.get(sub)
        claims["scope"] = scope if scope is not None else (user.scope if user else "")
        if user and user.email:
            claims["email"] = user.email
            claims["preferred_username"] = user.name
        if user and user.groups:
            claims["groups"] = list(user.groups)
        if client_id:
            claims["client_id"] = client_id
            claims["azp"] = client_id
        if act:
            claims["act"] = dict(act)
        if extra:
            claims.update(extra)
        headers = {"kid": self.kid, "typ": typ}  # PyJWT leaves out a typ of None
        return jwt.encode(claims, self._key, algorithm="ES256", headers=headers)

    def verify(self, token: str, *, audience: str | None = None) -> dict[str, Any]:
        """Check a token this IdP issued (signature, issuer, expiry; audience when given)."""
        options: Any = {"require": ["exp", "iss", "sub"], "verify_aud": audience is not None}
        claims: dict[str, Any] = jwt.decode(
            token,
            self._key.public_key(),
            algorithms=["ES256"],
            issuer=self.issuer,
            audience=audience,
            leeway=self.leeway,
            options=options,
        )
        return claims

    # -- handlers --------------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        auth_methods = ["client_secret_basic", "client_secret_post", "tls_client_auth", "spiffe_jwt"]
        return web.json_response(
            {
                "issuer": self.issuer,
                "jwks_uri": f"{self.public_url}/jwks",
                "token_endpoint": self.token_endpoint,
                "userinfo_endpoint": f"{self.public_url}/userinfo",
                "grant_types_supported": ["password", GRANT_TOKEN_EXCHANGE],
                "response_types_supported": ["token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256"],
                "token_endpoint_auth_methods_supported": auth_methods,
                "client_assertion_types_supported": [ASSERTION_TYPE_JWT_SPIFFE],
                "tls_client_certificate_bound_access_tokens": False,
                "scopes_supported": ["openid", "profile", "mcp:tools"],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.jwks)

    async def _userinfo(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        try:
            claims = self.verify(header.removeprefix("Bearer ").strip())
        except jwt.PyJWTError:
            return web.json_response({"error": "invalid_token"}, status=401)
        user = self.users.get(claims["sub"])
        return web.json_response({"sub": claims["sub"], "email": user.email if user else None})

    async def _mint_endpoint(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            sub = body["sub"]
            if not isinstance(sub, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "body must be JSON with a string 'sub'"}, status=400)
        token = self.mint(
            sub,
            audience=body.get("aud"),
            expires_in=body.get("expires_in"),
            scope=body.get("scope"),
            client_id=body.get("client_id"),
            act=body.get("act"),
        )
        return web.json_response({"access_token": token, "token_type": "Bearer"})

    async def _token(self, request: web.Request) -> web.Response:
        self.stats.token_requests += 1
        form = await request.post()
        grant = form.get("grant_type")
        try:
            if grant == GRANT_TOKEN_EXCHANGE:
                self.stats.exchange_requests += 1
                faulted = await self._apply_faults()
                if faulted is not None:
                    return faulted
                return web.json_response(await self._token_exchange(request, form), headers=_NO_STORE)
            if grant == "password":
                return web.json_response(self._password_grant(request, form), headers=_NO_STORE)
            raise OAuthError("unsupported_grant_type", f"grant_type {str(grant)[:80]!r} is not supported")
        except OAuthError as exc:
            self.stats.errors[exc.code] = self.stats.errors.get(exc.code, 0) + 1
            log.info("token request refused: %s: %s", exc.code, exc.description)
            headers = dict(_NO_STORE)
            if exc.status == 401:
                headers["WWW-Authenticate"] = 'Basic realm="outrider-dev-idp"'
            return web.json_response(
                {"error": exc.code, "error_description": exc.description}, status=exc.status, headers=headers
            )

    async def _apply_faults(self) -> web.Response | None:
        f = self.faults
        if f.delay_seconds:
            await asyncio.sleep(f.delay_seconds)
        if f.http_status is not None:
            return web.Response(status=f.http_status, text="injected failure\n")
        if f.oauth_error is not None:
            return web.json_response(
                {"error": f.oauth_error, "error_description": f.oauth_error_description},
                status=f.oauth_error_status,
            )
        if f.raw_body is not None:
            return web.Response(status=200, body=f.raw_body, content_type="application/json")
        return None

    def _password_grant(self, request: web.Request, form: Mapping[str, Any]) -> dict[str, Any]:
        client_id = _field(form, "client_id")
        client = self.clients.get(client_id) if client_id else None
        if client is not None and not client.public:
            self._authenticate_secret(request, form, client)
        user = self.users.get(_field(form, "username") or "")
        password = _field(form, "password") or ""
        if user is None or not hmac.compare_digest(user.password.encode(), password.encode()):
            raise OAuthError("invalid_grant", "unknown user or wrong password")
        audiences = _multi(form, "audience") + _multi(form, "resource")
        scope = _field(form, "scope") or user.scope
        token = self.mint(
            user.name,
            audience=(audiences[0] if len(audiences) == 1 else audiences) if audiences else None,
            scope=scope,
            client_id=client_id,
        )
        self.stats.issued += 1
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int(self.token_ttl),
            "scope": scope,
        }

    async def _token_exchange(self, request: web.Request, form: Mapping[str, Any]) -> dict[str, Any]:
        client, client_principal = await self._authenticate_client(request, form)

        subject_token = _field(form, "subject_token")
        subject_type = _field(form, "subject_token_type")
        if not subject_token or not subject_type:
            raise OAuthError("invalid_request", "subject_token and subject_token_type are required")
        if subject_type not in (TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT):
            raise OAuthError("invalid_request", f"subject_token_type {subject_type[:80]!r} is not supported")
        requested_type = _field(form, "requested_token_type") or TOKEN_TYPE_ACCESS
        if requested_type != TOKEN_TYPE_ACCESS:
            raise OAuthError("invalid_request", "only access tokens can be requested")
        try:
            subject = self.verify(subject_token)
        except jwt.ExpiredSignatureError:
            raise OAuthError("invalid_grant", "the subject token has expired") from None
        except jwt.PyJWTError as exc:
            raise OAuthError(
                "invalid_grant", f"the subject token is not valid here ({type(exc).__name__})"
            ) from None
        if client.subject_audiences:
            aud = subject.get("aud")
            auds = [aud] if isinstance(aud, str) else list(aud or [])
            if not set(auds) & set(client.subject_audiences):
                raise OAuthError(
                    "invalid_grant", f"client {client.client_id} may not exchange tokens for {auds}"
                )

        audiences = _multi(form, "audience") + _multi(form, "resource")
        if not audiences:
            raise OAuthError("invalid_request", "audience or resource is required")
        if "*" not in client.audiences:
            refused = [a for a in audiences if a not in client.audiences]
            if refused:
                raise OAuthError(
                    "invalid_target", f"client {client.client_id} may not request tokens for {refused}"
                )

        subject_scopes = str(subject.get("scope", "")).split()
        requested_scope = _field(form, "scope")
        if requested_scope:
            missing = [s for s in requested_scope.split() if s not in subject_scopes]
            if missing:
                raise OAuthError("invalid_scope", f"scope {missing} exceeds the subject token's scope")
            scope = requested_scope
        else:
            scope = " ".join(subject_scopes)

        actor_sub = client_principal
        actor_token = _field(form, "actor_token")
        if actor_token:
            if _field(form, "actor_token_type") != TOKEN_TYPE_JWT:
                raise OAuthError("invalid_request", f"actor_token_type must be {TOKEN_TYPE_JWT}")
            actor_sub = (await self._verify_svid(actor_token))["sub"]
        act: dict[str, Any] = {"sub": actor_sub}
        if isinstance(subject.get("act"), Mapping):
            act["act"] = subject["act"]

        remaining = float(subject["exp"]) - time.time()
        ttl = max(1.0, min(self.token_ttl, remaining))
        token = self.mint(
            subject["sub"],
            audience=audiences[0] if len(audiences) == 1 else audiences,
            expires_in=ttl,
            scope=scope,
            client_id=client.client_id,
            act=act,
        )
        self.stats.issued += 1
        return {
            "access_token": token,
            "issued_token_type": TOKEN_TYPE_ACCESS,
            "token_type": "Bearer",
            "expires_in": int(ttl),
            "scope": scope,
        }

    # -- client authentication --------------------------------------------------------------

    async def _authenticate_client(
        self, request: web.Request, form: Mapping[str, Any]
    ) -> tuple[ClientRegistration, str]:
        """The registered client and the principal to put in `act.sub`; raises invalid_client."""
        assertion_type = _field(form, "client_assertion_type")
        client_id = _field(form, "client_id")
        if assertion_type is not None:
            if assertion_type != ASSERTION_TYPE_JWT_SPIFFE:
                raise OAuthError(
                    "invalid_client", f"client_assertion_type {assertion_type[:100]!r} is not supported", 401
                )
            claims = await self._verify_svid(_field(form, "client_assertion") or "")
            spiffe_id = str(claims["sub"])
            client = self._client_for_spiffe_id(spiffe_id, client_id)
            return client, spiffe_id
        if request.headers.get("Authorization", "").startswith("Basic ") or "client_secret" in form:
            if not client_id and "client_secret" in form:
                raise OAuthError("invalid_client", "client_secret without client_id", 401)
            client = self._authenticate_secret(request, form, None)
            return client, client.spiffe_ids[0] if client.spiffe_ids else client.client_id
        peer = self._peer_spiffe_id(request)
        if peer is not None:
            if not client_id:
                raise OAuthError("invalid_request", "client_id is required with tls_client_auth (RFC 8705)")
            registered = self.clients.get(client_id)
            if registered is None or peer not in registered.spiffe_ids:
                raise OAuthError(
                    "invalid_client", "the client certificate does not belong to this client", 401
                )
            return registered, peer
        raise OAuthError("invalid_client", "client authentication is required", 401)

    def _authenticate_secret(
        self, request: web.Request, form: Mapping[str, Any], expected: ClientRegistration | None
    ) -> ClientRegistration:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                raw = base64.b64decode(header[6:], validate=True).decode()
                cid, _, secret = raw.partition(":")
                cid, secret = unquote_plus(cid), unquote_plus(secret)
            except ValueError:
                raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
        else:
            cid, secret = _field(form, "client_id") or "", _field(form, "client_secret") or ""
        client = self.clients.get(cid)
        if (
            client is None
            or client.secret is None
            or not hmac.compare_digest(client.secret.encode(), secret.encode())
            or (expected is not None and expected.client_id != cid)
        ):
            raise OAuthError("invalid_client", "client authentication failed", 401)
        return client

    def _client_for_spiffe_id(self, spiffe_id: str, client_id: str | None) -> ClientRegistration:
        if client_id:
            client = self.clients.get(client_id)
            if client is None or spiffe_id not in client.spiffe_ids:
                raise OAuthError(
                    "invalid_client", f"{spiffe_id} is not registered as client {client_id}", 401
                )
            return client
        for client in self.clients.values():
            if spiffe_id in client.spiffe_ids:
                return client
        raise OAuthError("invalid_client", f"{spiffe_id} is not a registered client", 401)

    async def _verify_svid(self, token: str) -> dict[str, Any]:
        """A JWT-SVID whose only audience is this IdP's issuer, signed by its trust domain's keys."""
        if self.spiffe_bundles is None:
            raise OAuthError("invalid_client", "this IdP has no SPIFFE trust bundle configured", 401)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise OAuthError("invalid_client", "the client assertion is not a JWT", 401) from None
        sub = unverified.get("sub")
        td = _trust_domain(sub) if isinstance(sub, str) else None
        if td is None:
            raise OAuthError("invalid_client", "the client assertion's sub is not a SPIFFE ID", 401)
        kid = header.get("kid")
        keys = await self.spiffe_bundles.authorities(td, kid if isinstance(kid, str) else None)
        key = keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise OAuthError(
                "invalid_client", f"no JWT authority of trust domain {td} has key id {kid!r}", 401
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=SVID_ALGORITHMS,
                audience=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise OAuthError("invalid_client", "the JWT-SVID has expired", 401) from None
        except jwt.InvalidAudienceError:
            raise OAuthError(
                "invalid_client", f"the JWT-SVID's audience must be {self.issuer}", 401
            ) from None
        except jwt.PyJWTError as exc:
            raise OAuthError(
                "invalid_client", f"the JWT-SVID is not valid ({type(exc).__name__})", 401
            ) from None
        aud = claims["aud"]
        if isinstance(aud, list) and aud != [self.issuer]:
            # jwt-spiffe: the issuer must be the only audience, so the SVID cannot be replayed elsewhere.
            raise OAuthError(
                "invalid_client", "the JWT-SVID must have this IdP's issuer as its only audience", 401
            )
        return claims

    def _peer_spiffe_id(self, request: web.Request) -> str | None:
        if request.transport is None:
            return None
        ssl_object = request.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return None
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return None
        uris = [
            u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")
        ]
        return uris[0] if len(uris) == 1 else None


_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _field(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) and value else None


def _multi(form: Mapping[str, Any], name: str) -> list[str]:
    getall = getattr(form, "getall", None)
    values = getall(name, []) if getall else ([form[name]] if name in form else [])
    return [v for v in values if isinstance(v, str) and v]


# ---------------------------------------------------------------------------------------------
# python -m outrider.sidecar.dev.idp
# ---------------------------------------------------------------------------------------------


def _parse_client(spec: str) -> ClientRegistration:
    """CLIENT_ID=spiffe://td/a,spiffe://td/b[;secret=S][;audiences=a,b]"""
    head, *options = spec.split(";")
    client_id, _, ids = head.partition("=")
    opts = {key: value for key, _, value in (o.partition("=") for o in options if o)}
    audiences = tuple(a for a in opts.get("audiences", "*").split(",") if a)
    return ClientRegistration(
        client_id=client_id,
        spiffe_ids=tuple(i for i in ids.split(",") if i),
        secret=opts.get("secret"),
        audiences=audiences or ("*",),
        public="public" in opts,
    )


async def _main(args: argparse.Namespace) -> None:
    bundles: JwtBundleSource | None = None
    if args.spiffe_bundle_file:
        bundles = FileJwtBundles(args.spiffe_bundle_file)
    elif args.workload_api:
        bundles = WorkloadApiJwtBundles(args.workload_api)
    clients = [_parse_client(c) for c in args.client] or [
        ClientRegistration("outrider-demo-cli", public=True),
    ]
    async with DevIdP(
        host=args.host,
        port=args.port,
        issuer=args.issuer,
        clients=clients,
        spiffe_bundles=bundles,
        token_ttl=args.token_ttl,
    ) as idp:
        print(f"dev IdP: issuer {idp.issuer} token endpoint {idp.token_endpoint}", flush=True)
        await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m outrider.sidecar.dev.idp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument(
        "--issuer",
        help="issuer identifier and base URL of the advertised endpoints (default: the listening URL)",
    )
    parser.add_argument("--token-ttl", type=float, default=300.0)
    parser.add_argument("--spiffe-bundle-file", help='JSON {"trust-domain": JWKS} for jwt-spiffe assertions')
    parser.add_argument("--workload-api", help="Workload API socket to fetch SPIFFE JWT bundles from")
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        help="CLIENT_ID=SPIFFE_ID[,SPIFFE_ID][;secret=S][;audiences=A,B][;public] (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
