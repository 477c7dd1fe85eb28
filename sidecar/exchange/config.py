"""The `exchange` section of the sidecar configuration: where and how to swap the caller's token.

Parsed once at start-up into a frozen `ExchangeConfig`; every error names the offending key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from outrider.sidecar.config_error import ConfigError

AuthMethod = Literal["jwt-svid", "x509-svid", "client-secret"]
ProfileName = Literal["rfc8693", "entra-obo", "okta"]
SecretMethod = Literal["basic", "post"]

AUTH_METHODS: tuple[AuthMethod, ...] = ("jwt-svid", "x509-svid", "client-secret")
SECRET_METHODS: tuple[SecretMethod, ...] = ("basic", "post")
PROFILES: tuple[ProfileName, ...] = ("rfc8693", "entra-obo", "okta")

TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105

_KEYS = frozenset(
    {
        "enabled",
        "profile",
        "client_assertion_audience",
        "token_endpoint",
        "issuer",
        "audience",
        "resource",
        "scope",
        "client_id",
        "auth",
        "client_secret_file",
        "client_secret_method",
        "actor_token",
        "subject_token_type",
        "requested_token_type",
        "header",
        "timeout_seconds",
        "connect_timeout_seconds",
        "cache_size",
        "cache_skew_seconds",
        "cache_max_ttl_seconds",
        "ca_file",
    }
)


def _error(message: str) -> ConfigError:
    return ConfigError(message)


@dataclass(frozen=True)
class ExchangeConfig:
    """How the sidecar exchanges the caller's token (RFC 8693) for a downstream token.

    `issuer` is the IdP's issuer identifier; with `auth: jwt-svid` the JWT-SVID client assertion is
    minted with it as its only audience (the `jwt-spiffe` assertion profile).
    """

    enabled: bool = False
    # Which provider's dialect (sidecar/exchange/profiles/): request shape, client assertion, errors.
    profile: ProfileName = "rfc8693"
    # The JWT-SVID client assertion's audience; default per profile: rfc8693 `issuer`, entra-obo
    # `api://AzureADTokenExchange`, okta the token endpoint.
    client_assertion_audience: str | None = None
    token_endpoint: str | None = None
    issuer: str | None = None
    audience: str | None = None  # default downstream audience; `outrider.dev/token-audience` narrows it
    resource: str | None = None
    scope: str | None = None
    client_id: str | None = None
    auth: AuthMethod = "jwt-svid"
    client_secret_file: str | None = None
    client_secret_method: SecretMethod = "basic"  # noqa: S105
    actor_token: bool = False  # also send the JWT-SVID as actor_token so the issued token gets `act`
    subject_token_type: str = TOKEN_TYPE_ACCESS
    requested_token_type: str | None = TOKEN_TYPE_ACCESS
    header: str = "Authorization"  # where the inbound proxy puts the issued token (as `Bearer ...`)
    timeout_seconds: float = 5.0
    connect_timeout_seconds: float = 2.0
    cache_size: int = 1024
    cache_skew_seconds: float = 30.0
    # Longest an issued token is served from the cache, whatever its `expires_in` says: an IdP
    # answering `expires_in: 1e308` must not pin a token (and the grant behind it) for ever.
    cache_max_ttl_seconds: float = 3600.0
    ca_file: str | None = None  # CA bundle to verify the token endpoint's TLS (system CAs when unset)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ExchangeConfig:
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise _error(f"exchange: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
        endpoint = _opt_str(data, "token_endpoint")
        enabled = _bool(data, "enabled", endpoint is not None)
        auth = _choice(data, "auth", AUTH_METHODS, cls.auth)
        config = cls(
            enabled=enabled,
            profile=cast(ProfileName, _choice(data, "profile", PROFILES, cls.profile)),
            client_assertion_audience=_opt_str(data, "client_assertion_audience"),
            token_endpoint=endpoint,
            issuer=_opt_str(data, "issuer"),
            audience=_opt_str(data, "audience"),
            resource=_opt_str(data, "resource"),
            scope=_opt_str(data, "scope"),
            client_id=_opt_str(data, "client_id"),
            auth=cast(AuthMethod, auth),
            client_secret_file=_opt_str(data, "client_secret_file"),
            client_secret_method=cast(
                SecretMethod, _choice(data, "client_secret_method", SECRET_METHODS, cls.client_secret_method)
            ),
            actor_token=_bool(data, "actor_token", cls.actor_token),
            subject_token_type=_opt_str(data, "subject_token_type") or cls.subject_token_type,
            requested_token_type=(
                _opt_str(data, "requested_token_type")
                if "requested_token_type" in data
                else cls.requested_token_type
            ),
            header=_opt_str(data, "header") or cls.header,
            timeout_seconds=_positive(data, "timeout_seconds", cls.timeout_seconds),
            connect_timeout_seconds=_positive(data, "connect_timeout_seconds", cls.connect_timeout_seconds),
            cache_size=int(_positive(data, "cache_size", cls.cache_size, integer=True)),
            cache_skew_seconds=_non_negative(data, "cache_skew_seconds", cls.cache_skew_seconds),
            cache_max_ttl_seconds=_positive(data, "cache_max_ttl_seconds", cls.cache_max_ttl_seconds),
            ca_file=_opt_str(data, "ca_file"),
        )
        if config.cache_max_ttl_seconds <= config.cache_skew_seconds:
            raise _error(
                f"exchange.cache_max_ttl_seconds: {config.cache_max_ttl_seconds:g} must be greater than "
                f"cache_skew_seconds ({config.cache_skew_seconds:g}), or no issued token is ever reused"
            )
        if config.enabled:
            config.check()
        return config

    def check(self) -> None:
        """Cross-field rules for an enabled exchange; raises ConfigError naming the key."""
        if not self.token_endpoint:
            raise _error("exchange.token_endpoint: required when exchange is enabled")
        parts = urlsplit(self.token_endpoint)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise _error(
                f"exchange.token_endpoint: {self.token_endpoint!r} is not an http(s) URL "
                "(for example https://idp.example/oauth2/token)"
            )
        if self.profile != "rfc8693":
            self._check_provider()
        if self.auth == "x509-svid" and parts.scheme != "https":
            raise _error("exchange.token_endpoint: auth x509-svid (RFC 8705 mTLS) needs an https:// endpoint")
        if (
            self.auth == "jwt-svid"
            and self.profile == "rfc8693"
            and not (self.issuer or self.client_assertion_audience)
        ):
            raise _error(
                "exchange.issuer: required with auth jwt-svid (it is the audience of the JWT-SVID "
                "client assertion: the IdP's issuer identifier)"
            )
        if self.auth in ("x509-svid", "client-secret") and not self.client_id:
            raise _error(f"exchange.client_id: required with auth {self.auth}")
        if self.auth == "client-secret" and not self.client_secret_file:
            raise _error("exchange.client_secret_file: required with auth client-secret (a mounted file)")
        if self.actor_token and not self.issuer:
            raise _error("exchange.issuer: required with actor_token (the JWT-SVID's audience)")
        if ":" in self.header or not self.header.strip():
            raise _error(f"exchange.header: {self.header!r} is not an HTTP header name")

    def _check_provider(self) -> None:
        """Rules of the entra-obo and okta profiles (what those providers require of a request)."""
        name = f"exchange.profile {self.profile}"
        if self.auth == "x509-svid":
            raise _error(
                f"exchange.auth: x509-svid is not supported with {name}; use jwt-svid (the JWT-SVID "
                "as client assertion) or client-secret"
            )
        if not self.client_id:
            raise _error(f"exchange.client_id: required with {name} (the application/client ID)")
        if self.actor_token:
            raise _error(f"exchange.actor_token: not supported with {name}")
        if self.profile == "entra-obo" and not (self.scope or self.audience):
            raise _error(
                "exchange.scope: required with exchange.profile entra-obo (for example "
                "api://downstream-api/.default), or set exchange.audience to the API's App ID URI"
            )
        if self.profile == "okta" and not self.audience:
            raise _error(
                "exchange.audience: required with exchange.profile okta (the audience of the "
                "authorization server that issues the downstream token)"
            )


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _error(f"exchange.{key}: expected a string, got {type(value).__name__}")
    return value


def _bool(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _error(f"exchange.{key}: expected true or false, got {value!r}")


def _choice(data: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = data.get(key, default)
    if value not in allowed:
        raise _error(f"exchange.{key}: {value!r} is not one of {list(allowed)}")
    return str(value)


def _number(data: Mapping[str, Any], key: str, default: float, *, integer: bool = False) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _error(f"exchange.{key}: expected a number, got {value!r}")
    if integer and (not math.isfinite(value) or int(value) != value):
        raise _error(f"exchange.{key}: expected a whole number, got {value!r}")
    return float(value)


def _positive(data: Mapping[str, Any], key: str, default: float, *, integer: bool = False) -> float:
    value = _number(data, key, default, integer=integer)
    if value <= 0:
        raise _error(f"exchange.{key}: must be greater than 0, got {value!r}")
    return value


def _non_negative(data: Mapping[str, Any], key: str, default: float) -> float:
    value = _number(data, key, default)
    if value < 0:
        raise _error(f"exchange.{key}: must be 0 or more, got {value!r}")
    return value
