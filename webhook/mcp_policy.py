"""How the operators' Cedar policies and rate limits, and the app team's annotation, reach a pod.

Pure: namespace + annotation + the webhook config's `mcp_policy` -> the sidecar's `policy` section
(or None: no policy, today's behaviour). Operator layers are ceilings; the annotation only narrows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from outrider.sidecar.policy.cedar_text import CedarError, compile_policies
from outrider.sidecar.policy.limits_config import LimitsError, RateLimits
from outrider.sidecar.policy.schema import base_schema
from outrider.sidecar.policy.schema import validate as validate_schema
from outrider.webhook.annotations import POLICY

# Where the app team's reloadable narrowing lives: ConfigMap `outrider-policy` (key `policy.yaml`)
# in the pod's namespace, mounted optional into outrider-proxy.
POLICY_CONFIG_MAP = "outrider-policy"
POLICY_DIR = "/etc/outrider/policy"
POLICY_FILE = f"{POLICY_DIR}/policy.yaml"
_LAYER_KEYS = frozenset({"cedar", "rate_limits"})
MAX_LAYER_BYTES = 96 * 1024


class McpPolicyError(ValueError):
    """The webhook config's `mcp_policy` is wrong; the message names where and what."""


def validate_layer(layer: Any, where: str) -> dict[str, Any]:
    """One operator layer ({cedar, rate_limits}), checked now so a bad one never reaches a pod."""
    if not isinstance(layer, Mapping):
        raise McpPolicyError(f"{where}: must be a mapping with `cedar` and/or `rate_limits`")
    unknown = sorted(set(map(str, layer)) - _LAYER_KEYS)
    if unknown:
        raise McpPolicyError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_LAYER_KEYS)}")
    cedar = layer.get("cedar")
    if cedar is not None:
        try:
            compiled = compile_policies(cedar, f"{where}.cedar")
        except CedarError as exc:
            raise McpPolicyError(str(exc)) from None
        problems = validate_schema([compiled], base_schema())
        if problems:
            raise McpPolicyError(f"{problems[0]} (schema: sidecar/policy/outrider.cedarschema)")
    try:
        RateLimits.from_mapping(layer.get("rate_limits"), f"{where}.rate_limits")
    except LimitsError as exc:
        raise McpPolicyError(str(exc)) from None
    return {str(k): v for k, v in layer.items()}


def validate(data: Any) -> dict[str, Any]:
    """The `mcp_policy` block: `default` (cluster) and `namespaces` (each replaces the default there)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise McpPolicyError("mcp_policy: must be a mapping with `default` and/or `namespaces`")
    unknown = sorted(set(map(str, data)) - {"default", "namespaces"})
    if unknown:
        raise McpPolicyError(f"mcp_policy: unknown key(s) {unknown}; allowed: ['default', 'namespaces']")
    out: dict[str, Any] = {}
    if data.get("default") is not None:
        out["default"] = validate_layer(data["default"], "mcp_policy.default")
    namespaces = data.get("namespaces") or {}
    if not isinstance(namespaces, Mapping):
        raise McpPolicyError("mcp_policy.namespaces: must map namespace names to {cedar, rate_limits}")
    if namespaces:
        out["namespaces"] = {
            str(ns): validate_layer(layer, f"mcp_policy.namespaces[{ns!r}]")
            for ns, layer in namespaces.items()
        }
    for where, layer in [("default", out.get("default")), *out.get("namespaces", {}).items()]:
        size = len(json.dumps(layer or {}))
        if size > MAX_LAYER_BYTES:
            # The layer travels in the pod's OUTRIDER_CONFIG environment variable, and Linux refuses
            # to start a process with one environment string over 128 KiB.
            raise McpPolicyError(
                f"mcp_policy {where}: {size} bytes of policy; at most {MAX_LAYER_BYTES} fit in a pod's "
                "OUTRIDER_CONFIG (Linux limits one environment string to 128 KiB); split it per namespace"
            )
    return out


def parse_annotation(value: Any) -> str | None:
    """The app team's forbid-only Cedar text; raises ValueError naming line, column and the rule."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"annotation {POLICY}: must be Cedar policy text")
    try:
        compiled = compile_policies(value, f"annotation {POLICY}", forbid_only=True)
    except CedarError as exc:
        raise ValueError(
            f"{exc} (the annotation holds Cedar `forbid` policies that narrow the operators' policy)"
        ) from None
    problems = validate_schema([compiled], base_schema())
    if problems:
        raise ValueError(f"{problems[0]}; see docs/policy.md for the entity types, actions and context")
    return value


def plan_policy(
    namespace: str, annotation: str | None, mcp_policy: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The pod's `policy` section of OUTRIDER_CONFIG, or None when nothing applies (no policy)."""
    namespaces = mcp_policy.get("namespaces") or {}
    if namespace in namespaces:
        operator, source = namespaces[namespace], f"namespace {namespace} policy"
    else:
        operator, source = mcp_policy.get("default"), "cluster default policy"
    if not operator and annotation is None and not mcp_policy:
        return None
    layers: list[dict[str, Any]] = []
    section: dict[str, Any] = {"file": POLICY_FILE}
    if operator:
        if operator.get("cedar") is not None:
            layers.append({"source": source, "cedar": operator["cedar"], "narrowing": False})
        if operator.get("rate_limits"):
            section["rate_limits"] = operator["rate_limits"]
    if annotation is not None:
        layers.append({"source": f"annotation {POLICY}", "cedar": annotation, "narrowing": True})
    if layers:
        section["layers"] = layers
    return section
