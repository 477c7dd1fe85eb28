"""Cross-origin access for browser MCP clients (`inbound.cors`): its config, the origin check, the headers.

Off unless origins are listed (then nothing here runs). When on, the sidecar answers an allowed
origin's preflight itself, and its policy replaces any Access-Control-* header the app sends.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from outrider.sidecar.config_error import ConfigError

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# What MCP's HTTP transports send (methods and request headers) and what a client must read back.
ALLOW_METHODS = "GET, POST, DELETE"
DEFAULT_ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "accept",
        "mcp-session-id",
        "mcp-protocol-version",
        "mcp-method",
        "mcp-name",
        "last-event-id",
        "dpop",
        "traceparent",
        "tracestate",
        "baggage",
    }
)
EXPOSE_HEADERS = "Mcp-Session-Id, Mcp-Protocol-Version, WWW-Authenticate, DPoP-Nonce, Retry-After"
DEFAULT_MAX_AGE_S = 600

_KEYS = frozenset({"allowed_origins", "allowed_headers", "max_age_s"})
# An origin as a browser serialises it (RFC 6454 §6.1): scheme, host, port unless the default.
_ORIGIN = re.compile(r"(https?)://([a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 9110 §5.6.2 `token`: what a header name may be.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_PREFIX = "inbound.cors"


def _error(message: str) -> ConfigError:
    return ConfigError(message)


def parse_origin(value: Any) -> str:
    """One configured origin, normalised as a browser sends it (lower case, no default port)."""
    where = f"{_PREFIX}.allowed_origins"
    if not isinstance(value, str):
        raise _error(f"{where}: {value!r} must be a string such as 'https://app.example.com'")
    if value.strip() == "*":
        raise _error(
            f"{where}: '*' is not allowed: list each browser origin that may call this server "
            "(scheme://host[:port])"
        )
    if value.strip().lower() == "null":
        raise _error(
            f"{where}: 'null' is not allowed: every sandboxed iframe, file:// page and redirected "
            "request sends it, so it would let any page in"
        )
    if not value.isascii():
        raise _error(f"{where}: {value!r}: write an internationalised host in its xn-- (punycode) form")
    match = _ORIGIN.fullmatch(value.lower())
    if match is None:
        raise _error(
            f"{where}: {value!r} is not an origin: write scheme://host[:port] with scheme http or https "
            "and nothing after the port (no path, not even '/')"
        )
    scheme, host, port = match.groups()
    if port is not None:
        number = int(port)
        if not 1 <= number <= 65535:
            raise _error(f"{where}: {value!r}: port {number} is out of range (1-65535)")
        # Browsers leave the default port out of `Origin`, and write no leading zeros.
        port = None if number == _DEFAULT_PORTS[scheme] else str(number)
    return f"{scheme}://{host}" + (f":{port}" if port else "")


@dataclass(frozen=True)
class CorsConfig:
    """`inbound.cors`: the browser origins whose pages may call this MCP server (docs/inbound.md)."""

    # Exact origins, normalised; empty: CORS off (no header added, preflights are refused as today).
    allowed_origins: tuple[str, ...] = ()
    # Request headers allowed beyond DEFAULT_ALLOWED_HEADERS (lower case).
    allowed_headers: tuple[str, ...] = ()
    max_age_s: int = DEFAULT_MAX_AGE_S

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_origins)

    @classmethod
    def from_mapping(cls, data: Any) -> CorsConfig:
        if not isinstance(data, Mapping):
            raise _error(f"{_PREFIX} must be a mapping")
        unknown = sorted(str(k) for k in set(data) - _KEYS)
        if unknown:
            raise _error(f"{_PREFIX}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
        origins = data.get("allowed_origins", [])
        if not isinstance(origins, list | tuple):
            raise _error(f"{_PREFIX}.allowed_origins must be a list of origins (scheme://host[:port])")
        headers = data.get("allowed_headers", [])
        if not isinstance(headers, list | tuple):
            raise _error(f"{_PREFIX}.allowed_headers must be a list of header names")
        extra: list[str] = []
        for name in headers:
            if not isinstance(name, str) or not _TOKEN.fullmatch(name.lower()):
                raise _error(f"{_PREFIX}.allowed_headers: {name!r} is not an HTTP header name")
            extra.append(name.lower())
        max_age = data.get("max_age_s", DEFAULT_MAX_AGE_S)
        if isinstance(max_age, bool) or not isinstance(max_age, int) or not 0 <= max_age <= 86400:
            raise _error(f"{_PREFIX}.max_age_s: {max_age!r} must be a whole number of seconds (0-86400)")
        return cls(
            allowed_origins=tuple(dict.fromkeys(parse_origin(o) for o in origins)),
            allowed_headers=tuple(dict.fromkeys(extra)),
            max_age_s=max_age,
        )


class CorsPolicy:
    """The decisions for one config: is this `Origin` allowed, and which headers answer it."""

    def __init__(self, config: CorsConfig) -> None:
        self.origins = frozenset(config.allowed_origins)
        self.headers = DEFAULT_ALLOWED_HEADERS | frozenset(config.allowed_headers)
        self.max_age = str(config.max_age_s)
        # Preflights answered here (they never reach the proxy pipeline that counts MCP requests).
        self.preflights_total = 0

    def allowed_origin(self, request_headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str | None:
        """The request's `Origin` when it is one of the listed ones (else None), as the browser sent it.

        Exact match after lower-casing (scheme and host are case-insensitive, RFC 6454 §5); an
        `Origin` that is not plain ASCII never matches (`str.lower` maps some non-ASCII letters onto
        ASCII ones, e.g. the Kelvin sign onto `k`). Two `Origin` headers: no browser sends that.
        """
        values = request_headers.getall("Origin", ())
        if len(values) != 1:
            return None
        origin = values[0]
        if origin in self.origins or (origin.isascii() and origin.lower() in self.origins):
            return origin
        return None

    def preflight(self, origin: str, requested: str | None) -> dict[str, str]:
        """The headers of the answer to an allowed origin's preflight; the browser judges the rest."""
        asked = (h.strip().lower() for h in (requested or "").split(","))
        granted = [h for h in dict.fromkeys(asked) if h in self.headers]
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Vary": "Origin",
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Max-Age": self.max_age,
        }
        if granted:
            headers["Access-Control-Allow-Headers"] = ", ".join(granted)
        return headers

    def decorate(self, origin: str | None, headers: CIMultiDict[str]) -> None:
        """Make an actual answer's CORS headers the sidecar's own: the app's go, `Vary: Origin` always."""
        for name in [n for n in headers if n[:15].lower() == "access-control-"]:
            headers.popall(name, None)
        varies = {v.strip() for v in ",".join(headers.getall("Vary", ())).lower().split(",")}
        if "origin" not in varies and "*" not in varies:
            headers.add("Vary", "Origin")
        if origin is not None:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS

    def apply(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """`decorate` a response not yet sent (the proxy calls it on an SSE answer before `prepare`)."""
        self.decorate(self.allowed_origin(request.headers), response.headers)

    def vouch(self, request: web.BaseRequest, forwarded: CIMultiDict[str]) -> None:
        """An allowed `Origin` is not forwarded: the sidecar checked it, and the app's own check (the
        MCP SDK's DNS-rebinding protection knows only loopback origins) would refuse every browser."""
        if self.allowed_origin(request.headers) is not None:
            forwarded.popall("Origin", None)

    def wrap(self, handler: Handler) -> Handler:
        """`handler` behind this policy: allowed preflights answered here, every other answer decorated.

        A preflight from an origin not listed goes on to `handler` (and is refused there, as without
        CORS): a preflight carries no credentials, so only a listed origin's is answered unauthenticated.
        """

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            origin = self.allowed_origin(request.headers)
            if (
                origin is not None
                and request.method == "OPTIONS"
                and "Access-Control-Request-Method" in request.headers
            ):
                self.preflights_total += 1
                requested = ",".join(request.headers.getall("Access-Control-Request-Headers", ()))
                return web.Response(status=204, headers=self.preflight(origin, requested))
            response = await handler(request)
            if not response.prepared:  # a streamed answer was decorated before it started (`apply`)
                self.decorate(origin, response.headers)
            return response

        return handle
