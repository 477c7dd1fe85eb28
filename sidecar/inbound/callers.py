"""Which trusted issuer judges a caller's token, and the DPoP proof a bound token needs.

A JWT goes to the issuer named by its `iss` (then that issuer's keys, audience and scopes decide);
an opaque token to the one issuer that introspects opaque tokens. Nothing is ever tried at two.
"""

from __future__ import annotations

import base64
import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from outrider.sidecar.exchange import ExchangeError
from outrider.sidecar.identity import WorkloadIdentity
from outrider.sidecar.inbound.auth import (
    AuthFailure,
    JwksCache,
    TokenVerifier,
    metadata_url,
    token_fingerprint,
    www_authenticate,
)
from outrider.sidecar.inbound.config import InboundConfig
from outrider.sidecar.inbound.dpop import DpopFailure, DpopGuard, ProofFacts, expected_htu
from outrider.sidecar.inbound.introspection import Introspected, Introspector
from outrider.sidecar.inbound.issuers import IssuerConfig
from outrider.sidecar.telemetry.observer import Principal

_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_JWS = re.compile(r"[A-Za-z0-9_-]+\.([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Presented:
    """The credential of one request, as sent: scheme, token and any DPoP proofs.

    `fingerprint` is the token's SHA-256, computed here once from the token itself and shared by the
    caches keyed on it (verified tokens, introspection answers, the exchange's issued tokens): it
    cannot belong to another.
    """

    scheme: str  # "bearer" | "dpop"
    token: str = field(repr=False)
    proofs: tuple[str, ...]
    method: str
    path: str
    fingerprint: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", token_fingerprint(self.token))


def presented_token(authorization: str | None) -> tuple[str, str] | None:
    """(`bearer`|`dpop`, token) from an Authorization header (RFC 6750 §2.1, RFC 9449 §7.1)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() not in ("bearer", "dpop") or not _B64TOKEN.fullmatch(token):
        return None
    return scheme.lower(), token


def unverified_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWS-shaped token, unverified (for routing and `cnf` only), else None."""
    match = _JWS.fullmatch(token)
    if match is None:
        return None
    payload = match.group(1)
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _jkt(claims: Mapping[str, Any] | None) -> str | None:
    cnf = claims.get("cnf") if claims else None
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    return jkt if isinstance(jkt, str) and jkt else None


@dataclass
class TrustedIssuer:
    """One issuer's judges: signature verification (JWKS) and/or introspection."""

    config: IssuerConfig
    verifier: TokenVerifier | None
    jwks: JwksCache | None
    introspector: Introspector | None


class CallerVerifier:
    """Authenticates a presented token against the trusted issuers, then checks its DPoP binding."""

    def __init__(self, config: InboundConfig, issuers: Sequence[TrustedIssuer], dpop: DpopGuard) -> None:
        self.config = config
        self.issuers = {i.config.issuer: i for i in issuers}
        self.opaque = next(
            (
                i
                for i in issuers
                if i.introspector is not None
                and i.config.introspection
                and i.config.introspection.opaque_tokens
            ),
            None,
        )
        self.dpop = dpop
        self.public_url = config.public_url or config.resource or ""
        # Token fingerprint -> (its issuer, its `cnf.jkt`) for tokens a verifier accepted; bounded
        # like the verifier's own cache (`token_cache_size`).
        self._routes: OrderedDict[str, tuple[TrustedIssuer, str | None]] = OrderedDict()

    def metrics_text(self) -> bytes:
        """Counters for /metrics: introspection calls and cache hits, DPoP proofs checked and refused."""
        introspectors = [i.introspector for i in self.issuers.values() if i.introspector is not None]
        lines = [
            "# HELP outrider_introspection_requests_total RFC 7662 introspection calls to the issuers.",
            "# TYPE outrider_introspection_requests_total counter",
            f"outrider_introspection_requests_total {sum(i.calls for i in introspectors)}",
            "# HELP outrider_introspection_cache_hits_total Tokens judged from the introspection cache.",
            "# TYPE outrider_introspection_cache_hits_total counter",
            f"outrider_introspection_cache_hits_total {sum(i.cache_hits for i in introspectors)}",
            "# HELP outrider_dpop_proofs_total DPoP proofs checked for bound tokens.",
            "# TYPE outrider_dpop_proofs_total counter",
            f"outrider_dpop_proofs_total {self.dpop.checked}",
            "# HELP outrider_dpop_refused_total DPoP proofs refused (missing, invalid, replayed).",
            "# TYPE outrider_dpop_refused_total counter",
            f"outrider_dpop_refused_total {self.dpop.refused}",
            "# HELP outrider_dpop_replay_evicted_total Proof ids forgotten while still in their iat "
            "window because the replay cache was full (from the key holding the most).",
            "# TYPE outrider_dpop_replay_evicted_total counter",
            f"outrider_dpop_replay_evicted_total {self.dpop.replay.evicted_total}",
        ]
        return ("\n".join(lines) + "\n").encode()

    @property
    def jwks_caches(self) -> list[JwksCache]:
        return [i.jwks for i in self.issuers.values() if i.jwks is not None]

    async def verify(self, token: str) -> Principal | AuthFailure:
        """Bearer-only form (no DPoP facts): kept for callers that hold only the token."""
        return await self.authenticate(Presented("bearer", token, (), "POST", "/"))

    async def authenticate(self, presented: Presented) -> Principal | AuthFailure:
        fingerprint = presented.fingerprint
        route = self._routes.get(fingerprint)
        if route is not None:
            # A token verified before: its issuer and binding are facts of the token itself, so the
            # unverified decode is skipped; the verifier still checks expiry (and its own cache).
            self._routes.move_to_end(fingerprint)
            known, bound = route
            assert known.verifier is not None
            checked = await known.verifier.verify(presented.token, fingerprint=fingerprint)
            if isinstance(checked, AuthFailure):
                return checked
            return self._check_binding(presented, bound, checked)
        claims = unverified_claims(presented.token)
        result: Principal | AuthFailure
        jkt: str | None = None
        if claims is not None:
            iss = claims.get("iss")
            trusted = self.issuers.get(iss) if isinstance(iss, str) else None
            only = next(iter(self.issuers.values())) if len(self.issuers) == 1 else None
            if trusted is None and only is not None and only.verifier is not None:
                # One issuer checked locally: its verifier says precisely what is wrong (no iss, another
                # iss...). Never an introspection endpoint: it would see a token meant for someone else.
                trusted = only
            if trusted is None:
                return AuthFailure(401, "invalid_token", "the access token was issued by an untrusted issuer")
            if trusted.verifier is not None:
                result = await trusted.verifier.verify(presented.token, fingerprint=fingerprint)
                jkt = _jkt(claims)
                if not isinstance(result, AuthFailure) and self.config.token_cache_size:
                    self._routes[fingerprint] = (trusted, jkt)
                    while len(self._routes) > self.config.token_cache_size:
                        self._routes.popitem(last=False)
            elif trusted.introspector is not None:
                answer = await trusted.introspector.introspect(presented.token, fingerprint=fingerprint)
                result, jkt = self._introspected(answer)
            else:  # pragma: no cover - every issuer has keys or introspection
                return AuthFailure(401, "invalid_token", "this issuer's tokens cannot be checked")
        elif self.opaque is not None and self.opaque.introspector is not None:
            answer = await self.opaque.introspector.introspect(presented.token, fingerprint=fingerprint)
            result, jkt = self._introspected(answer)
        else:
            return AuthFailure(401, "invalid_token", "the access token is not a JWT")
        if isinstance(result, AuthFailure):
            return result
        return self._check_binding(presented, jkt, result)

    @staticmethod
    def _introspected(answer: Introspected | AuthFailure) -> tuple[Principal | AuthFailure, str | None]:
        if isinstance(answer, AuthFailure):
            return answer, None
        return answer.principal, answer.jkt

    def _check_binding(
        self, presented: Presented, jkt: str | None, principal: Principal
    ) -> Principal | AuthFailure:
        if jkt is None:
            if presented.scheme == "dpop":
                return self.dpop.refuse("the access token is not DPoP-bound: use Bearer")
            if self.dpop.config.required:
                return self.dpop.refuse("this server accepts DPoP-bound tokens only")
            return principal
        if presented.scheme != "dpop":
            # RFC 9449 §7.1: a bound token sent as a bearer token is refused (no downgrade).
            return self.dpop.refuse("this access token is DPoP-bound: use the DPoP scheme")
        facts = ProofFacts(presented.proofs, presented.method, expected_htu(self.public_url, presented.path))
        failure = self.dpop.check(facts, access_token=presented.token, jkt=jkt)
        return failure or principal


def challenge_headers(failure: AuthFailure, config: InboundConfig) -> dict[str, str]:
    """`WWW-Authenticate` (and `DPoP-Nonce`) for a refused caller: the DPoP scheme for DPoP failures."""
    bearer = www_authenticate(failure, config)
    if not isinstance(failure, DpopFailure):
        return {"WWW-Authenticate": bearer}
    params = bearer.removeprefix("Bearer").strip()
    algs = " ".join(config.dpop.algorithms)
    headers = {"WWW-Authenticate": f'DPoP {params + ", " if params else ""}algs="{algs}"'}
    if failure.nonce:
        headers["DPoP-Nonce"] = failure.nonce
    return headers


def step_up_challenge(exc: ExchangeError, config: InboundConfig) -> dict[str, str]:
    """The step-up challenge for a Conditional Access refusal (Microsoft's claims-challenge format:
    the `claims` JSON, base64-encoded, beside the RFC 6750 error) so the client can sign in again."""
    assert exc.step_up is not None
    params: list[str] = []
    if config.resource:
        params.append(f'resource_metadata="{metadata_url(config.resource)}"')
    params.append(f'error="{exc.step_up.error}"')
    description = "".join(c for c in exc.message if c not in '"\\' and 0x20 <= ord(c) < 0x7F)
    params.append(f'error_description="{description}"')
    if exc.step_up.claims:
        params.append(f'claims="{base64.b64encode(exc.step_up.claims.encode()).decode()}"')
    return {"WWW-Authenticate": "Bearer " + ", ".join(params)}


def metadata_extras(config: InboundConfig) -> dict[str, Any]:
    """RFC 9728 members this module owns: every trusted issuer, the DPoP algorithms."""
    extras: dict[str, Any] = {"dpop_signing_alg_values_supported": list(config.dpop.algorithms)}
    if config.dpop.required:
        extras["dpop_bound_access_tokens_required"] = True
    return extras


def build_caller_verifier(
    config: InboundConfig, session: aiohttp.ClientSession, identity: WorkloadIdentity | None
) -> CallerVerifier:
    """One judge per trusted issuer (its own JWKS cache and/or introspector), routed by `iss`."""
    issuers: list[TrustedIssuer] = []
    for entry in config.trusted_issuers:
        scoped = replace(
            config,
            issuer=entry.issuer,
            resource=entry.audience or config.resource,
            jwks_uri=entry.jwks_uri,
            algorithms=entry.algorithms or config.algorithms,
            required_scopes=entry.required_scopes
            if entry.required_scopes is not None
            else config.required_scopes,
            require_access_token_typ=entry.require_access_token_typ
            if entry.require_access_token_typ is not None
            else config.require_access_token_typ,
            issuers=(),
        )
        jwks = verifier = None
        if entry.introspection is None or entry.jwks_uri is not None:
            jwks = JwksCache(scoped, session)
            verifier = TokenVerifier(scoped, jwks)
        introspector = None
        if entry.introspection is not None:
            introspector = Introspector(
                entry.introspection,
                issuer=entry.issuer,
                audience=scoped.resource,
                required_scopes=scoped.required_scopes,
                leeway_s=config.leeway_s,
                identity=identity,
                session=session,
                group_claims=config.group_claims,
                role_claims=config.role_claims,
            )
        issuers.append(TrustedIssuer(entry, verifier, jwks, introspector))
    return CallerVerifier(config, issuers, DpopGuard(config.dpop))
