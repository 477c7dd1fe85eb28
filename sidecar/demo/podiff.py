"""A short, readable summary of what injection changed in a pod (not a wall of YAML).

Pure functions over plain pod mappings: containers, init containers, volumes, metadata and probes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

_PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# Container fields summarised on their own lines; the rest are reported by name only.
_DETAILED = {"name", "env", "ports", "volumeMounts", "image", *_PROBES}


def _by_name(items: Any) -> dict[str, Mapping[str, Any]]:
    if not isinstance(items, Sequence):
        return {}
    return {str(i.get("name")): i for i in items if isinstance(i, Mapping)}


def describe_probe(probe: Mapping[str, Any] | None) -> str:
    if not probe:
        return "none"
    if "httpGet" in probe:
        g = probe["httpGet"]
        return f"httpGet {g.get('scheme', 'HTTP').lower()}://:{g.get('port')}{g.get('path', '/')}"
    if "tcpSocket" in probe:
        return f"tcpSocket :{probe['tcpSocket'].get('port')}"
    if "grpc" in probe:
        return f"grpc :{probe['grpc'].get('port')}"
    if "exec" in probe:
        return "exec " + " ".join(probe["exec"].get("command", []))
    return json.dumps(probe, sort_keys=True)


def _security(container: Mapping[str, Any]) -> str:
    sc = container.get("securityContext") or {}
    parts: list[str] = []
    if "runAsUser" in sc:
        parts.append(f"uid {sc['runAsUser']}")
    caps = (sc.get("capabilities") or {}).get("add")
    if caps:
        parts.append("caps +" + ",".join(caps))
    if sc.get("readOnlyRootFilesystem"):
        parts.append("read-only root FS")
    if sc.get("allowPrivilegeEscalation") is False:
        parts.append("no privilege escalation")
    return ", ".join(parts)


def describe_container(c: Mapping[str, Any]) -> list[str]:
    """Lines describing a container that injection added."""
    lines: list[str] = []
    head = f"image {c.get('image', '?')}"
    if c.get("restartPolicy") == "Always":
        head += "; native sidecar (restartPolicy: Always)"
    lines.append(head)
    command = [*(c.get("command") or []), *(c.get("args") or [])]
    if command:
        shown = " ".join(str(a) for a in command)
        lines.append("runs: " + (shown if len(shown) <= 100 else shown[:97] + "..."))
    sec = _security(c)
    if sec:
        lines.append("security: " + sec)
    ports = [f"{p.get('containerPort')}/{p.get('name', '')}".rstrip("/") for p in c.get("ports") or []]
    if ports:
        lines.append("ports: " + ", ".join(ports))
    env = [str(e.get("name")) for e in c.get("env") or []]
    if env:
        lines.append("env: " + ", ".join(env))
    mounts = [f"{m.get('name')}->{m.get('mountPath')}" for m in c.get("volumeMounts") or []]
    if mounts:
        lines.append("mounts: " + ", ".join(mounts))
    for kind in _PROBES:
        if c.get(kind):
            lines.append(f"{kind}: {describe_probe(c.get(kind))}")
    return lines


def _container_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for kind in _PROBES:
        if before.get(kind) != after.get(kind):
            lines.append(f"{kind}: {describe_probe(before.get(kind))}  ->  {describe_probe(after.get(kind))}")
    env_before = {str(e.get("name")) for e in before.get("env") or []}
    env_after = [str(e.get("name")) for e in after.get("env") or []]
    added_env = [n for n in env_after if n not in env_before]
    if added_env:
        lines.append("env added: " + ", ".join(added_env))
    for key in ("ports", "volumeMounts", "image"):
        if before.get(key) != after.get(key):
            lines.append(f"{key} changed")
    others = sorted(
        k for k in set(before) | set(after) if k not in _DETAILED and before.get(k) != after.get(k)
    )
    if others:
        lines.append("also changed: " + ", ".join(others))
    return lines


def _describe_volume(v: Mapping[str, Any]) -> str:
    kinds = [k for k in v if k != "name"]
    detail = ""
    if "csi" in v:
        csi = v["csi"]
        detail = f" (csi driver {csi.get('driver')}, readOnly={csi.get('readOnly', False)})"
    elif kinds:
        detail = f" ({kinds[0]})"
    return f"{v.get('name')}{detail}"


def _short(value: Any, limit: int = 110) -> str:
    if isinstance(value, str) and value.startswith("{"):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            decoded = None
        if isinstance(decoded, dict):
            # A JSON annotation (outrider.dev/status) reads better as key=value than as escaped JSON.
            value = " ".join(f"{k}={_flat(v)}" for k, v in decoded.items())
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flat(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_flat(v) for v in value) or "[]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_flat(v)}" for k, v in value.items()) + "}"
    return str(value)


def summarize(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """One line per change, prefixed `+` (added), `-` (removed) or `~` (changed); sub-lines indented."""
    lines: list[str] = []
    for section in ("labels", "annotations"):
        b = (before.get("metadata") or {}).get(section) or {}
        a = (after.get("metadata") or {}).get(section) or {}
        for key in sorted(set(a) - set(b)):
            lines.append(f"+ {section[:-1]} {key} = {_short(a[key])}")
        for key in sorted(set(b) - set(a)):
            lines.append(f"- {section[:-1]} {key}")
        for key in sorted(k for k in set(a) & set(b) if a[k] != b[k]):
            lines.append(f"~ {section[:-1]} {key}: {_short(b[key], 40)} -> {_short(a[key], 40)}")
    spec_b = before.get("spec") or {}
    spec_a = after.get("spec") or {}
    for field, label in (("initContainers", "initContainer"), ("containers", "container")):
        cb, ca = _by_name(spec_b.get(field)), _by_name(spec_a.get(field))
        for name in ca:
            if name not in cb:
                lines.append(f"+ {label} {name}")
                lines.extend(f"    {line}" for line in describe_container(ca[name]))
            elif ca[name] != cb[name]:
                lines.append(f"~ {label} {name}")
                lines.extend(f"    {line}" for line in _container_changes(cb[name], ca[name]))
        lines.extend(f"- {label} {name}" for name in cb if name not in ca)
    vb, va = _by_name(spec_b.get("volumes")), _by_name(spec_a.get("volumes"))
    lines.extend(f"+ volume {_describe_volume(va[n])}" for n in va if n not in vb)
    lines.extend(f"- volume {n}" for n in vb if n not in va)
    lines.extend(f"~ volume {n}" for n in va if n in vb and va[n] != vb[n])
    skip = {"initContainers", "containers", "volumes"}
    for key in sorted((set(spec_a) | set(spec_b)) - skip):
        if spec_a.get(key) != spec_b.get(key):
            lines.append(f"~ spec.{key}: {_short(spec_b.get(key), 40)} -> {_short(spec_a.get(key), 40)}")
    return lines


def container_env(pod: Mapping[str, Any], container: str, name: str) -> str | None:
    """The literal value of env `name` on `container` (init or regular), if set."""
    spec = pod.get("spec") or {}
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or []:
            if c.get("name") == container:
                for e in c.get("env") or []:
                    if e.get("name") == name and "value" in e:
                        return str(e["value"])
    return None


def find_container(pod: Mapping[str, Any], container: str) -> Mapping[str, Any] | None:
    spec = pod.get("spec") or {}
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or []:
            if c.get("name") == container:
                return c  # type: ignore[no-any-return]
    return None
