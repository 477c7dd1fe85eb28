"""The sidecar's configuration: parsed once at start-up into frozen dataclasses, one section each.

Sources, later wins: the YAML/JSON file (`--config` or `OUTRIDER_SIDECAR_CONFIG`), then the JSON
in `OUTRIDER_CONFIG` that the webhook writes into the pod spec. Each section's owner parses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from outrider.sidecar.config_error import ConfigError
from outrider.sidecar.config_merge import deep_merge
from outrider.sidecar.egress.config import EgressConfig
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.inbound.config import InboundConfig
from outrider.sidecar.policy.config import PolicyConfig
from outrider.sidecar.shutdown import ShutdownConfig
from outrider.sidecar.telemetry.config import TelemetryConfig

if TYPE_CHECKING:
    import yaml

SECTIONS = ("pod", "admin", "identity", "inbound", "exchange", "egress", "telemetry", "policy", "shutdown")

__all__ = [
    "ConfigError",
    "SidecarConfig",
    "first_error",
    "load",
    "load_raw",
    "parse",
    "validate",
    "yaml_problem",
]


@dataclass(frozen=True)
class PodInfo:
    name: str | None = None
    namespace: str | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PodInfo:
        _known(data, "pod", ("name", "namespace"))
        for key in ("name", "namespace"):
            if data.get(key) is not None and not isinstance(data.get(key), str):
                raise ConfigError(f"pod.{key}: {data.get(key)!r} must be a string")
        return cls(
            name=data.get("name") or os.environ.get("OUTRIDER_POD_NAME"),
            namespace=data.get("namespace") or os.environ.get("OUTRIDER_POD_NAMESPACE"),
        )


@dataclass(frozen=True)
class AdminConfig:
    host: str = "0.0.0.0"
    port: int = 15020

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> AdminConfig:
        _known(data, "admin", ("host", "port"))
        host = data.get("host", cls.host)
        if not isinstance(host, str) or not host:
            raise ConfigError(f"admin.host: {host!r} must be an address to listen on")
        return cls(host=host, port=_port(data.get("port", cls.port), "admin.port"))


@dataclass(frozen=True)
class SidecarConfig:
    pod: PodInfo
    admin: AdminConfig
    identity: IdentityConfig
    inbound: InboundConfig
    exchange: ExchangeConfig
    egress: EgressConfig
    telemetry: TelemetryConfig
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)


def _known(data: Mapping[str, Any], section: str, keys: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in set(data) - set(keys))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; allowed: {sorted(keys)}")


def _port(value: Any, key: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: YAML `.inf`, JSON `Infinity`
        raise ConfigError(f"{key}: {value!r} is not a port number (1-65535)") from None
    if isinstance(value, bool | float):
        raise ConfigError(f"{key}: {value!r} is not a port number (1-65535)")
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: {port} is not a port number (1-65535)")
    return port


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def load_raw(path: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge the config file and `OUTRIDER_CONFIG` into one plain mapping (not yet validated)."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = path or env.get("OUTRIDER_SIDECAR_CONFIG")
    if path:
        import yaml  # only with a config file (~0.8 MB resident): pods get their config as JSON

        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read sidecar config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"sidecar config file {path} is not valid YAML: {yaml_problem(exc)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"sidecar config file {path} must hold a mapping of sections {SECTIONS}")
        raw = deep_merge(raw, loaded)
    inline = env.get("OUTRIDER_CONFIG")
    if inline:
        try:
            loaded = json.loads(inline)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"OUTRIDER_CONFIG is not valid JSON: {exc.msg} at position {exc.pos}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"OUTRIDER_CONFIG must be a JSON object of sections {SECTIONS}")
        raw = deep_merge(raw, loaded)
    check_sections(raw)
    return raw


def check_sections(raw: Mapping[str, Any]) -> None:
    """Only the known sections, each a mapping (null counts as empty)."""
    unknown = sorted(str(k) for k in set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown sidecar config section(s) {unknown}; allowed: {list(SECTIONS)}")
    for name in SECTIONS:
        if not isinstance(raw.get(name) or {}, Mapping):
            raise ConfigError(f"sidecar config section {name!r} must be a mapping")


def first_error(raw: Mapping[str, Any], sections: tuple[str, ...] = SECTIONS) -> tuple[str, str] | None:
    """(section, message) of the first of `sections` (in SECTIONS order) that `parse` would refuse.

    `parse` checks the sections one after the other and stops at the first error, and no section's
    check reads another: so a caller that knows which sections changed can re-check only those
    (the webhook validates one OUTRIDER_CONFIG per pod, where only `inbound` differs). Call
    `check_sections` first, as `validate` does.
    """
    parsers = {
        "pod": PodInfo.from_mapping,
        "admin": AdminConfig.from_mapping,
        "identity": IdentityConfig.from_mapping,
        "inbound": InboundConfig.from_mapping,
        "exchange": ExchangeConfig.from_mapping,
        "egress": EgressConfig.from_mapping,
        "telemetry": TelemetryConfig.from_mapping,
        "policy": PolicyConfig.from_mapping,
        "shutdown": ShutdownConfig.from_mapping,
    }
    for name in SECTIONS:
        if name not in sections:
            continue
        value = raw.get(name) or {}
        assert isinstance(value, Mapping), "check_sections first"
        try:
            parsers[name](value)
        except ConfigError as exc:
            return name, str(exc)
    return None


def parse(raw: Mapping[str, Any]) -> SidecarConfig:
    def section(name: str) -> Mapping[str, Any]:
        value = raw.get(name) or {}
        assert isinstance(value, Mapping)
        return value

    return SidecarConfig(
        pod=PodInfo.from_mapping(section("pod")),
        admin=AdminConfig.from_mapping(section("admin")),
        identity=IdentityConfig.from_mapping(section("identity")),
        inbound=InboundConfig.from_mapping(section("inbound")),
        exchange=ExchangeConfig.from_mapping(section("exchange")),
        egress=EgressConfig.from_mapping(section("egress")),
        telemetry=TelemetryConfig.from_mapping(section("telemetry")),
        policy=PolicyConfig.from_mapping(section("policy")),
        shutdown=ShutdownConfig.from_mapping(section("shutdown")),
    )


def validate(raw: Mapping[str, Any]) -> SidecarConfig:
    """`parse` for a mapping from elsewhere (the webhook checks its `sidecar:` block and each pod's
    merged OUTRIDER_CONFIG with it): the same errors the sidecar would stop with at start-up."""
    check_sections(raw)
    return parse(raw)


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> SidecarConfig:
    return parse(load_raw(path, env))
