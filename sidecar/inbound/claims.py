"""Shape checks on a JWT's registered claims that PyJWT does not make (RFC 7519 §2, §4.1).

Pure: a claims mapping in, the first problem (naming the claim) or None out. PyJWT coerces
`exp`/`nbf`/`iat` with `int()`, so `"exp": "9999999999"` would pass and `1e400` would crash it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# RFC 7519 NumericDate: a JSON number of seconds. Bounded to year 9999 so no arithmetic overflows.
NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")
MAX_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z


def claim_problem(claims: Mapping[str, Any]) -> str | None:
    """Why these claims are unacceptable (a token-free sentence naming the claim), or None."""
    for name in NUMERIC_DATE_CLAIMS:
        if name in claims and not is_numeric_date(claims[name]):
            return f"the access token's {name!r} claim is not a NumericDate (a JSON number of seconds)"
    if "sub" not in claims:
        return "the access token lacks the 'sub' claim"
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub.strip():
        return "the access token's 'sub' claim must be a non-empty string"
    return None


def is_numeric_date(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return 0 <= value <= MAX_NUMERIC_DATE


# RFC 9068 §2.1: the header `typ` of a JWT access token (media types compare case-insensitively).
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
# Claims only an OpenID Connect ID token carries (OIDC Core §3.1.3.6, §3.3.2.11): the hashes of the
# access token and code issued beside it. `nonce` is not among them: Keycloak put it in access
# tokens too until 2024 (keycloak/keycloak#26893).
ID_TOKEN_CLAIMS = ("at_hash", "c_hash")


def not_an_access_token(
    header: Mapping[str, Any], claims: Mapping[str, Any], require_typ: bool
) -> str | None:
    """Why a JWT is not an access token (an ID token of the same issuer, whose `aud` is a client id
    that may equal the resource), or None. A header `typ` of `at+jwt` settles it; without one the
    token is refused only when it says it is an ID token: Keycloak's payload `typ` "ID" (its access
    tokens say "Bearer"), or an ID-token-only claim. `require_typ` refuses every token without the
    RFC 9068 `typ`, for issuers that always set it."""
    typ = header.get("typ")
    if isinstance(typ, str) and typ.lower() in ACCESS_TOKEN_TYPES:
        return None
    if require_typ:
        return "the token is not an RFC 9068 access token (its header 'typ' is not 'at+jwt')"
    kind = claims.get("typ")
    if isinstance(kind, str) and kind.lower() == "id":
        return "the token is an ID token, not an access token (its 'typ' claim is 'ID')"
    for name in ID_TOKEN_CLAIMS:
        if name in claims:
            return f"the token is an ID token, not an access token (it carries {name!r})"
    return None
