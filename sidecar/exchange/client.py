"""RFC 8693 token exchange against the configured IdP, authenticated with the pod's SVID.

Owns the HTTP call, the client credential (JWT-SVID assertion, RFC 8705 mTLS, client secret), the
bounded cache of issued tokens and single-flight of identical exchanges. What the request and the
answers look like is the provider profile's business (`outrider.sidecar.exchange.profiles`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp

from outrider.sidecar.exchange import ExchangeError, IssuedToken, RefusingExchanger, TokenExchanger
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.exchange.oauth import (  # re-exported: the pure core lived here before the profiles
    ASSERTION_TYPE_JWT_SPIFFE,
    DENIED_ERRORS,
    GRANT_TYPE,
    MAX_ANSWER_BYTES,
    CacheKey,
    ClientCredential,
    basic_authorization,
    cache_key,
    classify_error,
    exchange_form,
    parse_success,
    redact,
)
from outrider.sidecar.exchange.profiles import profile_for
from outrider.sidecar.identity import IdentityUnavailable, WorkloadIdentity
from outrider.sidecar.identity.tls import RotatingClientContext

__all__ = [
    "ASSERTION_TYPE_JWT_SPIFFE",
    "DENIED_ERRORS",
    "GRANT_TYPE",
    "MAX_ANSWER_BYTES",
    "CacheKey",
    "DisabledExchanger",
    "OAuthTokenExchanger",
    "TokenCache",
    "basic_authorization",
    "build_exchanger",
    "cache_key",
    "classify_error",
    "exchange_form",
    "parse_success",
    "redact",
]

log = logging.getLogger("outrider.exchange")

Clock = Callable[[], float]


# ---------------------------------------------------------------------------------------------
# Cache: bounded LRU of issued tokens, each usable until `skew` seconds before it expires.
# ---------------------------------------------------------------------------------------------


class TokenCache:
    """Issued tokens by `CacheKey`; what `get` returns is marked `cache_hit`."""

    def __init__(self, max_size: int, skew: float, clock: Clock = time.time, max_ttl: float = 3600.0) -> None:
        self._entries: OrderedDict[CacheKey, IssuedToken] = OrderedDict()
        self._max = max_size
        self._skew = skew
        self._max_ttl = max_ttl
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
        now = self._clock()
        if token.expires_at - self._skew <= now:
            return  # too short-lived to be worth serving twice
        # Stored as what every later `get` serves (a cache hit): no copy per hit. Served no longer
        # than `max_ttl`, whatever lifetime the IdP claimed.
        expires_at = min(token.expires_at, now + self._max_ttl)
        self._entries[key] = replace(token, cache_hit=True, expires_at=expires_at)
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
        self.profile = profile_for(config.profile)
        self._identity = identity
        self._session = session
        self._clock = clock
        self.cache = TokenCache(
            config.cache_size, config.cache_skew_seconds, clock, config.cache_max_ttl_seconds
        )
        self.stats = ExchangeStats()
        self._inflight: dict[CacheKey, asyncio.Task[IssuedToken]] = {}
        self._last_failure: str | None = None
        self._secret = _SecretFile(config.client_secret_file) if config.client_secret_file else None
        # RFC 8705: a client context presenting the current X.509-SVID, rebuilt once per rotation.
        self._mtls = (
            RotatingClientContext(identity, cafile=config.ca_file) if config.auth == "x509-svid" else None
        )
        # An unreadable CA file is reported at start-up (outrider.sidecar.mounted_files: /readyz and the log);
        # here it fails each exchange with 503 rather than falling back to the system CAs.
        self._server_ssl: ssl.SSLContext | None = None
        self._ca_problem: str | None = None
        if config.ca_file and not self._mtls:
            try:
                self._server_ssl = ssl.create_default_context(cafile=config.ca_file)
            except (OSError, ssl.SSLError, ValueError):
                self._ca_problem = f"exchange.ca_file {config.ca_file} cannot be loaded"

    async def exchange(
        self,
        subject_token: str,
        *,
        audience: str | None = None,
        scope: str | None = None,
        issuer: str | None = None,
        subject_hash: str | None = None,
    ) -> IssuedToken:
        self.stats.requests += 1
        audience = audience or self.config.audience
        scope = scope or self.config.scope
        if not subject_token:
            raise self._count(
                ExchangeError("no caller token to exchange", outcome="invalid_request", http_status=401)
            )
        key = cache_key(subject_token, audience, scope, self.config.resource, subject_hash=subject_hash)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
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
        if self._ca_problem is not None:
            raise ExchangeError(
                f"{self._ca_problem}; check the mounted CA bundle",
                outcome="identity_unavailable",
                http_status=503,
            )
        ssl_arg: ssl.SSLContext | bool = self._server_ssl or True

        actor: str | None = None
        if config.actor_token:
            actor = await self._jwt_svid(self.profile.assertion_audience(config))
        credential = ClientCredential(client_id=config.client_id)
        if config.auth == "jwt-svid":
            credential = ClientCredential(
                client_id=config.client_id,
                assertion_type=self.profile.assertion_type,
                assertion=actor or await self._jwt_svid(self.profile.assertion_audience(config)),
            )
        elif config.auth == "x509-svid":
            assert self._mtls is not None
            try:
                ssl_arg = self._mtls.current()
            except IdentityUnavailable as exc:
                raise _no_identity(exc) from None
        else:
            assert self._secret is not None
            credential = ClientCredential(
                client_id=config.client_id,
                secret=self._secret.read(),
                secret_method=config.client_secret_method,
            )
        request = self.profile.build(
            config, subject_token, audience=audience, scope=scope, credential=credential, actor_token=actor
        )
        form, headers = request.form, request.headers
        secrets = request.secrets()

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
            raise self.profile.map_error(status, body, secrets)
        return self.profile.parse(body, config=config, audience=audience, now=self._clock(), secrets=secrets)

    async def _jwt_svid(self, audience: str) -> str:
        try:
            return await self._identity.jwt_svid(audience)
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


class DisabledExchanger(RefusingExchanger):
    """Stands in when `exchange.enabled` is false: every exchange fails with a clear reason."""

    def __init__(self) -> None:
        super().__init__("token exchange is not configured for this server (exchange.enabled is false)")


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
