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
