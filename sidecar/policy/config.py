"""The `policy` section of the sidecar configuration: Cedar layers, the reloadable file, rate limits.

Parsed once from a plain mapping; every error names the key, the value and what is allowed. The
Cedar text itself is compiled by `outrider.sidecar.policy.engine` (so the config stays plain data).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from outrider.sidecar.config_error import ConfigError
from outrider.sidecar.policy.limits_config import LimitsError, RateLimits

# Values (scalars, lists, records) one call's arguments may hold to be judged: their conversion and
# Cedar evaluation cost ~5 us per value on the event loop every caller shares (`max_argument_values`).
MAX_ARGUMENT_VALUES = 10_000

DEFAULT_POLICY_FILE = "/etc/outrider/policy/policy.yaml"
STORE_ERROR_MODES = ("allow", "deny")
_KEYS = frozenset(
    {
        "cedar",
        "layers",
        "file",
        "reload_interval_s",
        "rate_limits",
        "storage",
        "on_store_error",
        "max_argument_values",
        "store_timeout_s",
    }
)


def _error(message: str) -> ConfigError:
    return ConfigError(message)


@dataclass(frozen=True)
class LayerSource:
    """One layer of Cedar text: an operator ceiling (permit + forbid) or a forbid-only narrowing."""

    source: str  # "cluster default", "namespace team-a", "annotation outrider.dev/policy", ...
    cedar: str
    narrowing: bool


def _number(data: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = data.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _error(f"policy.{key}: {value!r} is not a number ({lo}-{hi})") from None
    if isinstance(value, bool) or not lo <= number <= hi:
        raise _error(f"policy.{key}: {value!r} is out of range ({lo}-{hi})")
    return number


def _whole(data: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(f"policy.{key}: {value!r} is not a whole number ({lo}-{hi})")
    if not lo <= value <= hi:
        raise _error(f"policy.{key}: {value!r} is out of range ({lo}-{hi})")
    return value


@dataclass(frozen=True)
class PolicyConfig:
    # Cedar layers from the pod spec (written by the webhook from operator config + the annotation).
    layers: tuple[LayerSource, ...] = ()
    # The app team's narrowing (a ConfigMap volume): YAML with `cedar` (forbid only) and `rate_limits`,
    # re-read every `reload_interval_s`; a bad version keeps the last good one.
    file: str | None = DEFAULT_POLICY_FILE
    reload_interval_s: float = 0.5
    rate_limits: RateLimits = field(default_factory=RateLimits)
    # `limits` storage URI: memory:// (per replica), redis://host:6379, rediss://..., valkey://...
    storage: str = "memory://"
    # When the shared store cannot be reached: "allow" keeps the MCP server usable (availability; the
    # default) and says so in /metrics, the audit log and /readyz; "deny" refuses metered calls.
    on_store_error: str = "allow"
    store_timeout_s: float = 0.25
    # A call whose arguments hold more values than this is denied unjudged (docs/policy.md).
    max_argument_values: int = MAX_ARGUMENT_VALUES

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PolicyConfig:
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise _error(f"policy: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
        layers: list[LayerSource] = []
        cedar = data.get("cedar")
        if cedar is not None:
            if not isinstance(cedar, str):
                raise _error("policy.cedar: must be Cedar policy text")
            layers.append(LayerSource("sidecar config policy.cedar", cedar, narrowing=False))
        raw_layers = data.get("layers") or []
        if not isinstance(raw_layers, list):
            raise _error("policy.layers: must be a list of {source, cedar, narrowing}")
        for index, layer in enumerate(raw_layers):
            where = f"policy.layers[{index}]"
            if not isinstance(layer, Mapping) or not isinstance(layer.get("cedar"), str):
                raise _error(f"{where}: must be a mapping with `cedar` text")
            narrowing = layer.get("narrowing", False)
            if not isinstance(narrowing, bool):
                raise _error(f"{where}.narrowing: {narrowing!r} must be true or false")
            layers.append(LayerSource(str(layer.get("source") or where), layer["cedar"], narrowing))
        path = data.get("file", cls.file)
        if path is not None and (not isinstance(path, str)):
            raise _error(f"policy.file: {path!r} must be a path or null")
        try:
            limits = RateLimits.from_mapping(data.get("rate_limits"), "policy.rate_limits")
        except LimitsError as exc:
            raise _error(str(exc)) from None
        storage = data.get("storage", cls.storage)
        if not isinstance(storage, str) or "://" not in storage:
            raise _error(
                f"policy.storage: {storage!r} must be a limits storage URI "
                "(memory://, redis://host:6379, rediss://..., valkey://...)"
            )
        on_error = data.get("on_store_error", cls.on_store_error)
        if on_error not in STORE_ERROR_MODES:
            raise _error(f"policy.on_store_error: {on_error!r} is not one of {list(STORE_ERROR_MODES)}")
        return cls(
            layers=tuple(layers),
            file=path or None,
            reload_interval_s=_number(data, "reload_interval_s", cls.reload_interval_s, 0.05, 3600),
            rate_limits=limits,
            storage=storage,
            on_store_error=str(on_error),
            store_timeout_s=_number(data, "store_timeout_s", cls.store_timeout_s, 0.01, 30),
            max_argument_values=_whole(data, "max_argument_values", cls.max_argument_values, 1, 10_000_000),
        )
