"""How the egress policy and capture mode reach an injected pod (placeholder; the egress work owns it).

A pure function: pod + namespace facts + operator policy -> what the injection engine must write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EgressPlan:
    mode: str  # "capture" (outrider-init + iptables) | "explicit" (HTTP(S)_PROXY, no init container)
    policy: Mapping[str, Any]  # the resolved policy; the engine writes it into OUTRIDER_CONFIG egress.policy
    app_env: tuple[tuple[str, str], ...] = ()  # env for every app container (explicit mode)
    init_args: tuple[str, ...] = ()  # extra `outrider iptables` arguments for outrider-init
    warnings: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()  # non-empty: refuse the pod with these messages


def plan_egress(
    pod: Mapping[str, Any],
    namespace_labels: Mapping[str, str],
    namespace_policy: Mapping[str, Any] | None,
    cluster_policy: Mapping[str, Any] | None,
) -> EgressPlan:
    return EgressPlan(mode="capture", policy=dict(namespace_policy or cluster_policy or {}))
