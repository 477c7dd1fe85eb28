"""A STAND-IN for the Microsoft identity platform (Entra ID) v2.0 endpoints, for tests only.

Entra cannot be reached from the test machines, so this server follows Microsoft's published
request and response shapes on a real socket:
- on-behalf-of flow: https://learn.microsoft.com/entra/identity-platform/v2-oauth2-on-behalf-of-flow
  (grant_type jwt-bearer, requested_token_use=on_behalf_of, assertion, scope, client_assertion; the
  success answer without issued_token_type; the error answer with error_codes, and `claims` when
  Conditional Access demands a step-up, e.g. AADSTS50076 / interaction_required AADSTS50079);
- federated identity credentials (workload identity federation):
  https://learn.microsoft.com/entra/workload-id/workload-identity-federation and
  https://learn.microsoft.com/graph/api/resources/federatedidentitycredential (issuer, subject,
  audiences = ["api://AzureADTokenExchange"]; the external token's issuer is resolved through its
  OIDC discovery document and JWKS, fetched over HTTP);
- error codes: https://learn.microsoft.com/entra/identity-platform/reference-error-codes
  (AADSTS700211/700212/700213 federated credential mismatches, AADSTS700024 expired assertion,
  AADSTS7000215 bad secret, AADSTS50013 / AADSTS500133 bad user assertion, AADSTS7000114 app-only).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

FIC_AUDIENCE = "api://AzureADTokenExchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_CHANGED = "Due to a configuration change made by your administrator, or because you moved to a new location,"
_NO_FIC = "No matching federated identity record found for presented assertion"


@dataclass(frozen=True)
class FederatedCredential:
    issuer: str
    subject: str
    audiences: tuple[str, ...] = (FIC_AUDIENCE,)


@dataclass(frozen=True)
class AppRegistration:
    client_id: str
    app_id_uri: str
    federated: tuple[FederatedCredential, ...] = ()
    secret: str | None = None
    scopes: tuple[str, ...] = ()  # delegated scopes this API exposes
    # APIs (App ID URIs) this app may call on behalf of a user (admin-consented permissions).
    permissions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class EntraUser:
    name: str
    oid: str
    mfa_policy: str | None = None  # a Conditional Access policy id requiring MFA (AADSTS50076)
    must_enrol: bool = False  # MFA enrolment required (interaction_required, AADSTS50079)


class EntraError(Exception):
    def __init__(self, error: str, code: int, message: str, status: int = 400, claims: str | None = None):
        super().__init__(message)
        self.error, self.code, self.message, self.status, self.claims = error, code, message, status, claims


class EntraStandIn:
    """`async with EntraStandIn(apps=..., users=...) as entra:` on loopback; tenant-scoped endpoints."""

    def __init__(
        self,
        *,
        apps: Sequence[AppRegistration],
        users: Sequence[EntraUser],
        tenant: str = "7f3c2a51-0000-4c1e-9d2b-5ad1e0b7c001",
        seen: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.tenant = tenant
        self.apps = {a.client_id: a for a in apps}
        self.users = {u.name: u for u in users}
        self.seen = seen  # every credential that crosses this server (the leak check scans for them)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.requests = 0
        self.issued: list[dict[str, Any]] = []
        self.errors: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.url}/{self.tenant}/v2.0"

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/{self.tenant}/oauth2/v2.0/token"

    async def __aenter__(self) -> EntraStandIn:
        app = web.Application()
        app.router.add_get(f"/{self.tenant}/v2.0/.well-known/openid-configuration", self._discovery)
        app.router.add_get(f"/{self.tenant}/discovery/v2.0/keys", self._keys)
        app.router.add_post(f"/{self.tenant}/oauth2/v2.0/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- tokens a user would get by signing in (what the MCP client holds) -------------------------

    def sign_in(
        self, user: str, *, client_id: str, scopes: Sequence[str] = ("access_as_user",), mfa: bool = False
    ) -> str:
        """A v2.0 delegated access token for `client_id`'s API, as after an interactive sign-in."""
        person = self.users[user]
        return self._sign(
            {
                "aud": client_id,
                "sub": f"sub-{person.oid}",
                "oid": person.oid,
                "preferred_username": f"{user}@contoso.example",
                "name": user.title(),
                "scp": " ".join(scopes),
                "azp": "mcp-client-app",
                "amr": ["pwd", "mfa"] if mfa else ["pwd"],
            },
            3600,
        )

    def app_only(self, *, client_id: str, caller: str = "daemon-app") -> str:
        """A client-credentials (app-only) token: roles, no scp, idtyp=app: no user to act for."""
        return self._sign(
            {
                "aud": client_id,
                "sub": caller,
                "oid": caller,
                "roles": ["Data.Read"],
                "idtyp": "app",
                "azp": caller,
            },
            3600,
        )

    def verify(self, token: str, *, audience: str) -> dict[str, Any]:
        claims: dict[str, Any] = jwt.decode(
            token, self._key.public_key(), algorithms=["RS256"], audience=audience, issuer=self.issuer
        )
        return claims

    def _sign(self, claims: dict[str, Any], ttl: int) -> str:
        now = int(time.time())
        body = {
            "iss": self.issuer,
            "tid": self.tenant,
            "ver": "2.0",
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
        }
        token = jwt.encode(
            {**body, **claims}, self._key, algorithm="RS256", headers={"kid": self.kid, "typ": "JWT"}
        )
        self.seen(token)
        return token

    # -- endpoints -------------------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.issuer,
                "token_endpoint": self.token_endpoint,
                "jwks_uri": f"{self.url}/{self.tenant}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def _keys(self, request: web.Request) -> web.Response:
        jwk = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        return web.json_response({"keys": [{**jwk, "kid": self.kid, "use": "sig", "kty": "RSA"}]})

    async def _token(self, request: web.Request) -> web.Response:
        self.requests += 1
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        for name in ("assertion", "client_assertion", "client_secret"):
            if fields.get(name):
                self.seen(fields[name])
        try:
            answer = await self._on_behalf_of(fields)
        except EntraError as exc:
            self.errors.append(f"AADSTS{exc.code}")
            now = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
            trace = uuid.uuid4()
            body: dict[str, Any] = {
                "error": exc.error,
                "error_description": f"AADSTS{exc.code}: {exc.message}\r\nTrace ID: {trace}\r\n"
                f"Correlation ID: {uuid.uuid4()}\r\nTimestamp: {now}",
                "error_codes": [exc.code],
                "timestamp": now,
                "trace_id": str(trace),
                "correlation_id": str(uuid.uuid4()),
            }
            if exc.claims:
                body["claims"] = exc.claims
            return web.json_response(body, status=exc.status)
        return web.json_response(answer)

    async def _on_behalf_of(self, form: Mapping[str, str]) -> dict[str, Any]:
        if form.get("grant_type") != JWT_BEARER:
            raise EntraError("unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if form.get("requested_token_use") != "on_behalf_of":
            raise EntraError(
                "invalid_request",
                900144,
                "The request body must contain the parameter: 'requested_token_use'.",
            )
        app = self.apps.get(form.get("client_id", ""))
        if app is None:
            raise EntraError(
                "unauthorized_client", 700016, "Application was not found in the directory.", 400
            )
        await self._authenticate_client(app, form)
        user_claims = self._user_assertion(app, form.get("assertion", ""))
        target, scopes = self._scope(app, form.get("scope", ""))
        person = next((u for u in self.users.values() if u.oid == user_claims.get("oid")), None)
        if person is not None and person.must_enrol:
            claims = json.dumps(
                {
                    "access_token": {
                        "polids": {
                            "essential": True,
                            "values": [str(uuid.uuid5(uuid.NAMESPACE_URL, person.name))],
                        }
                    }
                }
            )
            raise EntraError(
                "interaction_required",
                50079,
                f"{_CHANGED} you must enroll in multi-factor authentication to access '{target.client_id}'.",
                claims=claims,
            )
        if person is not None and person.mfa_policy and "mfa" not in (user_claims.get("amr") or []):
            claims = json.dumps(
                {"access_token": {"capolids": {"essential": True, "values": [person.mfa_policy]}}}
            )
            raise EntraError(
                "invalid_grant",
                50076,
                f"{_CHANGED} you must use multi-factor authentication to access '{target.client_id}'.",
                claims=claims,
            )
        issued = self._sign(
            {
                "aud": target.client_id,
                "sub": user_claims["sub"],
                "oid": user_claims["oid"],
                "preferred_username": user_claims.get("preferred_username"),
                "name": user_claims.get("name"),
                "scp": " ".join(scopes),
                "azp": app.client_id,
                "azpacr": "2" if form.get("client_assertion") else "1",
            },
            3599,
        )
        self.issued.append(self.verify(issued, audience=target.client_id))
        return {
            "token_type": "Bearer",
            "scope": " ".join(f"{target.app_id_uri}/{s}" for s in scopes),
            "expires_in": 3599,
            "ext_expires_in": 3599,
            "access_token": issued,
        }

    async def _authenticate_client(self, app: AppRegistration, form: Mapping[str, str]) -> None:
        assertion = form.get("client_assertion")
        if assertion is None:
            if app.secret is None or form.get("client_secret") != app.secret:
                raise EntraError("invalid_client", 7000215, "Invalid client secret provided.", 401)
            return
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise EntraError("invalid_client", 7000216, "'client_assertion_type' is malformed.", 401)
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.InvalidTokenError:
            raise EntraError(
                "invalid_client", 700027, "Client assertion failed signature validation.", 401
            ) from None
        matches = [f for f in app.federated if f.issuer == unverified.get("iss")]
        if not matches:
            raise EntraError(
                "invalid_client",
                700211,
                f"{_NO_FIC} issuer '{unverified.get('iss')}'.",
                401,
            )
        matches = [f for f in matches if f.subject == unverified.get("sub")]
        if not matches:
            raise EntraError(
                "invalid_client",
                700213,
                f"{_NO_FIC} subject '{unverified.get('sub')}'.",
                401,
            )
        credential = matches[0]
        # The issuer's OIDC discovery document, then its JWKS: over HTTP, as Entra does.
        keys = await self._issuer_keys(credential.issuer)
        key = next((k for k in keys if k.get("kid") == header.get("kid")), None)
        if key is None:
            raise EntraError(
                "invalid_client", 700027, "Client assertion failed signature validation. (key not found)", 401
            )
        try:
            jwt.decode(
                assertion,
                jwt.PyJWK(key).key,
                algorithms=[str(header.get("alg"))],
                audience=list(credential.audiences),
                issuer=credential.issuer,
                options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise EntraError(
                "invalid_client", 700024, "Client assertion is not within its valid time range.", 401
            ) from None
        except jwt.InvalidAudienceError:
            raise EntraError(
                "invalid_client",
                700212,
                f"{_NO_FIC} audience '{unverified.get('aud')}'.",
                401,
            ) from None
        except (jwt.InvalidTokenError, jwt.PyJWKError):
            raise EntraError(
                "invalid_client", 700027, "Client assertion failed signature validation.", 401
            ) from None

    async def _issuer_keys(self, issuer: str) -> list[dict[str, Any]]:
        assert self._http is not None
        async with self._http.get(issuer.rstrip("/") + "/.well-known/openid-configuration") as response:
            if response.status != 200:
                raise EntraError(
                    "invalid_client",
                    700027,
                    "The OIDC discovery document of the assertion issuer could not be fetched.",
                    401,
                )
            document = await response.json(content_type=None)
        if document.get("issuer") != issuer:
            raise EntraError(
                "invalid_client",
                700211,
                "The assertion issuer's discovery document names another issuer.",
                401,
            )
        async with self._http.get(document["jwks_uri"]) as response:
            jwks = await response.json(content_type=None)
        keys = jwks.get("keys")
        return [k for k in keys if isinstance(k, dict)] if isinstance(keys, list) else []

    def _user_assertion(self, app: AppRegistration, assertion: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                self._key.public_key(),
                algorithms=["RS256"],
                issuer=self.issuer,
                audience=[app.client_id, app.app_id_uri],
            )
        except jwt.ExpiredSignatureError:
            raise EntraError(
                "invalid_grant", 500133, "Assertion is not within its valid time range."
            ) from None
        except jwt.InvalidTokenError:
            raise EntraError("invalid_grant", 50013, "Assertion failed signature validation.") from None
        if claims.get("idtyp") == "app" or "scp" not in claims:
            raise EntraError(
                "invalid_grant",
                7000114,
                f"Application '{app.client_id}' is not allowed to make application on-behalf-of calls.",
            )
        return claims

    def _scope(self, app: AppRegistration, scope: str) -> tuple[AppRegistration, tuple[str, ...]]:
        for item in scope.split():
            base, _, name = item.rpartition("/")
            target = next((a for a in self.apps.values() if a.app_id_uri == base), None)
            if target is None or base not in app.permissions:
                continue
            granted = (
                app.permissions[base]
                if name == ".default"
                else tuple(s for s in (name,) if s in app.permissions[base])
            )
            if granted:
                return target, granted
        raise EntraError(
            "invalid_scope",
            70011,
            f"The provided value for the input parameter 'scope' is not valid. Scope {scope} is not valid",
        )
