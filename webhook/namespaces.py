"""What the webhook knows about a pod's namespace beyond the AdmissionReview.

`NamespaceFacts` is the contract; `StaticNamespaces` answers from fixed data (offline inject, tests),
the in-cluster implementation answers from the Kubernetes API with a watch cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class NamespaceFacts(Protocol):
    async def labels(self, namespace: str) -> Mapping[str, str]:
        """The namespace's labels (empty when unknown)."""

    async def annotations(self, namespace: str) -> Mapping[str, str]:
        """The namespace's annotations the engine reads (`outrider.webhook.meshes.NAMESPACE_ANNOTATIONS`)."""

    async def egress_policy(self, namespace: str) -> Mapping[str, Any] | None:
        """The operators' egress policy for this namespace, or None to use the cluster default."""


@dataclass
class StaticNamespaces:
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    namespace_annotations: dict[str, dict[str, str]] = field(default_factory=dict)

    async def labels(self, namespace: str) -> Mapping[str, str]:
        return self.namespace_labels.get(namespace, {})

    async def annotations(self, namespace: str) -> Mapping[str, str]:
        return self.namespace_annotations.get(namespace, {})

    async def egress_policy(self, namespace: str) -> Mapping[str, Any] | None:
        return self.policies.get(namespace)
