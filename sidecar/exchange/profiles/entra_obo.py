"""Microsoft Entra ID on-behalf-of (OBO): the request Entra documents and the errors it answers with.

Follows https://learn.microsoft.com/entra/identity-platform/v2-oauth2-on-behalf-of-flow (request,
success and error shapes, the `claims` challenge) and, for the JWT-SVID client assertion,
https://learn.microsoft.com/entra/workload-id/workload-identity-federation (audience
`api://AzureADTokenExchange`, issuer + subject matched by a federated identity credential).
"""

from __future__ import annotations

import json

from outrider.sidecar.exchange import ExchangeError, IssuedToken, StepUp
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.exchange.oauth import (
    carries_credential,
    classify_error,
    error_code,
    error_document,
    parse_success,
)
from outrider.sidecar.exchange.profiles import ASSERTION_TYPE_JWT_BEARER, Profile

GRANT_TYPE_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
# AADSTS50076 (MFA required), 50079 (MFA enrolment required), 50158 (external security challenge),
# 53003 (blocked by Conditional Access, with a claims challenge when a step-up can satisfy it).
STEP_UP_CODES = frozenset({50076, 50079, 50158, 53003})
# The caller's token has no user in it (client credentials): on-behalf-of has no one to act for.
APP_ONLY_CODES = frozenset({7000114})
MAX_CLAIMS_CHARS = 4096


def assertion_audience(config: ExchangeConfig) -> str:
    return config.client_assertion_audience or FEDERATED_AUDIENCE


def downstream_scope(config: ExchangeConfig, audience: str | None, scope: str | None) -> str:
    """Entra names the downstream API by scope: `<App ID URI>/.default` when only an audience is set."""
    if scope or config.scope:
        return scope or config.scope or ""
    target = audience or config.audience
    assert target is not None  # ExchangeConfig.check requires scope or audience for entra-obo
    return target.rstrip("/") + "/.default"


def form(
    config: ExchangeConfig,
    subject_token: str,
    *,
    audience: str | None,
    scope: str | None,
    actor_token: str | None = None,
) -> dict[str, str]:
    return {
        "grant_type": GRANT_TYPE_JWT_BEARER,
        "requested_token_use": "on_behalf_of",
        "assertion": subject_token,
        "scope": downstream_scope(config, audience, scope),
    }


def parse(
    body: bytes, *, config: ExchangeConfig, audience: str | None, now: float, secrets: tuple[str, ...]
) -> IssuedToken:
    # An RFC 6749 access token response: no issued_token_type (it is always an access token).
    return parse_success(
        body,
        requested_token_type=None,
        audience=audience or config.audience,
        now=now,
        secrets=secrets,
        require_issued_type=False,
    )


def _codes(data: dict[str, object]) -> frozenset[int]:
    raw = data.get("error_codes")
    if not isinstance(raw, list):
        return frozenset()
    return frozenset(c for c in raw if isinstance(c, int) and not isinstance(c, bool))


def _claims(data: dict[str, object], secrets: tuple[str, ...]) -> str | None:
    """The claims challenge, when it is a short JSON object carrying no credential."""
    raw = data.get("claims")
    if not isinstance(raw, str) or not raw or len(raw) > MAX_CLAIMS_CHARS:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or carries_credential(raw, secrets):
        return None
    return raw


def map_error(status: int, body: bytes, secrets: tuple[str, ...]) -> ExchangeError:
    data = error_document(body)
    code, description = error_code(data, secrets)
    codes = _codes(data)
    detail = f": {description}" if description else ""
    if codes & APP_ONLY_CODES:
        return ExchangeError(
            "the caller's token is an application (app-only) token with no signed-in user; "
            "on-behalf-of needs a user's delegated token (sign in as a user)" + detail,
            outcome="denied",
            http_status=403,
            idp_status=status,
            oauth_error=code,
        )
    claims = _claims(data, secrets)
    if code == "interaction_required" or (code == "invalid_grant" and (claims or codes & STEP_UP_CODES)):
        error = "interaction_required" if code == "interaction_required" else "insufficient_scope"
        return ExchangeError(
            "the identity provider requires the user to sign in again and satisfy a Conditional "
            f"Access policy (multi-factor authentication or similar) before acting for them{detail}",
            outcome="step_up",
            http_status=403,
            idp_status=status,
            oauth_error=code,
            step_up=StepUp(error=error, claims=claims),
        )
    return classify_error(status, body, secrets)


PROFILE = Profile(
    name="entra-obo",
    assertion_type=ASSERTION_TYPE_JWT_BEARER,
    assertion_audience=assertion_audience,
    form=form,
    parse=parse,
    map_error=map_error,
)
