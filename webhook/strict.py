"""Which pod settings let an app escape the sidecar: the rules behind `outrider.dev/inject=strict`.

Pure functions over a pod spec. Each problem names the field path and how to fix it; the engine
warns about the hard ones in `enabled` namespaces and refuses every one in `strict` namespaces.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from outrider.webhook import annotations as ann
from outrider.webhook.shape import as_list as _list
from outrider.webhook.shape import as_map as _map

# Capabilities that let a container rewrite the pod's iptables (NET_ADMIN, SYS_ADMIN, BPF), send
# around them (NET_RAW), load code into the kernel (SYS_MODULE), hijack the proxy (SYS_PTRACE) or
# switch to the sidecar's UID/GID (SETUID, SETGID). Spellings are normalised: `cap_net_admin` too.
HARD_CAPS = frozenset({"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_MODULE", "BPF", "ALL"})
STRICT_CAPS = HARD_CAPS | {"SYS_PTRACE", "SETUID", "SETGID"}
# Without these a root process cannot change its UID or GID (and no_new_privs stops setuid files).
ID_CHANGING_CAPS = frozenset({"SETUID", "SETGID"})
OUR_PREFIX = "outrider-"
CONTAINER_KEYS = ("initContainers", "containers", "ephemeralContainers")


def name_of(item: Any) -> str | None:
    """A container's or volume's name when it is a string (a fuzzed pod may put anything there)."""
    name = item.get("name") if isinstance(item, dict) else None
    return name if isinstance(name, str) else None


def capability(value: Any) -> str:
    """`net_admin`, `CAP_NET_ADMIN` and ` NET_ADMIN ` are the same capability to the runtime."""
    return str(value).strip().upper().removeprefix("CAP_")


def _caps(sc: Mapping[str, Any], key: str) -> set[str]:
    listed = _list(_map(sc.get("capabilities")).get(key))
    return {capability(c) for c in listed} if listed else set()


def container_problems(
    container: Mapping[str, Any], where: str, pod_sc: Mapping[str, Any], strict: bool
) -> list[str]:
    """Why one non-Outrider container could escape the capture (hard problems first)."""
    sc = _map(container.get("securityContext"))
    problems: list[str] = []
    if sc.get("privileged") is True:
        problems.append(
            f"{where}.securityContext.privileged is true (a privileged container can rewrite the pod's "
            "iptables); remove it"
        )
    added = _caps(sc, "add")
    bad = sorted(added & (STRICT_CAPS if strict else HARD_CAPS))
    if bad:
        problems.append(
            f"{where}.securityContext.capabilities.add has {', '.join(bad)} (they let the container bypass "
            "or rewrite the traffic capture); remove them"
        )
    for field_name in ("runAsUser", "runAsGroup"):
        own = sc.get(field_name)
        value = own if own is not None else pod_sc.get(field_name)
        if value == ann.SIDECAR_UID:
            source = f"{where}.securityContext" if own is not None else "spec.securityContext"
            problems.append(
                f"{source}.{field_name} is {ann.SIDECAR_UID}, the sidecar's ID whose traffic is never "
                f"captured ({where} runs with it); pick another ID"
            )
    if not strict:
        return problems
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if uid is None:
        problems.append(
            f"{where}.securityContext.runAsUser is not set (nor spec.securityContext.runAsUser): the "
            f"image's USER could be {ann.SIDECAR_UID}, whose traffic is never captured; set runAsUser "
            "to the UID the image runs as"
        )
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(
            f"{where}.securityContext.allowPrivilegeEscalation is not false: a setuid program in the image "
            f"could switch to UID {ann.SIDECAR_UID}; set allowPrivilegeEscalation: false"
        )
    dropped = _caps(sc, "drop")
    if uid == 0 and "ALL" not in dropped and not dropped >= ID_CHANGING_CAPS:
        problems.append(
            f"{where} runs as root with CAP_SETUID/CAP_SETGID, so it can switch to UID "
            f"{ann.SIDECAR_UID}; run it as non-root or set {where}.securityContext.capabilities.drop: "
            '["ALL"]'
        )
    return problems


def pod_problems(spec: Mapping[str, Any], strict: bool) -> list[str]:
    """Pod-level settings that open a way around the sidecar (hostNetwork is handled by the engine)."""
    pod_sc = _map(spec.get("securityContext"))
    problems: list[str] = []
    if pod_sc.get("fsGroup") == ann.SIDECAR_UID:
        problems.append(
            f"spec.securityContext.fsGroup is {ann.SIDECAR_UID}, the sidecar's GID, which every container "
            "would get as a supplementary group; pick another fsGroup"
        )
    if ann.SIDECAR_UID in _list(pod_sc.get("supplementalGroups")):
        problems.append(
            f"spec.securityContext.supplementalGroups contains {ann.SIDECAR_UID}, the sidecar's GID; "
            "remove it"
        )
    for key, why in (
        ("hostPID", "the node's processes (nsenter into the node's network)"),
        ("hostIPC", "the node's IPC namespace"),
    ):
        if spec.get(key) is True:
            problems.append(f"spec.{key} is true: it shares {why}; set {key}: false")
    if not strict:
        return problems
    if spec.get("shareProcessNamespace") is True:
        problems.append(
            "spec.shareProcessNamespace is true: app containers could signal the sidecar or read its "
            "/proc (tokens, SVID keys); set shareProcessNamespace: false"
        )
    for i, volume in enumerate(_list(spec.get("volumes"))):
        if isinstance(volume, dict) and volume.get("hostPath") is not None:
            problems.append(
                f"spec.volumes[{i}] ({volume.get('name')}).hostPath exposes the node's filesystem (a "
                "container runtime socket or /proc there runs code outside the sidecar); use another "
                "volume type"
            )
    if _list(spec.get("ephemeralContainers")):
        problems.append(
            "spec.ephemeralContainers is set at creation; remove it (add debug containers later with "
            "kubectl debug --profile=restricted)"
        )
    return problems


def problems(
    spec: Mapping[str, Any], strict: bool, skip: Iterable[str] = (), spiffe_driver: str = "csi.spiffe.io"
) -> list[str]:
    """Every problem of a pod spec; `skip` names the Outrider containers (already injected)."""
    ours = set(skip)
    pod_sc = _map(spec.get("securityContext"))
    found = pod_problems(spec, strict)
    spiffe_volumes: set[Any] | None = None  # read in strict namespaces only, when first needed
    for key in CONTAINER_KEYS:
        for i, c in enumerate(_list(spec.get(key))):
            name = name_of(c)
            if not isinstance(c, dict) or name in ours:
                continue
            where = f"spec.{key}[{i}] ({c.get('name')})"
            found += container_problems(c, where, pod_sc, strict)
            if not strict:
                continue
            if isinstance(name, str) and name.startswith(OUR_PREFIX):
                found.append(
                    f"{where}.name starts with {OUR_PREFIX!r}, which operators read as an Outrider "
                    "container; rename it"
                )
            if spiffe_volumes is None:
                spiffe_volumes = _spiffe_volumes(spec, spiffe_driver)
            found += _spiffe_mounts(c, where, spiffe_volumes)
    return found


def _spiffe_volumes(spec: Mapping[str, Any], spiffe_driver: str) -> set[Any]:
    """The pod's SPIFFE Workload API volumes: whoever reaches the socket gets the pod's SVID, so
    only the sidecar may mount them."""
    return {
        name_of(v)
        for v in _list(spec.get("volumes"))
        if isinstance(v, dict) and _map(v.get("csi")).get("driver") == spiffe_driver
    }


def _spiffe_mounts(container: Mapping[str, Any], where: str, volumes: set[Any]) -> list[str]:
    return [
        f"{where}.volumeMounts[{j}] mounts {m.get('name')}, a SPIFFE Workload API volume: the app could "
        "take the pod's SVID and act as the sidecar; only outrider-proxy may mount it, remove the mount"
        for j, m in enumerate(_list(container.get("volumeMounts")))
        if name_of(m) in volumes
    ]


def ephemeral_problems(old_pod: Any, new_pod: Any) -> list[str]:
    """Why new ephemeral containers (`pods/ephemeralcontainers` UPDATE) could escape the sidecar."""
    old_names = {
        name_of(c)
        for c in _list(_map(_map(old_pod).get("spec")).get("ephemeralContainers"))
        if isinstance(c, dict)
    }
    spec = _map(_map(new_pod).get("spec"))
    pod_sc = _map(spec.get("securityContext"))
    ours = _outrider_names(new_pod)
    status = _status(new_pod)
    our_volumes = {v for v in _list(status.get("volumes")) if isinstance(v, str)}
    csi_volumes = {
        name_of(v) for v in _list(spec.get("volumes")) if isinstance(v, dict) and v.get("csi") is not None
    }
    # Outrider's other volumes: the egress policy and the operator's sidecar_mounts Secrets.
    sidecar_only = our_volumes - csi_volumes
    found: list[str] = []
    for i, c in enumerate(_list(spec.get("ephemeralContainers"))):
        if not isinstance(c, dict) or name_of(c) in old_names:
            continue
        where = f"spec.ephemeralContainers[{i}] ({c.get('name')})"
        found += container_problems(c, where, pod_sc, strict=True)
        target = c.get("targetContainerName")
        if isinstance(target, str) and target in ours:
            found.append(
                f"{where}.targetContainerName is {c.get('targetContainerName')}: a debug container in the "
                "sidecar's process namespace can read its tokens and keys; target the app container"
            )
        found += _spiffe_mounts(c, where, our_volumes & csi_volumes)
        found += [
            f"{where}.volumeMounts[{j}] mounts {m.get('name')}, a volume only outrider-proxy may mount "
            "(its Secrets or egress policy); remove the mount"
            for j, m in enumerate(_list(c.get("volumeMounts")))
            if name_of(m) in sidecar_only
        ]
    return found


def sidecar_image_changes(old_pod: Any, new_pod: Any) -> list[str]:
    """An UPDATE that swaps an Outrider container's image could replace the sidecar with anything."""
    ours = _outrider_names(old_pod) | _outrider_names(new_pod)
    if not ours:
        return []

    def images(pod: Any) -> dict[str, tuple[str, Any]]:
        spec = _map(_map(pod).get("spec"))
        return {
            c["name"]: (f"spec.{key}[{i}]", c.get("image"))
            for key in ("initContainers", "containers")
            for i, c in enumerate(_list(spec.get(key)))
            if name_of(c) in ours
        }

    before, after = images(old_pod), images(new_pod)
    return [
        f"{where} ({name}).image changed from {before[name][1]!r} to {image!r}: the Outrider containers "
        "cannot be changed in place; roll the workload so the webhook injects them again"
        for name, (where, image) in after.items()
        if name in before and before[name][1] != image
    ]


def _status(pod: Any) -> dict[str, Any]:
    raw = _map(_map(_map(pod).get("metadata")).get("annotations")).get(ann.STATUS)
    try:
        status = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return {}
    return _map(status)


def _outrider_names(pod: Any) -> set[str]:
    status = _status(pod)
    names = [*_list(status.get("initContainers")), *_list(status.get("containers"))]
    return {n for n in names if isinstance(n, str)}


def refusal(problems: list[str], limit: int = 6) -> str:
    """One message for every problem found (numbered), so a user fixes them in one round."""
    shown = problems[:limit]
    head = (
        f"namespace is labelled {ann.NAMESPACE_INJECT}={ann.NAMESPACE_STRICT}, which refuses pods that "
        "could escape the sidecar"
    )
    body = shown[0] if len(shown) == 1 else " ".join(f"[{n}] {p}." for n, p in enumerate(shown, 1))
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return f"{body}{more} ({head})" if len(shown) == 1 else f"{head}: {body}{more}"
