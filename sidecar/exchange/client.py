"""RFC 8693 token exchange against the configured IdP, authenticated with the pod's SVID.

Owns the HTTP call, client authentication (jwt-spiffe assertion, RFC 8705 mTLS, client secret),
answer validation, the bounded cache of issued tokens and single-flight of identical exchanges.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

import aiohttp

from sidecar.exchange import ExchangeError, IssuedToken, TokenExchanger
from sidecar.exchange.config import TOKEN_TYPE_JWT, ExchangeConfig
from sidecar.identity import IdentityUnavailable, WorkloadIdentity
from sidecar.identity.tls import RotatingClientContext

log = logging.getLogger("outrider.exchange")

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ASSERTION_TYPE_JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"

# OAuth errors that say "this user's token may not become that token": the caller would get the
# same answer again, the sidecar is not at fault, so they get 403. Everything else the IdP refuses
# (our client credentials, our registration, our request shape) is the gateway's problem: 502.
DENIED_ERRORS = frozenset({"invalid_grant", "invalid_target", "invalid_scope", "access_denied"})

_JWT_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_SAFE_CODE = re.compile(r"^[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}$")  # RFC 6749 error code charset

Clock = Callable[[], float]

# A token answer is a few KiB; anything far larger is a misbehaving endpoint, not a token.
MAX_ANSWER_BYTES = 256 * 1024


# ---------------------------------------------------------------------------------------------
# Functional core: cache keys, request form, answer validation, error classification.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    subject_hash: str  # sha256 of the subject token: the token itself is never kept as a key
    audience: str | None
    scope: str | None
    resource: str | None


def cache_key(subject_token: str, audience: str | None, scope: str | None, resource: str | None) -> CacheKey:
    digest = hashlib.sha256(subject_token.encode()).hexdigest()
    return CacheKey(digest, audience, scope, resource)


def exchange_form(
    config: ExchangeConfig,
    subject_token: str,
    *,
    audience: str | None,
    scope: str | None,
    actor_token: str | None = None,
) -> dict[str, str]:
    """The RFC 8693 request body, before client authentication is added."""
    form = {
        "grant_type": GRANT_TYPE,
        "subject_token": subject_token,
        "subject_token_type": config.subject_token_type,
    }
    if config.requested_token_type:
        form["requested_token_type"] = config.requested_token_type
    if audience:
        form["audience"] = audience
    if config.resource:
        form["resource"] = config.resource
    if scope:
        form["scope"] = scope
    if actor_token:
        form["actor_token"] = actor_token
        form["actor_token_type"] = TOKEN_TYPE_JWT
    return form


def basic_authorization(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: form-urlencode both parts before base64 (Keycloak and others insist).
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode()).decode()


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Make an IdP-supplied description safe to show: no secrets, nothing token-shaped, one short line."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _JWT_LIKE.sub("[redacted]", text)
    text = " ".join(text.split())
    return text[:200]


def parse_success(
    body: bytes,
    *,
    requested_token_type: str | None,
    audience: str | None,
    now: float,
    secrets: tuple[str, ...] = (),
) -> IssuedToken:
    """Validate a 200 answer of the token endpoint (RFC 8693 §2.2.1); raises ExchangeError(502)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _malformed("the answer is not JSON") from None
    if not isinstance(data, dict):
        raise _malformed("the answer is not a JSON object")
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise _malformed("access_token is missing or not a string")
    issued_type = data.get("issued_token_type")
    if not isinstance(issued_type, str) or not issued_type:
        raise _malformed("issued_token_type is missing (RFC 8693 requires it)")
    secrets = (*secrets, access_token)
    if requested_token_type and issued_type != requested_token_type:
        shown_type = _shown(issued_type, secrets)
        raise _malformed(f"issued_token_type {shown_type!r} is not the requested {requested_token_type!r}")
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = _shown(token_type, secrets)
        raise _malformed(f"token_type {shown!r} is not Bearer (the only type the proxy can forward)")
    expires_in = data.get("expires_in")
    if expires_in is None:
        # RECOMMENDED only; without it the token is used for this call and not cached.
        expires_at = now
    elif isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise _malformed("expires_in is not a positive number")
    else:
        expires_at = now + float(expires_in)
    return IssuedToken(
        access_token=access_token,
        token_type="Bearer",  # noqa: S106 (a token type name, not a secret)
        issued_token_type=issued_type,
        expires_at=expires_at,
        audience=audience or "",
    )


def classify_error(status: int, body: bytes, secrets: tuple[str, ...]) -> ExchangeError:
    """Map a non-200 answer of the token endpoint to a token-free ExchangeError."""
    code: str | None = None
    description = ""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            raw_code = data.get("error")
            if (
                isinstance(raw_code, str)
                and _SAFE_CODE.match(raw_code)
                and redact(raw_code, secrets) == raw_code
            ):
                code = raw_code  # an IdP that echoes a credential as the code gets no code shown
            raw_desc = data.get("error_description")
            if isinstance(raw_desc, str):
                description = redact(raw_desc, secrets)
    except (ValueError, UnicodeDecodeError):
        pass
    if code is None:
        if status == 503:
            return ExchangeError(
                "the identity provider is unavailable (HTTP 503 from its token endpoint)",
                outcome="idp_unavailable",
                http_status=503,
                idp_status=status,
            )
        return ExchangeError(
            f"the identity provider's token endpoint failed (HTTP {status})",
            outcome="idp_error",
            http_status=502,
            idp_status=status,
        )
    detail = f": {description}" if description else ""
    if code in DENIED_ERRORS:
        return ExchangeError(
            f"the identity provider refused to exchange the caller's token ({code}){detail}",
            outcome="denied",
            http_status=403,
            idp_status=status,
            oauth_error=code,
        )
    return ExchangeError(
        f"the identity provider rejected the sidecar's token exchange request ({code}){detail}; "
        "check the exchange configuration and the sidecar's client registration at the IdP",
        outcome="idp_error",
        http_status=502,
        idp_status=status,
        oauth_error=code,
    )


def _shown(value: object, secrets: tuple[str, ...]) -> str:
    """An IdP-supplied short value, or "?" when it is odd or could carry a credential."""
    if isinstance(value, str) and _SAFE_CODE.match(value) and redact(value, secrets) == value:
        return value
    return "?"


def _malformed(why: str) -> ExchangeError:
    return ExchangeError(
        f"the identity provider's token exchange answer is malformed: {why}",
        outcome="idp_error",
        http_status=502,
        idp_status=200,
    )


# ---------------------------------------------------------------------------------------------
# Cache: bounded LRU of issued tokens, each usable until `skew` seconds before it expires.
# ---------------------------------------------------------------------------------------------


class TokenCache:
    def __init__(self, max_size: int, skew: float, clock: Clock = time.time) -> None:
        self._entries: OrderedDict[CacheKey, IssuedToken] = OrderedDict()
        self._max = max_size
        self._skew = skew
        self._clock = clock
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> IssuedToken | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at - self._skew <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: CacheKey, token: IssuedToken) -> None:
        if token.expires_at - self._skew <= self._clock():
            return  # too short-lived to be worth serving twice
        self._entries[key] = token
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
            self.evictions += 1


# ---------------------------------------------------------------------------------------------
# Shell: client credentials and the HTTP call.
# ---------------------------------------------------------------------------------------------


@dataclass
class ExchangeStats:
    requests: int = 0
    cache_hits: int = 0
    idp_calls: int = 0
    coalesced: int = 0  # callers that waited for an identical exchange already in flight
    errors: dict[str, int] = field(default_factory=dict)


class _SecretFile:
    """A client secret from a mounted file, re-read when the file changes (Secrets rotate in place)."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._value = ""

    def read(self) -> str:
        try:
            st = self._path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
            if stamp != self._stamp:
                self._value = self._path.read_text().strip()
                self._stamp = stamp
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ExchangeError(
                f"cannot read the client secret file {self._path} ({why}); "
                "check the mounted Secret named by exchange.client_secret_file",
                outcome="identity_unavailable",
                http_status=503,
            ) from None
        if not self._value:
            raise ExchangeError(
                f"the client secret file {self._path} is empty",
                outcome="identity_unavailable",
                http_status=503,
            )
        return self._value


class OAuthTokenExchanger:
    """`TokenExchanger` over HTTP. One per sidecar process; safe for concurrent use on one loop."""

    def __init__(
        self,
        config: ExchangeConfig,
        identity: WorkloadIdentity,
        session: aiohttp.ClientSession,
        *,
        clock: Clock = time.time,
    ) -> None:
        self.config = config
        self._identity = identity
        self._session = session
        self._clock = clock
        self.cache = TokenCache(config.cache_size, config.cache_skew_seconds, clock)
        self.stats = ExchangeStats()
        self._inflight: dict[CacheKey, asyncio.Task[IssuedToken]] = {}
        self._last_failure: str | None = None
        self._secret = _SecretFile(config.client_secret_file) if config.client_secret_file else None
        # RFC 8705: a client context presenting the current X.509-SVID, rebuilt once per rotation.
        self._mtls = (
            RotatingClientContext(identity, cafile=config.ca_file) if config.auth == "x509-svid" else None
        )
        # An unreadable CA file is reported at start-up (sidecar.mounted_files: /readyz and the log);
        # here it fails each exchange with 503 rather than falling back to the system CAs.
        self._server_ssl: ssl.SSLContext | None = None
        self._ca_problem: str | None = None
        if config.ca_file and not self._mtls:
            try:
                self._server_ssl = ssl.create_default_context(cafile=config.ca_file)
            except (OSError, ssl.SSLError, ValueError):
                self._ca_problem = f"exchange.ca_file {config.ca_file} cannot be loaded"

    async def exchange(
        self, subject_token: str, *, audience: str | None = None, scope: str | None = None
    ) -> IssuedToken:
        self.stats.requests += 1
        audience = audience or self.config.audience
        scope = scope or self.config.scope
        if not subject_token:
            raise self._count(
                ExchangeError("no caller token to exchange", outcome="invalid_request", http_status=401)
            )
        key = cache_key(subject_token, audience, scope, self.config.resource)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.cache_hits += 1
            return replace(cached, cache_hit=True)
        task = self._inflight.get(key)
        if task is None or task.done():
            task = asyncio.create_task(self._exchange_and_cache(key, subject_token, audience, scope))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        else:
            self.stats.coalesced += 1
        # shield: a caller that goes away must not cancel the exchange others are waiting for.
        return await asyncio.shield(task)

    async def _exchange_and_cache(
        self, key: CacheKey, subject_token: str, audience: str | None, scope: str | None
    ) -> IssuedToken:
        try:
            token = await self._call_idp(subject_token, audience, scope)
        except ExchangeError as exc:
            self._note_failure(exc)
            raise self._count(exc) from None
        if self._last_failure is not None:
            log.info("token exchange recovered: the IdP issues tokens again")
            self._last_failure = None
        self.cache.put(key, token)
        return token

    def _note_failure(self, exc: ExchangeError) -> None:
        # Logged once per kind of failure, not per call: an IdP outage under load is one line.
        kind = f"{exc.outcome}/{exc.oauth_error or exc.idp_status}"
        if kind != self._last_failure:
            self._last_failure = kind
            log.warning("token exchange failing (HTTP %s to callers): %s", exc.http_status, exc.message)

    def _forget(self, key: CacheKey, task: asyncio.Task[IssuedToken]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here too, so an error nobody waited for is not logged as lost

    def _count(self, exc: ExchangeError) -> ExchangeError:
        self.stats.errors[exc.outcome] = self.stats.errors.get(exc.outcome, 0) + 1
        return exc

    async def _call_idp(self, subject_token: str, audience: str | None, scope: str | None) -> IssuedToken:
        config = self.config
        assert config.token_endpoint is not None
        secrets: list[str] = [subject_token]
        headers = {"Accept": "application/json"}
        if self._ca_problem is not None:
            raise ExchangeError(
                f"{self._ca_problem}; check the mounted CA bundle",
                outcome="identity_unavailable",
                http_status=503,
            )
        ssl_arg: ssl.SSLContext | bool = self._server_ssl or True

        actor: str | None = None
        if config.actor_token:
            actor = await self._jwt_svid()
            secrets.append(actor)
        form = exchange_form(config, subject_token, audience=audience, scope=scope, actor_token=actor)

        if config.auth == "jwt-svid":
            assertion = actor or await self._jwt_svid()
            secrets.append(assertion)
            form["client_assertion_type"] = ASSERTION_TYPE_JWT_SPIFFE
            form["client_assertion"] = assertion
            if config.client_id:
                form["client_id"] = config.client_id
        elif config.auth == "x509-svid":
            assert self._mtls is not None and config.client_id is not None
            try:
                ssl_arg = self._mtls.current()
            except IdentityUnavailable as exc:
                raise _no_identity(exc) from None
            form["client_id"] = config.client_id
        else:
            assert self._secret is not None and config.client_id is not None
            secret = self._secret.read()
            secrets.append(secret)
            if config.client_secret_method == "basic":  # noqa: S105
                basic = basic_authorization(config.client_id, secret)
                secrets.append(basic.removeprefix("Basic "))  # an IdP may echo the header back
                headers["Authorization"] = basic
            else:
                form["client_id"] = config.client_id
                form["client_secret"] = secret

        timeout = aiohttp.ClientTimeout(
            total=config.timeout_seconds, sock_connect=config.connect_timeout_seconds
        )
        self.stats.idp_calls += 1
        started = self._clock()
        try:
            async with self._session.post(
                config.token_endpoint,
                data=form,
                headers=headers,
                timeout=timeout,
                ssl=ssl_arg,
                allow_redirects=False,
            ) as response:
                body = await response.content.read(MAX_ANSWER_BYTES + 1)
                status = response.status
        except TimeoutError:
            raise ExchangeError(
                f"the identity provider did not answer the token exchange within {config.timeout_seconds:g}s",
                outcome="idp_unavailable",
                http_status=504,
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise ExchangeError(
                f"TLS with the identity provider's token endpoint failed ({type(exc).__name__}); "
                "check exchange.ca_file and the endpoint's certificate",
                outcome="idp_unavailable",
                http_status=502,
            ) from None
        except aiohttp.ClientError as exc:
            raise ExchangeError(
                f"the identity provider's token endpoint is unreachable ({type(exc).__name__})",
                outcome="idp_unavailable",
                http_status=503,
            ) from None
        log.debug("token exchange answered HTTP %s in %.3fs", status, self._clock() - started)
        if len(body) > MAX_ANSWER_BYTES:
            raise ExchangeError(
                f"the identity provider's token endpoint answered more than {MAX_ANSWER_BYTES} bytes",
                outcome="idp_error",
                http_status=502,
                idp_status=status,
            )
        if status != 200:
            raise classify_error(status, body, tuple(secrets))
        return parse_success(
            body,
            requested_token_type=config.requested_token_type,
            audience=audience,
            now=self._clock(),
            secrets=tuple(secrets),
        )

    async def _jwt_svid(self) -> str:
        assert self.config.issuer is not None
        try:
            return await self._identity.jwt_svid(self.config.issuer)
        except IdentityUnavailable as exc:
            raise _no_identity(exc) from None

    def prometheus_text(self) -> bytes:
        """Counters for /metrics on the admin port (a `runtime.metrics` producer)."""
        s = self.stats
        lines = [
            "# HELP outrider_token_exchange_requests_total Token exchanges asked for by the proxy.",
            "# TYPE outrider_token_exchange_requests_total counter",
            f"outrider_token_exchange_requests_total {s.requests}",
            "# HELP outrider_token_exchange_cache_hits_total Exchanges answered from the token cache.",
            "# TYPE outrider_token_exchange_cache_hits_total counter",
            f"outrider_token_exchange_cache_hits_total {s.cache_hits}",
            "# HELP outrider_token_exchange_idp_calls_total Requests sent to the IdP's token endpoint.",
            "# TYPE outrider_token_exchange_idp_calls_total counter",
            f"outrider_token_exchange_idp_calls_total {s.idp_calls}",
            "# HELP outrider_token_exchange_errors_total Failed exchanges by outcome.",
            "# TYPE outrider_token_exchange_errors_total counter",
        ]
        lines += [
            f'outrider_token_exchange_errors_total{{outcome="{k}"}} {v}' for k, v in sorted(s.errors.items())
        ]
        lines += [
            "# HELP outrider_token_exchange_cache_entries Issued tokens held in the cache.",
            "# TYPE outrider_token_exchange_cache_entries gauge",
            f"outrider_token_exchange_cache_entries {len(self.cache)}",
        ]
        return ("\n".join(lines) + "\n").encode()


class DisabledExchanger:
    """Stands in when `exchange.enabled` is false: every exchange fails with a clear reason."""

    async def exchange(
        self, subject_token: str, *, audience: str | None = None, scope: str | None = None
    ) -> IssuedToken:
        raise ExchangeError(
            "token exchange is not configured for this server (exchange.enabled is false)",
            outcome="idp_error",
            http_status=502,
        )


def _no_identity(exc: IdentityUnavailable) -> ExchangeError:
    return ExchangeError(
        f"the sidecar has no usable SPIFFE identity to authenticate the token exchange ({exc})",
        outcome="identity_unavailable",
        http_status=503,
    )


def build_exchanger(
    config: ExchangeConfig, identity: WorkloadIdentity, session: aiohttp.ClientSession
) -> TokenExchanger:
    """The exchanger for this config; `session` is owned by the caller and may be shared."""
    if not config.enabled:
        return DisabledExchanger()
    config.check()
    return OAuthTokenExchanger(config, identity, session)
