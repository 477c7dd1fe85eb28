"""A STAND-IN for an Okta custom authorization server, for tests only.

Okta cannot be reached from the test machines, so this server follows Okta's published request and
response shapes on a real socket:
- token exchange (on-behalf-of): https://developer.okta.com/docs/guides/set-up-token-exchange/main/
  (grant_type token-exchange, subject_token_type access_token, subject_token, audience, scope; the
  answer with issued_token_type; the service app needs the Token Exchange grant and a rule on the
  target authorization server);
- client authentication: https://developer.okta.com/docs/api/openapi/okta-oauth/guides/client-auth/
  (`private_key_jwt`: client_assertion_type jwt-bearer; the JWT's iss and sub must both be the
  client_id, aud the full URL of the endpoint called, exp at most one hour ahead, jti not reused;
  signed by a key of the client's registered JWKS, which Okta fetches from the client's `jwks_uri`;
  `client_secret_basic` / `client_secret_post` as the alternative);
- introspection and revocation: https://developer.okta.com/docs/api/openapi/okta-oauth/oauth/tag/CustomAS/
  (`/v1/introspect` answers active/scope/username/exp/iat/sub/aud/iss/jti/token_type/client_id/uid;
  `/v1/revoke`), and "access tokens from the org authorization server are opaque: validate them by
  introspection" (https://developer.okta.com/docs/concepts/tokens/).
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True)
class ServiceApp:
    """An API Services app: private_key_jwt with a JWKS URL, or a client secret."""

    client_id: str
    jwks_uri: str | None = None
    secret: str | None = None
    token_exchange: bool = True  # "Token Exchange" grant type enabled on the app
    # What the access policy rule on the target authorization server lets it get: audience -> scopes.
    grants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class _Opaque:
    sub: str
    scope: str
    aud: str
    client_id: str
    exp: int
    iat: int
    jkt: str | None = None
    active: bool = True


class OktaError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


class OktaStandIn:
    """`async with OktaStandIn(apps=...) as okta:`; issuer `{url}/oauth2/default`."""

    def __init__(
        self,
        *,
        apps: Sequence[ServiceApp],
        server_id: str = "default",
        seen: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.server_id = server_id
        self.apps = {a.client_id: a for a in apps}
        self.seen = seen
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._used_jti: set[str] = set()
        self._opaque: dict[str, _Opaque] = {}
        self.requests: dict[str, int] = {"token": 0, "introspect": 0, "revoke": 0}
        self.errors: list[str] = []
        self.issued: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.url}/oauth2/{self.server_id}"

    def endpoint(self, name: str) -> str:
        return f"{self.issuer}/v1/{name}"

    @property
    def token_endpoint(self) -> str:
        return self.endpoint("token")

    async def __aenter__(self) -> OktaStandIn:
        app = web.Application()
        base = f"/oauth2/{self.server_id}"
        app.router.add_get(f"{base}/.well-known/oauth-authorization-server", self._metadata)
        app.router.add_get(f"{base}/.well-known/openid-configuration", self._metadata)
        app.router.add_get(f"{base}/v1/keys", self._keys)
        app.router.add_post(f"{base}/v1/token", self._token)
        app.router.add_post(f"{base}/v1/introspect", self._introspect)
        app.router.add_post(f"{base}/v1/revoke", self._revoke)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- user tokens (what the MCP client holds after signing in) -----------------------------------

    def sign_in(
        self, user: str, *, audience: str, scopes: Sequence[str] = ("mcp:use",), cid: str = "mcp-cli"
    ) -> str:
        """A JWT access token of this authorization server, as after an authorization-code sign-in."""
        return self._sign(
            {
                "sub": f"{user}@example.com",
                "uid": f"00u-{user}",
                "cid": cid,
                "aud": audience,
                "scp": list(scopes),
            },
            3600,
        )

    def opaque(
        self,
        user: str,
        *,
        audience: str,
        scopes: Sequence[str] = ("mcp:use",),
        jkt: str | None = None,
        ttl: int = 3600,
    ) -> str:
        """An opaque access token (only introspection can tell what it is)."""
        token = secrets.token_urlsafe(32)
        now = int(time.time())
        self._opaque[token] = _Opaque(
            f"{user}@example.com", " ".join(scopes), audience, "mcp-cli", now + ttl, now, jkt
        )
        self.seen(token)
        return token

    def revoke(self, token: str) -> None:
        self._opaque[token].active = False

    def verify(self, token: str, *, audience: str) -> dict[str, Any]:
        claims: dict[str, Any] = jwt.decode(
            token, self._key.public_key(), algorithms=["RS256"], audience=audience, issuer=self.issuer
        )
        return claims

    def _sign(self, claims: dict[str, Any], ttl: int) -> str:
        now = int(time.time())
        body = {"ver": 1, "jti": f"AT.{uuid.uuid4().hex}", "iss": self.issuer, "iat": now, "exp": now + ttl}
        token = jwt.encode({**body, **claims}, self._key, algorithm="RS256", headers={"kid": self.kid})
        self.seen(token)
        return token

    # -- endpoints ---------------------------------------------------------------------------------

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.issuer,
                "token_endpoint": self.token_endpoint,
                "introspection_endpoint": self.endpoint("introspect"),
                "revocation_endpoint": self.endpoint("revoke"),
                "jwks_uri": self.endpoint("keys"),
                "grant_types_supported": [TOKEN_EXCHANGE, "authorization_code", "client_credentials"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                    "client_secret_jwt",
                    "private_key_jwt",
                    "none",
                ],
            }
        )

    async def _keys(self, request: web.Request) -> web.Response:
        jwk = RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        return web.json_response({"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]})

    async def _form(self, request: web.Request) -> dict[str, str]:
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        for name in ("subject_token", "client_assertion", "client_secret", "token"):
            if fields.get(name):
                self.seen(fields[name])
        return fields

    def _error(self, exc: OktaError) -> web.Response:
        self.errors.append(exc.error)
        return web.json_response(
            {"error": exc.error, "error_description": exc.description}, status=exc.status
        )

    async def _token(self, request: web.Request) -> web.Response:
        self.requests["token"] += 1
        form = await self._form(request)
        try:
            app = await self._client(request, form, self.token_endpoint)
            return web.json_response(self._exchange(app, form))
        except OktaError as exc:
            return self._error(exc)

    async def _introspect(self, request: web.Request) -> web.Response:
        self.requests["introspect"] += 1
        form = await self._form(request)
        try:
            app = await self._client(request, form, self.endpoint("introspect"))
        except OktaError as exc:
            return self._error(exc)
        return web.json_response(self._introspection(form.get("token", ""), app))

    async def _revoke(self, request: web.Request) -> web.Response:
        self.requests["revoke"] += 1
        form = await self._form(request)
        try:
            await self._client(request, form, self.endpoint("revoke"))
        except OktaError as exc:
            return self._error(exc)
        entry = self._opaque.get(form.get("token", ""))
        if entry is not None:
            entry.active = False
        return web.Response(status=200)

    # -- client authentication ------------------------------------------------------------------------

    async def _client(self, request: web.Request, form: Mapping[str, str], endpoint: str) -> ServiceApp:
        basic = request.headers.get("Authorization", "")
        if basic.startswith("Basic "):
            raw = base64.b64decode(basic[6:]).decode()
            self.seen(basic[6:])
            client_id, _, secret = raw.partition(":")
            client_id, secret = unquote(client_id), unquote(secret)
            self.seen(secret)
            return self._by_secret(client_id, secret)
        if "client_assertion" in form:
            return await self._by_assertion(form, endpoint)
        if "client_secret" in form:
            return self._by_secret(form.get("client_id", ""), form["client_secret"])
        raise OktaError("invalid_client", "Client authentication failed.", 401)

    def _by_secret(self, client_id: str, secret: str) -> ServiceApp:
        app = self.apps.get(client_id)
        if app is None or app.secret is None or not secrets.compare_digest(app.secret, secret):
            raise OktaError(
                "invalid_client", "The client secret supplied for a confidential client is invalid.", 401
            )
        return app

    async def _by_assertion(self, form: Mapping[str, str], endpoint: str) -> ServiceApp:
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OktaError("invalid_client", "The client_assertion_type is invalid.", 401)
        assertion = form["client_assertion"]
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.InvalidTokenError:
            raise OktaError("invalid_client", "The client_assertion token is invalid.", 401) from None
        client_id = unverified.get("iss")
        app = self.apps.get(client_id) if isinstance(client_id, str) else None
        if app is None or app.jwks_uri is None:
            raise OktaError(
                "invalid_client", "The client_assertion token has an invalid 'iss' (no such client).", 401
            )
        if form.get("client_id") not in (None, client_id):
            raise OktaError(
                "invalid_client", "The client_id does not match the client_assertion issuer.", 401
            )
        if unverified.get("sub") != client_id:
            raise OktaError("invalid_client", "The client_assertion token 'sub' must be the client_id.", 401)
        keys = await self._client_keys(app.jwks_uri)
        key = next((k for k in keys if k.get("kid") == header.get("kid")), None)
        if key is None:
            raise OktaError(
                "invalid_client", "The client_assertion signature key was not found in the client JWKS.", 401
            )
        try:
            claims = jwt.decode(
                assertion,
                jwt.PyJWK(key).key,
                algorithms=["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"],
                audience=endpoint,
                options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise OktaError("invalid_client", "The client_assertion token is expired.", 401) from None
        except jwt.InvalidAudienceError:
            raise OktaError(
                "invalid_client",
                "The audience claim for client_assertion must be the endpoint invoked for the request.",
                401,
            ) from None
        except (jwt.InvalidTokenError, jwt.PyJWKError):
            raise OktaError("invalid_client", "The client_assertion signature is invalid.", 401) from None
        if claims["exp"] > time.time() + 3600:
            raise OktaError(
                "invalid_client", "The client_assertion token expiration is too far in the future.", 401
            )
        jti = claims.get("jti")
        if isinstance(jti, str):
            if jti in self._used_jti:
                raise OktaError("invalid_client", "The client_assertion token has already been used.", 401)
            self._used_jti.add(jti)
        return app

    async def _client_keys(self, jwks_uri: str) -> list[dict[str, Any]]:
        assert self._http is not None
        async with self._http.get(jwks_uri) as response:
            if response.status != 200:
                raise OktaError("invalid_client", "The client JWKS could not be fetched.", 401)
            document = await response.json(content_type=None)
        keys = document.get("keys") if isinstance(document, dict) else None
        return [k for k in keys if isinstance(k, dict)] if isinstance(keys, list) else []

    # -- grants -------------------------------------------------------------------------------------

    def _subject(self, token: str) -> tuple[str, str]:
        """(sub, uid) of a subject token this authorization server issued (JWT or opaque)."""
        entry = self._opaque.get(token)
        if entry is not None:
            if not entry.active or entry.exp <= time.time():
                raise OktaError("invalid_grant", "The 'subject_token' is invalid or expired.")
            return entry.sub, entry.sub
        try:
            claims = jwt.decode(
                token,
                self._key.public_key(),
                algorithms=["RS256"],
                issuer=self.issuer,
                options={"verify_aud": False},
            )
        except jwt.InvalidTokenError:
            raise OktaError("invalid_grant", "The 'subject_token' is invalid or expired.") from None
        return str(claims["sub"]), str(claims.get("uid", claims["sub"]))

    def _exchange(self, app: ServiceApp, form: Mapping[str, str]) -> dict[str, Any]:
        if form.get("grant_type") != TOKEN_EXCHANGE:
            raise OktaError(
                "unsupported_grant_type", f"The grant type '{form.get('grant_type')}' is not supported."
            )
        if not app.token_exchange:
            raise OktaError(
                "unauthorized_client", "The client is not authorized to use the provided grant type."
            )
        if form.get("subject_token_type") != ACCESS_TOKEN_TYPE:
            raise OktaError("invalid_request", "The 'subject_token_type' parameter is invalid.")
        audience = form.get("audience")
        if not audience:
            raise OktaError("invalid_request", "The 'audience' parameter is required.")
        if audience not in app.grants:
            raise OktaError(
                "access_denied",
                "Policy evaluation failed for this request, please check the policy configurations.",
            )
        scopes = tuple((form.get("scope") or "").split())
        if not scopes or any(s not in app.grants[audience] for s in scopes):
            raise OktaError(
                "invalid_scope",
                "One or more scopes are not configured for the authorization server resource.",
            )
        sub, uid = self._subject(form.get("subject_token", ""))
        issued = self._sign(
            {"sub": sub, "uid": uid, "cid": app.client_id, "aud": audience, "scp": list(scopes)}, 3600
        )
        self.issued.append(self.verify(issued, audience=audience))
        return {
            "token_type": "Bearer",
            "expires_in": 3600,
            "access_token": issued,
            "scope": " ".join(scopes),
            "issued_token_type": ACCESS_TOKEN_TYPE,
        }

    def _introspection(self, token: str, app: ServiceApp) -> dict[str, Any]:
        entry = self._opaque.get(token)
        if entry is None or not entry.active or entry.exp <= time.time():
            return {"active": False}
        answer: dict[str, Any] = {
            "active": True,
            "scope": entry.scope,
            "username": entry.sub,
            "exp": entry.exp,
            "iat": entry.iat,
            "sub": entry.sub,
            "aud": entry.aud,
            "iss": self.issuer,
            "jti": f"AT.{uuid.uuid5(uuid.NAMESPACE_OID, token).hex}",
            "token_type": "DPoP" if entry.jkt else "Bearer",
            "client_id": entry.client_id,
            "uid": f"00u-{entry.sub}",
        }
        if entry.jkt:
            answer["cnf"] = {"jkt": entry.jkt}
        return answer
