"""OAuth 2.0 Token Exchange (RFC 8693) on behalf of the caller, authenticated with the SVID.

`TokenExchanger` is the contract the inbound proxy calls; `outrider.sidecar.exchange.client` implements it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StepUp:
    """The IdP asks the user to step up (Conditional Access, MFA): passed on to the MCP client.

    `error` is the RFC 6750 code for the caller's `WWW-Authenticate` (`insufficient_scope` or
    `interaction_required`); `claims` is the IdP's claims challenge (a JSON text) when it sent one.
    """

    error: str
    claims: str | None = None


class ExchangeError(Exception):
    """The exchange failed. `message` is token-free and safe to show the caller."""

    def __init__(
        self,
        message: str,
        *,
        outcome: str,
        http_status: int,
        idp_status: int | None = None,
        oauth_error: str | None = None,
        step_up: StepUp | None = None,
    ):
        super().__init__(message)
        self.message = message
        # "idp_unavailable" (down/slow: 503/504) | "idp_error" (IdP or sidecar misconfigured,
        # malformed answer: 502) | "denied" (IdP refuses this user's token for the target: 403)
        # | "invalid_request" (nothing to exchange: 401) | "identity_unavailable" (no SVID: 503)
        self.outcome = outcome
        self.http_status = http_status  # what the MCP caller should get: 502, 503, 504, 403, ...
        self.idp_status = idp_status
        self.oauth_error = oauth_error  # the IdP's OAuth `error` code, when it sent one
        self.step_up = step_up  # set when the caller can fix it by signing in again with more


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    token_type: str
    issued_token_type: str
    expires_at: float  # unix seconds
    audience: str
    cache_hit: bool = False


class TokenExchanger(Protocol):
    async def exchange(
        self,
        subject_token: str,
        *,
        audience: str | None = None,
        scope: str | None = None,
        issuer: str | None = None,
        subject_hash: str | None = None,
    ) -> IssuedToken:
        """Exchange the caller's token for one meant for `audience` (config default when None).

        `issuer` is the trusted issuer that vouched for the caller's token: an exchanger serving
        several issuers exchanges it at that issuer's IdP only. `subject_hash` is the token's
        SHA-256 (hex) when the caller computed it already: it keys the cache of issued tokens, so it
        must be this token's (the proxy takes it from `Presented`, which computes it from the token).
        """


class RefusingExchanger:
    """An exchanger that refuses every exchange with one token-free reason (HTTP 502, `idp_error`).

    Serves where no exchange may happen: exchange switched off, or a caller whose issuer has none.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def exchange(
        self,
        subject_token: str,
        *,
        audience: str | None = None,
        scope: str | None = None,
        issuer: str | None = None,
        subject_hash: str | None = None,
    ) -> IssuedToken:
        raise ExchangeError(self.reason, outcome="idp_error", http_status=502)
