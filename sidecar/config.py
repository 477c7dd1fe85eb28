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
from typing import Any

import yaml

from sidecar.config_merge import deep_merge
from sidecar.egress.config import EgressConfig
from sidecar.exchange.config import ExchangeConfig
from sidecar.identity.config import IdentityConfig
from sidecar.inbound.config import InboundConfig
from sidecar.policy.config import PolicyConfig
from sidecar.telemetry.config import TelemetryConfig

SECTIONS = ("pod", "admin", "identity", "inbound", "exchange", "egress", "telemetry", "policy")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class PodInfo:
    name: str | None = None
    namespace: str | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PodInfo:
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
        return cls(host=str(data.get("host", cls.host)), port=_port(data.get("port", cls.port), "admin.port"))


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


def _port(value: Any, key: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: {port} is not a port number (1-65535)")
    return port


def load_raw(path: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge the config file and `OUTRIDER_CONFIG` into one plain mapping (not yet validated)."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = path or env.get("OUTRIDER_SIDECAR_CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read sidecar config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"sidecar config file {path} is not valid YAML: {exc}") from None
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
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown sidecar config section(s) {unknown}; allowed: {list(SECTIONS)}")
    for name in SECTIONS:
        if not isinstance(raw.get(name, {}), dict):
            raise ConfigError(f"sidecar config section {name!r} must be a mapping")
    return raw


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
    )


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> SidecarConfig:
    return parse(load_raw(path, env))
