"""RFC 7662 token introspection for opaque access tokens, with a bounded cache keyed by the token's hash.

`judge` is the pure decision over an introspection answer; `Introspector` is the HTTP shell (client
authentication with the JWT-SVID or a mounted secret, single-flight, cache honouring `exp`/`active`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from outrider.sidecar.exchange.oauth import ClientCredential, authenticated
from outrider.sidecar.identity import IdentityUnavailable, WorkloadIdentity
from outrider.sidecar.inbound.auth import AuthFailure, principal_from_claims, token_fingerprint
from outrider.sidecar.inbound.issuers import IntrospectionConfig
from outrider.sidecar.telemetry.observer import Principal

log = logging.getLogger("outrider.inbound.introspection")

MAX_ANSWER_BYTES = 64 * 1024
Clock = Callable[[], float]


@dataclass(frozen=True)
class Introspected:
    """An active token: who it names, its DPoP binding, and until when this answer may be reused."""

    principal: Principal
    jkt: str | None
    reuse_until: float


def _audiences(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def judge(
    document: Mapping[str, Any],
    *,
    issuer: str,
    audience: str | None,
    required_scopes: tuple[str, ...],
    now: float,
    leeway_s: float,
    cache_ttl_s: float,
    group_claims: tuple[str, ...] = (),
    role_claims: tuple[str, ...] = (),
    require_audience: bool = False,
) -> Introspected | AuthFailure:
    """Decide on an RFC 7662 §2.2 answer; only a JSON `true` counts as active. `aud` is checked when
    the answer has one, and an answer without one is refused when `require_audience` is set."""
    if document.get("active") is not True:
        return AuthFailure(401, "invalid_token", "the access token is not active (expired or revoked)")
    exp = document.get("exp")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
        return AuthFailure(401, "invalid_token", "the introspection answer's exp is not a NumericDate")
    if exp is not None and exp + leeway_s <= now:
        return AuthFailure(401, "invalid_token", "the access token has expired")
    nbf = document.get("nbf")
    if isinstance(nbf, int | float) and not isinstance(nbf, bool) and nbf - leeway_s > now:
        return AuthFailure(401, "invalid_token", "the access token is not valid yet")
    iss = document.get("iss")
    if iss is not None and iss != issuer:
        return AuthFailure(401, "invalid_token", "the access token was issued by another issuer")
    if audience is not None and require_audience and "aud" not in document:
        return AuthFailure(401, "invalid_token", "the introspection answer names no audience ('aud')")
    if audience is not None and "aud" in document and audience not in _audiences(document.get("aud")):
        return AuthFailure(401, "invalid_token", "the access token is not meant for this resource")
    subject = document.get("sub") or document.get("username")
    if not isinstance(subject, str) or not subject:
        return AuthFailure(401, "invalid_token", "the introspection answer names no subject")
    claims = {**document, "sub": subject, "iss": issuer}
    principal = principal_from_claims(claims, group_claims, role_claims)
    missing = [s for s in required_scopes if s not in principal.scopes]
    if missing:
        return AuthFailure(403, "insufficient_scope", f"the token lacks scope(s): {' '.join(missing)}")
    cnf = document.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    until = now + cache_ttl_s
    if exp is not None:
        until = min(until, float(exp))
    return Introspected(principal, jkt if isinstance(jkt, str) and jkt else None, until)


class _Secret:
    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def read(self) -> str:
        try:
            value = self._path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            value = ""
        if not value:
            raise _Unavailable(f"the introspection client secret file {self._path} is unreadable or empty")
        return value


class _Unavailable(Exception):
    pass


class Introspector:
    """Introspects tokens at one issuer; answers (active or not) are cached by the token's SHA-256."""

    def __init__(
        self,
        config: IntrospectionConfig,
        *,
        issuer: str,
        audience: str | None,
        required_scopes: tuple[str, ...],
        leeway_s: float,
        identity: WorkloadIdentity | None,
        session: aiohttp.ClientSession,
        clock: Clock = time.time,
        group_claims: tuple[str, ...] = (),
        role_claims: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self._group_claims = group_claims
        self._role_claims = role_claims
        self._issuer = issuer
        self._audience = audience
        self._required = required_scopes
        self._leeway = leeway_s
        self._identity = identity
        self._session = session
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Introspected | AuthFailure, float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[Introspected | AuthFailure]] = {}
        self._secret = _Secret(config.client_secret_file) if config.client_secret_file else None
        self._ssl = ssl.create_default_context(cafile=config.ca_file) if config.ca_file else None
        self.calls = 0
        self.cache_hits = 0
        self._last_error: str | None = None

    def __len__(self) -> int:
        return len(self._cache)

    async def introspect(self, token: str, *, fingerprint: str | None = None) -> Introspected | AuthFailure:
        """`fingerprint`: `token_fingerprint(token)` when the caller already computed it (`Presented`)."""
        key = fingerprint or token_fingerprint(token)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None:
            result, until = cached
            if now < until:
                self.cache_hits += 1
                self._cache.move_to_end(key)
                return result
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._introspect_and_cache(key, token))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _introspect_and_cache(self, key: str, token: str) -> Introspected | AuthFailure:
        result = await self._call(token)
        now = self._clock()
        if isinstance(result, Introspected):
            until = result.reuse_until
        elif result.status == 401 and result.error == "invalid_token":
            until = now + self.config.cache_ttl_s  # a revoked token never comes back to life
        else:
            return result  # the introspection endpoint failed: ask again next time
        if self.config.cache_size and until > now:
            self._cache[key] = (result, until)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return result

    async def _credential(self) -> ClientCredential:
        config = self.config
        if config.auth == "jwt-svid":
            if self._identity is None:
                raise _Unavailable("no workload identity to authenticate the introspection request")
            try:
                svid = await self._identity.jwt_svid(config.assertion_audience or self._issuer)
            except IdentityUnavailable as exc:
                raise _Unavailable(f"no JWT-SVID for the introspection request ({exc})") from None
            return ClientCredential(
                client_id=config.client_id, assertion_type=config.assertion_type, assertion=svid
            )
        if config.auth == "client-secret":
            assert self._secret is not None
            return ClientCredential(
                client_id=config.client_id,
                secret=self._secret.read(),
                secret_method=config.client_secret_method,
            )
        return ClientCredential(client_id=config.client_id)

    async def _call(self, token: str) -> Introspected | AuthFailure:
        self.calls += 1
        try:
            credential = await self._credential()
        except _Unavailable as exc:
            return self._unavailable(str(exc))
        request = authenticated({"token": token, "token_type_hint": "access_token"}, credential)
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        try:
            async with self._session.post(
                self.config.endpoint,
                data=request.form,
                headers=request.headers,
                timeout=timeout,
                ssl=self._ssl or True,
                allow_redirects=False,
            ) as response:
                body = await response.content.read(MAX_ANSWER_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._unavailable(f"the introspection endpoint is unreachable ({type(exc).__name__})")
        if status != 200 or len(body) > MAX_ANSWER_BYTES:
            return self._unavailable(f"the introspection endpoint answered HTTP {status}")
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            document = None
        if not isinstance(document, dict):
            return self._unavailable("the introspection answer is not a JSON object")
        if self._last_error is not None:
            log.info("token introspection at %s works again", self.config.endpoint)
            self._last_error = None
        return judge(
            document,
            issuer=self._issuer,
            audience=self._audience,
            required_scopes=self._required,
            now=self._clock(),
            leeway_s=self._leeway,
            cache_ttl_s=self.config.cache_ttl_s,
            group_claims=self._group_claims,
            role_claims=self._role_claims,
            require_audience=self.config.require_audience,
        )

    def _unavailable(self, why: str) -> AuthFailure:
        if why != self._last_error:
            log.warning("token introspection failing: %s", why)
            self._last_error = why
        # RFC 6750 has no "try later" code; 401 invalid_token would make clients drop a good token.
        return AuthFailure(503, None, "the token cannot be checked right now (introspection unavailable)")
