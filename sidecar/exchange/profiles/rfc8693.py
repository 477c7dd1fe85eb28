"""The plain RFC 8693 token exchange (Keycloak 26+, the dev IdP and any standard server).

Client authentication with a JWT-SVID uses the `jwt-spiffe` assertion type, audience = the IdP's issuer.
"""

from __future__ import annotations

from outrider.sidecar.exchange import IssuedToken
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.exchange.oauth import classify_error, exchange_form, parse_success
from outrider.sidecar.exchange.profiles import ASSERTION_TYPE_JWT_SPIFFE, Profile


def assertion_audience(config: ExchangeConfig) -> str:
    audience = config.client_assertion_audience or config.issuer
    assert audience is not None  # ExchangeConfig.check requires issuer with jwt-svid
    return audience


def parse(
    body: bytes, *, config: ExchangeConfig, audience: str | None, now: float, secrets: tuple[str, ...]
) -> IssuedToken:
    return parse_success(
        body, requested_token_type=config.requested_token_type, audience=audience, now=now, secrets=secrets
    )


PROFILE = Profile(
    name="rfc8693",
    assertion_type=ASSERTION_TYPE_JWT_SPIFFE,
    assertion_audience=assertion_audience,
    form=exchange_form,
    parse=parse,
    map_error=classify_error,
)
