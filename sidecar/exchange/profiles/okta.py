"""Okta's token exchange (on-behalf-of): RFC 8693 with an access-token subject, `audience` and `scope`.

Follows https://developer.okta.com/docs/guides/set-up-token-exchange/main/ (request and answer) and
https://developer.okta.com/docs/api/openapi/okta-oauth/guides/client-auth/#jwt-with-private-key
(`private_key_jwt`: assertion audience = the token endpoint, key from the client's JWKS URL).
"""

from __future__ import annotations

from outrider.sidecar.exchange import IssuedToken
from outrider.sidecar.exchange.config import TOKEN_TYPE_ACCESS, ExchangeConfig
from outrider.sidecar.exchange.oauth import (
    GRANT_TYPE,
    classify_error,
    parse_success,
)
from outrider.sidecar.exchange.profiles import ASSERTION_TYPE_JWT_BEARER, Profile


def assertion_audience(config: ExchangeConfig) -> str:
    # Okta: "aud — the full URL of the resource you're authenticating to" = the token endpoint.
    audience = config.client_assertion_audience or config.token_endpoint
    assert audience is not None
    return audience


def form(
    config: ExchangeConfig,
    subject_token: str,
    *,
    audience: str | None,
    scope: str | None,
    actor_token: str | None = None,
) -> dict[str, str]:
    form = {
        "grant_type": GRANT_TYPE,
        "subject_token": subject_token,
        "subject_token_type": TOKEN_TYPE_ACCESS,  # Okta exchanges access tokens only
    }
    if audience:
        form["audience"] = audience
    if scope:
        form["scope"] = scope
    return form


def parse(
    body: bytes, *, config: ExchangeConfig, audience: str | None, now: float, secrets: tuple[str, ...]
) -> IssuedToken:
    return parse_success(
        body, requested_token_type=TOKEN_TYPE_ACCESS, audience=audience, now=now, secrets=secrets
    )


PROFILE = Profile(
    name="okta",
    assertion_type=ASSERTION_TYPE_JWT_BEARER,
    assertion_audience=assertion_audience,
    form=form,
    parse=parse,
    map_error=classify_error,
)
