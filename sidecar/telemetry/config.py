"""The `telemetry` section of the sidecar configuration: audit destination, privacy switches, naming.

Where spans and metrics go is not configured here: the standard `OTEL_*` environment variables decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from outrider.sidecar.config_error import ConfigError

_KEYS = frozenset(
    {
        "service_name",
        "audit",
        "hash_user",
        "hash_salt",
        "hash_salt_file",
        "record_arguments",
        "redact_keys",
        "record_resource_uri",
        "background",
        "audit_aggregate_s",
    }
)

# Argument keys whose values are replaced by "[REDACTED]" when arguments are recorded at all.
# Matching is case-insensitive and ignores "-" vs "_", at any depth of the arguments object.
DEFAULT_REDACT_KEYS: tuple[str, ...] = (
    "password",
    "passwd",
    "secret",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "client_secret",
    "api_key",
    "apikey",
    "authorization",
    "cookie",
    "private_key",
    "credentials",
)


def _error(message: str) -> ConfigError:
    return ConfigError(message)


def _bool(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _error(f"telemetry.{key}: {value!r} is not a boolean (true or false)")


def _seconds(data: Mapping[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
        raise _error(f"telemetry.{key}: {value!r} is not a number of seconds (0-3600)")
    return float(value)


def _str(data: Mapping[str, Any], key: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise _error(f"telemetry.{key}: {value!r} is not a string")
    return value


AUDIT_KEYWORDS = ("stdout", "off")


def _audit(value: Any) -> str:
    """`stdout`, `off` or an absolute file path: a bare word like `syslog` is a mistake, not a file."""
    allowed = "'stdout', 'off' or an absolute file path (like /var/log/outrider/audit.jsonl)"
    if not isinstance(value, str) or not value.strip():
        raise _error(f"telemetry.audit: {value!r} is not valid; use {allowed}")
    audit = value.strip()
    if audit in AUDIT_KEYWORDS:
        return audit
    if audit.lower() in AUDIT_KEYWORDS:
        raise _error(f"telemetry.audit: {value!r} is not valid; write it in lower case ({allowed})")
    if not audit.startswith("/") or audit.endswith("/"):
        raise _error(f"telemetry.audit: {value!r} is not valid; use {allowed}")
    return audit


@dataclass(frozen=True)
class TelemetryConfig:
    """What telemetry records and where the audit log goes.

    `audit` is "stdout" (default), "off", or an absolute file path (JSON lines, appended).
    `hash_user` replaces `enduser.id` on spans by a keyed SHA-256 of the subject (salt `hash_salt`, or
    read from `hash_salt_file`, e.g. a mounted Secret, at start-up);
    the audit log always names the user, it is the record security teams read.
    `record_arguments` adds tool arguments to audit events, with `redact_keys` masked.
    `record_resource_uri` adds `mcp.resource.uri` to spans (opt-in: URIs may be sensitive).
    `background` records (span end, metric points, audit lines) on a telemetry thread instead of the
    request path; the request only captures the facts.
    """

    service_name: str = "outrider-proxy"
    audit: str = "stdout"
    hash_user: bool = False
    hash_salt: str = ""
    hash_salt_file: str | None = None
    record_arguments: bool = False
    redact_keys: tuple[str, ...] = DEFAULT_REDACT_KEYS
    record_resource_uri: bool = False
    background: bool = True
    # Identical denials (policy, rate limit, authentication, egress) within this many seconds are
    # written once, then summarised with a count; 0 writes every one.
    audit_aggregate_s: float = 10.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TelemetryConfig:
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise _error(f"telemetry: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
        audit = _audit(data.get("audit", cls.audit))
        service_name = _str(data, "service_name", cls.service_name).strip()
        if not service_name:
            raise _error("telemetry.service_name: empty; give the service name spans are reported under")
        raw_keys = data.get("redact_keys", list(cls.redact_keys))
        if not isinstance(raw_keys, list | tuple) or not all(isinstance(k, str) and k for k in raw_keys):
            raise _error(f"telemetry.redact_keys: {raw_keys!r} is not a list of non-empty strings")
        return cls(
            service_name=service_name,
            audit=audit,
            hash_user=_bool(data, "hash_user", cls.hash_user),
            hash_salt=_str(data, "hash_salt", cls.hash_salt),
            hash_salt_file=_str(data, "hash_salt_file", "") or None,
            record_arguments=_bool(data, "record_arguments", cls.record_arguments),
            redact_keys=tuple(raw_keys),
            record_resource_uri=_bool(data, "record_resource_uri", cls.record_resource_uri),
            background=_bool(data, "background", cls.background),
            audit_aggregate_s=_seconds(data, "audit_aggregate_s", cls.audit_aggregate_s),
        )

    def with_salt_from_file(self) -> TelemetryConfig:
        """Read `hash_salt_file` (at start-up, at the edge) into `hash_salt`."""
        if not self.hash_salt_file:
            return self
        try:
            salt = Path(self.hash_salt_file).read_text().strip()
        except OSError as exc:
            raise _error(
                f"telemetry.hash_salt_file: cannot read {self.hash_salt_file}: {exc.strerror}"
            ) from None
        if not salt:
            raise _error(f"telemetry.hash_salt_file: {self.hash_salt_file} is empty")
        return replace(self, hash_salt=salt)

    def __repr__(self) -> str:
        # The salt keys the user hash; keep it out of logs and reprs.
        return (
            f"TelemetryConfig(service_name={self.service_name!r}, audit={self.audit!r}, "
            f"hash_user={self.hash_user}, hash_salt={'<set>' if self.hash_salt else '<unset>'}, "
            f"hash_salt_file={self.hash_salt_file!r}, "
            f"record_arguments={self.record_arguments}, redact_keys={self.redact_keys!r}, "
            f"record_resource_uri={self.record_resource_uri}, background={self.background})"
        )
