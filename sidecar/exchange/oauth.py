"""The pure OAuth core every exchange profile shares: cache keys, client credentials on a request,
answer validation and the generic OAuth error classification. No sockets, no clocks of its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from urllib.parse import quote

from outrider.sidecar.exchange import ExchangeError, IssuedToken
from outrider.sidecar.exchange.config import TOKEN_TYPE_JWT, ExchangeConfig, SecretMethod

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ASSERTION_TYPE_JWT_SPIFFE = "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe"

# OAuth errors that say "this user's token may not become that token": the caller would get the
# same answer again, the sidecar is not at fault, so they get 403. Everything else the IdP refuses
# (our client credentials, our registration, our request shape) is the gateway's problem: 502.
DENIED_ERRORS = frozenset({"invalid_grant", "invalid_target", "invalid_scope", "access_denied"})

_JWT_LIKE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_SAFE_CODE = re.compile(r"^[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}$")  # RFC 6749 error code charset

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


def cache_key(
    subject_token: str,
    audience: str | None,
    scope: str | None,
    resource: str | None,
    *,
    subject_hash: str | None = None,
) -> CacheKey:
    """`subject_hash`: the token's SHA-256 (hex) when the caller holds it already (the inbound
    authenticator computes it for its own cache); it must be this token's, as it picks the entry."""
    digest = subject_hash or hashlib.sha256(subject_token.encode()).hexdigest()
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


def carries_credential(text: str, secrets: tuple[str, ...]) -> bool:
    """Whether an IdP-supplied value holds one of our credentials or anything token-shaped."""
    return any(secret and secret in text for secret in secrets) or _JWT_LIKE.search(text) is not None


_FLOAT_MAX = sys.float_info.max


def parse_success(
    body: bytes,
    *,
    requested_token_type: str | None,
    audience: str | None,
    now: float,
    secrets: tuple[str, ...] = (),
    require_issued_type: bool = True,
) -> IssuedToken:
    """Validate a 200 answer of the token endpoint (RFC 8693 §2.2.1); raises ExchangeError(502).

    `require_issued_type=False` for grants that are not RFC 8693 (Entra's on-behalf-of answer is an
    RFC 6749 §5.1 access token response without `issued_token_type`).
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise malformed("the answer is not JSON") from None
    if not isinstance(data, dict):
        raise malformed("the answer is not a JSON object")
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise malformed("access_token is missing or not a string")
    issued_type = data.get("issued_token_type")
    if issued_type is None and not require_issued_type:
        issued_type = requested_token_type or "urn:ietf:params:oauth:token-type:access_token"
    if not isinstance(issued_type, str) or not issued_type:
        raise malformed("issued_token_type is missing (RFC 8693 requires it)")
    secrets = (*secrets, access_token)
    if requested_token_type and issued_type != requested_token_type:
        shown_type = shown_value(issued_type, secrets)
        raise malformed(f"issued_token_type {shown_type!r} is not the requested {requested_token_type!r}")
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = shown_value(token_type, secrets)
        raise malformed(f"token_type {shown!r} is not Bearer (the only type the proxy can forward)")
    expires_in = data.get("expires_in")
    if expires_in is None:
        # RECOMMENDED only; without it the token is used for this call and not cached.
        expires_at = now
    elif isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise malformed("expires_in is not a positive number")
    elif not expires_in < _FLOAT_MAX:
        # JSON's NaN and Infinity (and 1e400) decode to non-finite floats, which would keep the token
        # cached for ever (a NaN expiry compares as never reached); an integer past the float range
        # made float() raise OverflowError: a 500 for the caller instead of this 502.
        raise malformed("expires_in is not a finite number")
    else:
        expires_at = now + float(expires_in)
    return IssuedToken(
        access_token=access_token,
        token_type="Bearer",  # noqa: S106 (a token type name, not a secret)
        issued_token_type=issued_type,
        expires_at=expires_at,
        audience=audience or "",
    )


def error_document(body: bytes) -> dict[str, object]:
    """The JSON object of an OAuth error answer, or {} when the body is not one."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def error_code(data: dict[str, object], secrets: tuple[str, ...]) -> tuple[str | None, str]:
    """The OAuth `error` code (None when odd or credential-bearing) and a redacted description."""
    code: str | None = None
    raw_code = data.get("error")
    if isinstance(raw_code, str) and _SAFE_CODE.match(raw_code) and redact(raw_code, secrets) == raw_code:
        code = raw_code  # an IdP that echoes a credential as the code gets no code shown
    raw_desc = data.get("error_description")
    description = redact(raw_desc, secrets) if isinstance(raw_desc, str) else ""
    return code, description


def classify_error(status: int, body: bytes, secrets: tuple[str, ...]) -> ExchangeError:
    """Map a non-200 answer of the token endpoint to a token-free ExchangeError."""
    code, description = error_code(error_document(body), secrets)
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


def shown_value(value: object, secrets: tuple[str, ...]) -> str:
    """An IdP-supplied short value, or "?" when it is odd or could carry a credential."""
    if isinstance(value, str) and _SAFE_CODE.match(value) and redact(value, secrets) == value:
        return value
    return "?"


def malformed(why: str) -> ExchangeError:
    return ExchangeError(
        f"the identity provider's token exchange answer is malformed: {why}",
        outcome="idp_error",
        http_status=502,
        idp_status=200,
    )


@dataclass(frozen=True)
class ClientCredential:
    """How the sidecar authenticates one token request. Holds secrets: never log or repr it."""

    client_id: str | None = None
    assertion_type: str | None = None
    assertion: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    secret_method: SecretMethod = "basic"  # noqa: S105


@dataclass(frozen=True)
class TokenRequest:
    """The form and headers of one token-endpoint POST (a profile builds it, the shell sends it)."""

    form: dict[str, str] = field(repr=False)
    headers: dict[str, str] = field(repr=False)

    def secrets(self) -> tuple[str, ...]:
        """Every credential in the request, so that an IdP echoing one back is redacted."""
        values = [
            self.form.get(k, "")
            for k in ("subject_token", "assertion", "client_assertion", "client_secret", "actor_token")
        ]
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            values.append(auth.removeprefix("Basic "))
        return tuple(v for v in values if v)


def authenticated(form: dict[str, str], credential: ClientCredential) -> TokenRequest:
    """Add client authentication (RFC 6749 §2.3, RFC 7521 §4.2) to a token request form."""
    headers = {"Accept": "application/json"}
    form = dict(form)
    if credential.assertion is not None:
        assert credential.assertion_type is not None
        form["client_assertion_type"] = credential.assertion_type
        form["client_assertion"] = credential.assertion
        if credential.client_id:
            form["client_id"] = credential.client_id
    elif credential.secret is not None:
        assert credential.client_id is not None
        if credential.secret_method == "basic":  # noqa: S105
            headers["Authorization"] = basic_authorization(credential.client_id, credential.secret)
        else:
            form["client_id"] = credential.client_id
            form["client_secret"] = credential.secret
    elif credential.client_id:
        form["client_id"] = credential.client_id  # RFC 8705 mTLS: the certificate authenticates
    return TokenRequest(form, headers)
