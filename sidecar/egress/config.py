"""The `egress` section of the sidecar configuration (placeholder until its owner fills it in)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EgressConfig:
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EgressConfig:
        return cls()
