"""Other service meshes: whether a pod has, or will get, another mesh's traffic-capturing proxy.

Pure functions over a pod and its namespace's labels and annotations. Two capturing proxies in one
pod steal each other's traffic, so the engine warns and skips (`enabled`) or refuses (`strict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outrider.webhook.shape import as_list as _list
from outrider.webhook.shape import as_map as _map

# Istio: the injector's opt-in/out (pod label, or the older annotation), namespace opt-ins, revisions.
ISTIO_INJECT = "sidecar.istio.io/inject"
ISTIO_STATUS = "sidecar.istio.io/status"  # written by the injector; Istio CNI acts on pods that carry it
ISTIO_NAMESPACE_INJECTION = "istio-injection"
ISTIO_REVISION = "istio.io/rev"
# Istio ambient: ztunnel captures the pod's traffic through Istio CNI, without a sidecar.
ISTIO_DATAPLANE_MODE = "istio.io/dataplane-mode"
ISTIO_AMBIENT_REDIRECTION = "ambient.istio.io/redirection"
ISTIO_PROXY = "istio-proxy"
ISTIO_INITS = ("istio-init", "istio-validation")  # iptables init; Istio CNI's validation init
# Linkerd: one annotation on the pod or its namespace; the proxy and the init (or CNI validator).
LINKERD_INJECT = "linkerd.io/inject"
LINKERD_PROXY_VERSION = "linkerd.io/proxy-version"
LINKERD_PROXY = "linkerd-proxy"
LINKERD_INITS = ("linkerd-init", "linkerd-network-validator")

# The namespace annotations `conflict` reads (the namespace cache keeps only these).
NAMESPACE_ANNOTATIONS = (LINKERD_INJECT,)

_POD_ANNOTATIONS = frozenset(
    {ISTIO_INJECT, ISTIO_STATUS, ISTIO_AMBIENT_REDIRECTION, LINKERD_INJECT, LINKERD_PROXY_VERSION}
)
_POD_LABELS = frozenset({ISTIO_INJECT, ISTIO_REVISION, ISTIO_DATAPLANE_MODE})
_NAMESPACE_LABELS = frozenset({ISTIO_NAMESPACE_INJECTION, ISTIO_REVISION, ISTIO_DATAPLANE_MODE})
_CONTAINERS = frozenset({ISTIO_PROXY, LINKERD_PROXY, *ISTIO_INITS, *LINKERD_INITS})

_ISTIO_TRUE = ("true", "y", "yes", "on")  # what Istio's injector reads as "inject"
_LINKERD_ON = ("enabled", "ingress")
ISTIO_FIX = f'set the pod label {ISTIO_INJECT}: "false" (or remove the Istio label or annotation named)'
LINKERD_FIX = f"set the pod annotation {LINKERD_INJECT}: disabled (or remove the Linkerd annotation named)"
AMBIENT_FIX = f"set the pod label {ISTIO_DATAPLANE_MODE}: none (or take the namespace out of ambient mode)"


@dataclass(frozen=True)
class MeshConflict:
    """Why the pod meets another mesh (naming the label, annotation or container) and how to fix it."""

    reason: str
    fix: str


def _flag(value: Any) -> str | None:
    # kubectl reads an unquoted `yes` as a boolean; the API server would refuse it, but say what it means
    if isinstance(value, bool):
        return "true" if value else "false"
    return value.strip().lower() if isinstance(value, str) else None


def _names(spec: Mapping[str, Any], key: str) -> list[str]:
    return [c["name"] for c in _list(spec.get(key)) if isinstance(c, dict) and isinstance(c.get("name"), str)]


def conflict(
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    namespace_labels: Mapping[str, str],
    namespace_annotations: Mapping[str, str],
) -> MeshConflict | None:
    """The first sign that another mesh captures, or will capture, this pod's traffic."""
    labels = _map(metadata.get("labels"))
    annotations = _map(metadata.get("annotations"))
    containers = _names(spec, "containers")
    inits = _names(spec, "initContainers")
    # the common case on every admission: no name any mesh uses appears anywhere
    if (
        _POD_ANNOTATIONS.isdisjoint(annotations)
        and _POD_LABELS.isdisjoint(labels)
        and _NAMESPACE_LABELS.isdisjoint(namespace_labels)
        and _CONTAINERS.isdisjoint(containers)
        and _CONTAINERS.isdisjoint(inits)
        and not namespace_annotations
    ):
        return None
    # already injected by another mesh (a native sidecar proxy sits among the init containers)
    if ISTIO_PROXY in containers or ISTIO_PROXY in inits or ISTIO_STATUS in annotations:
        found = (
            f"container {ISTIO_PROXY}" if ISTIO_PROXY in containers + inits else f"annotation {ISTIO_STATUS}"
        )
        return MeshConflict(f"the pod already has an Istio sidecar ({found})", ISTIO_FIX)
    if LINKERD_PROXY in containers or LINKERD_PROXY in inits or LINKERD_PROXY_VERSION in annotations:
        found = (
            f"container {LINKERD_PROXY}"
            if LINKERD_PROXY in containers + inits
            else f"annotation {LINKERD_PROXY_VERSION}"
        )
        return MeshConflict(f"the pod already has a Linkerd proxy ({found})", LINKERD_FIX)
    for name in inits:
        if name in ISTIO_INITS:
            return MeshConflict(
                f"spec.initContainers has {name}, Istio's traffic-capture set-up, even without its proxy",
                f"remove {name} from the pod",
            )
        if name in LINKERD_INITS:
            return MeshConflict(
                f"spec.initContainers has {name}, Linkerd's traffic-capture set-up, even without its proxy",
                f"remove {name} from the pod",
            )
    if _flag(annotations.get(ISTIO_AMBIENT_REDIRECTION)) == "enabled":
        return MeshConflict(
            f"annotation {ISTIO_AMBIENT_REDIRECTION}: enabled says Istio CNI redirects the pod's traffic to "
            "ztunnel (ambient mode)",
            AMBIENT_FIX,
        )
    return _asks_istio(labels, annotations, namespace_labels) or _asks_linkerd(
        annotations, namespace_annotations
    )


def _asks_istio(
    labels: Mapping[str, Any], annotations: Mapping[str, Any], namespace_labels: Mapping[str, str]
) -> MeshConflict | None:
    pod_flag = _flag(labels.get(ISTIO_INJECT))
    where = "label"
    if pod_flag is None:
        pod_flag, where = _flag(annotations.get(ISTIO_INJECT)), "annotation"
    if pod_flag in _ISTIO_TRUE:
        return MeshConflict(
            f'the pod {where} {ISTIO_INJECT}: "{pod_flag}" asks Istio to inject its sidecar', ISTIO_FIX
        )
    mode = _flag(labels.get(ISTIO_DATAPLANE_MODE))
    if mode == "ambient":
        return MeshConflict(
            f"the pod label {ISTIO_DATAPLANE_MODE}: ambient enrols it in Istio ambient mode", AMBIENT_FIX
        )
    ns_mode = _flag(namespace_labels.get(ISTIO_DATAPLANE_MODE))
    if ns_mode == "ambient" and mode != "none":
        return MeshConflict(
            f"the namespace label {ISTIO_DATAPLANE_MODE}=ambient enrols the pod in Istio ambient mode",
            AMBIENT_FIX,
        )
    if pod_flag is not None:
        return None  # Istio injects only for y/yes/true/on; any other value opts the pod out
    if ISTIO_REVISION in labels:
        return MeshConflict(
            f"the pod label {ISTIO_REVISION}={labels[ISTIO_REVISION]} asks Istio to inject its sidecar",
            ISTIO_FIX,
        )
    injection = _flag(namespace_labels.get(ISTIO_NAMESPACE_INJECTION))
    if injection == "enabled":
        return MeshConflict(
            f"the namespace label {ISTIO_NAMESPACE_INJECTION}=enabled asks Istio to inject its sidecar",
            ISTIO_FIX,
        )
    if ISTIO_REVISION in namespace_labels and injection != "disabled":
        return MeshConflict(
            f"the namespace label {ISTIO_REVISION}={namespace_labels[ISTIO_REVISION]} asks Istio to "
            "inject its sidecar",
            ISTIO_FIX,
        )
    return None


def _asks_linkerd(
    annotations: Mapping[str, Any], namespace_annotations: Mapping[str, str]
) -> MeshConflict | None:
    pod_flag = _flag(annotations.get(LINKERD_INJECT))
    if pod_flag in _LINKERD_ON:
        return MeshConflict(
            f"the pod annotation {LINKERD_INJECT}: {pod_flag} asks Linkerd to inject its proxy", LINKERD_FIX
        )
    if pod_flag == "disabled":
        return None
    ns_flag = _flag(namespace_annotations.get(LINKERD_INJECT))
    if ns_flag in _LINKERD_ON:
        return MeshConflict(
            f"the namespace annotation {LINKERD_INJECT}: {ns_flag} asks Linkerd to inject its proxy",
            LINKERD_FIX,
        )
    return None
