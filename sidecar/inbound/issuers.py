"""The `inbound.issuers`, `inbound.introspection` and `inbound.dpop` configuration: whose tokens count.

Each trusted issuer has its own audience, keys or RFC 7662 introspection, and its own exchange; a
token is judged by its own issuer's rules only. Parsed once; every error names the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from outrider.sidecar.config_error import ConfigError
from outrider.sidecar.exchange.config import SECRET_METHODS, ExchangeConfig, SecretMethod

IntrospectionAuth = Literal["jwt-svid", "client-secret", "none"]
INTROSPECTION_AUTH: tuple[IntrospectionAuth, ...] = ("jwt-svid", "client-secret", "none")
ASSERTION_TYPES = {
    "jwt-spiffe": "urn:ietf:params:oauth:client-assertion-type:jwt-spiffe",
    "jwt-bearer": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
}
# DPoP proofs are signed with the client's own key: asymmetric algorithms only (RFC 9449 §4.2).
DPOP_ALGORITHMS = frozenset({"ES256", "ES384", "ES512", "RS256", "PS256", "PS384", "PS512", "EdDSA"})
DEFAULT_DPOP_ALGORITHMS = ("ES256", "RS256", "PS256", "EdDSA")


def _error(message: str) -> ConfigError:
    return ConfigError(message)


def url_value(value: Any, label: str, *, required: bool = False) -> str | None:
    """`value` as an absolute http(s) URL, None when unset; `label` (`inbound.issuer`) names it in errors."""
    if value in (None, ""):
        if required:
            raise _error(f"{label} is required (an https:// or http:// URL)")
        return None
    if not isinstance(value, str):
        raise _error(f"{label}: {value!r} must be a URL string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _error(f"{label}: {value!r} must be an absolute http(s) URL")
    return value


def _url(data: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    return url_value(data.get(key), f"{where}.{key}", required=required)


def _str(data: Mapping[str, Any], key: str, where: str) -> str | None:
    value = data.get(key)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise _error(f"{where}.{key}: expected a string, got {type(value).__name__}")
    return value


def _number(data: Mapping[str, Any], key: str, where: str, default: float, lo: float, hi: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _error(f"{where}.{key}: {value!r} must be a number from {lo:g} to {hi:g}")
    return float(value)


def _flag(data: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise _error(f"{where}.{key}: {value!r} must be true or false")
    return value


def string_list(data: Mapping[str, Any], key: str, where: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = data.get(key, default)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise _error(f"{where}.{key}: {value!r} must be a list of non-empty strings")
    return tuple(value)


def _unknown(data: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise _error(f"{where} must be a mapping")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _error(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class IntrospectionConfig:
    """RFC 7662 introspection of opaque tokens at one issuer, with a bounded cache.

    `cache_ttl_s` bounds how long a revoked token keeps working: an `active` answer is reused at
    most that long (and never past the token's `exp`).
    """

    endpoint: str
    client_id: str | None = None
    auth: IntrospectionAuth = "jwt-svid"
    assertion_type: str = ASSERTION_TYPES["jwt-spiffe"]
    assertion_audience: str | None = None  # default: the issuer
    client_secret_file: str | None = None
    client_secret_method: SecretMethod = "basic"  # noqa: S105
    cache_size: int = 10000
    cache_ttl_s: float = 30.0
    timeout_s: float = 5.0
    opaque_tokens: bool = True  # non-JWT tokens are introspected here
    ca_file: str | None = None
    # Refuse an answer without `aud`: RFC 7662 makes it optional, and an IdP that leaves it out of
    # answers would have every token it issues, for any resource, accepted here.
    require_audience: bool = False

    _KEYS = frozenset(
        {
            "endpoint",
            "client_id",
            "auth",
            "assertion_type",
            "assertion_audience",
            "client_secret_file",
            "client_secret_method",
            "cache_size",
            "cache_ttl_s",
            "timeout_s",
            "opaque_tokens",
            "ca_file",
            "require_audience",
        }
    )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> IntrospectionConfig:
        _unknown(data, cls._KEYS, where)
        auth = data.get("auth", "jwt-svid")
        if auth not in INTROSPECTION_AUTH:
            raise _error(f"{where}.auth: {auth!r} is not one of {list(INTROSPECTION_AUTH)}")
        assertion = data.get("assertion_type", "jwt-spiffe")
        if assertion not in ASSERTION_TYPES:
            raise _error(f"{where}.assertion_type: {assertion!r} is not one of {sorted(ASSERTION_TYPES)}")
        method = data.get("client_secret_method", "basic")
        if method not in SECRET_METHODS:
            raise _error(f"{where}.client_secret_method: {method!r} is not one of {list(SECRET_METHODS)}")
        endpoint = _url(data, "endpoint", where, required=True)
        assert endpoint is not None
        config = cls(
            endpoint=endpoint,
            client_id=_str(data, "client_id", where),
            auth=cast(IntrospectionAuth, auth),
            assertion_type=ASSERTION_TYPES[assertion],
            assertion_audience=_str(data, "assertion_audience", where),
            client_secret_file=_str(data, "client_secret_file", where),
            client_secret_method=cast(SecretMethod, method),
            cache_size=int(_number(data, "cache_size", where, cls.cache_size, 0, 1 << 22)),
            cache_ttl_s=_number(data, "cache_ttl_s", where, cls.cache_ttl_s, 0, 3600),
            timeout_s=_number(data, "timeout_s", where, cls.timeout_s, 0.01, 120),
            opaque_tokens=_flag(data, "opaque_tokens", where, cls.opaque_tokens),
            ca_file=_str(data, "ca_file", where),
            require_audience=_flag(data, "require_audience", where, cls.require_audience),
        )
        if config.auth == "client-secret" and not (config.client_id and config.client_secret_file):
            raise _error(f"{where}: auth client-secret needs client_id and client_secret_file")
        return config


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted issuer. `exchange` None means the top-level `exchange` section (primary issuer)."""

    issuer: str
    audience: str | None = None  # default: inbound.resource
    jwks_uri: str | None = None
    algorithms: tuple[str, ...] | None = None  # default: inbound.algorithms
    required_scopes: tuple[str, ...] | None = None  # default: inbound.required_scopes
    require_access_token_typ: bool | None = None  # default: inbound.require_access_token_typ
    introspection: IntrospectionConfig | None = None
    exchange: ExchangeConfig | None = None

    _KEYS = frozenset(
        {
            "issuer",
            "audience",
            "jwks_uri",
            "algorithms",
            "required_scopes",
            "require_access_token_typ",
            "introspection",
            "exchange",
        }
    )

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], where: str, supported_algs: frozenset[str]
    ) -> IssuerConfig:
        _unknown(data, cls._KEYS, where)
        issuer = _url(data, "issuer", where, required=True)
        assert issuer is not None
        algorithms = string_list(data, "algorithms", where, ()) or None
        for alg in algorithms or ():
            if alg not in supported_algs:
                raise _error(
                    f"{where}.algorithms: {alg!r} is not allowed; use one of {sorted(supported_algs)}"
                )
        exchange_raw = data.get("exchange")
        exchange = ExchangeConfig()  # an issuer of the list without `exchange`: no exchange
        if exchange_raw is not None:
            if not isinstance(exchange_raw, Mapping):
                raise _error(f"{where}.exchange must be a mapping (the keys of the exchange section)")
            try:
                exchange = ExchangeConfig.from_mapping(exchange_raw)
            except ValueError as exc:
                raise _error(f"{where}.{exc}") from None
        introspection_raw = data.get("introspection")
        return cls(
            issuer=issuer,
            audience=_str(data, "audience", where),
            jwks_uri=_url(data, "jwks_uri", where),
            algorithms=algorithms,
            required_scopes=string_list(data, "required_scopes", where, ()) or None,
            require_access_token_typ=(
                _flag(data, "require_access_token_typ", where, False)
                if "require_access_token_typ" in data
                else None
            ),
            introspection=(
                IntrospectionConfig.from_mapping(introspection_raw, f"{where}.introspection")
                if introspection_raw is not None
                else None
            ),
            exchange=exchange,
        )


@dataclass(frozen=True)
class DpopConfig:
    """RFC 9449 proof-of-possession checks for DPoP-bound tokens (`cnf.jkt`)."""

    required: bool = False  # also refuse unbound (plain bearer) tokens
    algorithms: tuple[str, ...] = DEFAULT_DPOP_ALGORITHMS
    iat_window_s: float = 60.0  # how far a proof's `iat` may be from now, either way
    nonce: bool = False  # demand a server-provided nonce (`DPoP-Nonce`, RFC 9449 §9)
    nonce_lifetime_s: float = 300.0
    replay_cache_size: int = 100000

    _KEYS = frozenset(
        {"required", "algorithms", "iat_window_s", "nonce", "nonce_lifetime_s", "replay_cache_size"}
    )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DpopConfig:
        where = "inbound.dpop"
        _unknown(data, cls._KEYS, where)
        algorithms = string_list(data, "algorithms", where, DEFAULT_DPOP_ALGORITHMS)
        for alg in algorithms:
            if alg not in DPOP_ALGORITHMS:
                raise _error(
                    f"{where}.algorithms: {alg!r} is not allowed; use one of {sorted(DPOP_ALGORITHMS)}"
                )
        return cls(
            required=_flag(data, "required", where, cls.required),
            algorithms=algorithms,
            iat_window_s=_number(data, "iat_window_s", where, cls.iat_window_s, 1, 3600),
            nonce=_flag(data, "nonce", where, cls.nonce),
            nonce_lifetime_s=_number(data, "nonce_lifetime_s", where, cls.nonce_lifetime_s, 5, 86400),
            replay_cache_size=int(
                _number(data, "replay_cache_size", where, cls.replay_cache_size, 1000, 1 << 24)
            ),
        )


def parse_issuers(value: Any, supported_algs: frozenset[str]) -> tuple[IssuerConfig, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _error("inbound.issuers must be a list of mappings (one per trusted issuer)")
    issuers = tuple(
        IssuerConfig.from_mapping(item, f"inbound.issuers[{i}]", supported_algs)
        for i, item in enumerate(value)
    )
    seen: set[str] = set()
    for i, entry in enumerate(issuers):
        if entry.issuer in seen:
            raise _error(f"inbound.issuers[{i}].issuer: {entry.issuer!r} is listed twice")
        seen.add(entry.issuer)
    return issuers


def check_trust(issuers: tuple[IssuerConfig, ...]) -> None:
    """Rules across issuers: an opaque token can only be sent to one introspection endpoint."""
    opaque = [i.issuer for i in issuers if i.introspection is not None and i.introspection.opaque_tokens]
    if len(opaque) > 1:
        raise _error(
            f"inbound.issuers: {opaque} all take opaque tokens (introspection.opaque_tokens); an opaque "
            "token names no issuer, so only one may (set opaque_tokens: false on the others)"
        )
