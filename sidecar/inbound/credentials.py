"""Where a caller's credential must never be: the URL, headers other than Authorization, the body.

Pure checks over plain data. The proxy refuses such requests (400 `invalid_request`) instead of
stripping: a stripped credential has still been written into every access log on the way, and a
client told nothing would keep leaking it. MCP authorization forbids tokens in the query string.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote

# Query parameters that carry a credential by convention: RFC 6750 §2.3 `access_token`, OAuth/OIDC
# token and client-secret names, and the common API-key spellings. Not `code`/`state` (an app's own
# OAuth callback may receive them from an IdP redirect) and not `session_id` (the 2024-11-05 SSE
# transport's POST endpoint), which are not credentials of the caller.
CREDENTIAL_QUERY_PARAMS = frozenset(
    {
        "access_token",
        "id_token",
        "refresh_token",
        "token",
        "bearer",
        "jwt",
        "api_key",
        "apikey",
        "api-key",
        "x-api-key",
        "client_secret",
        "client_assertion",
        "subject_token",
        "actor_token",
        "assertion",
        "password",
    }
)


def query_credential(names: Iterable[str]) -> str | None:
    """The first query parameter name that carries a credential by convention, or None."""
    for name in names:
        if name.strip().lower() in CREDENTIAL_QUERY_PARAMS:
            return name.strip().lower()
    return None


def token_elsewhere(
    token: str, url: str, headers: Iterable[tuple[str, str]], *, allowed_header: str = "authorization"
) -> str | None:
    """Where else (besides `allowed_header`) the caller's bearer token appears: a safe description."""
    if token in url or token in unquote(url):
        return "the request URL"
    for name, value in headers:
        if name.lower() != allowed_header and token in value:
            return f"the {name!r} header"
    return None


def token_in_body(token: str, body: bytes) -> bool:
    # `find`, not `in`: CPython 3.11's bytes `in` first tries the needle as an integer and formats
    # and clears a TypeError (~1,700 instructions per request); the answer is the same.
    return bool(body) and body.find(token.encode("ascii")) >= 0
