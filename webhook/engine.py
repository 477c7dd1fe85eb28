"""The injection engine: a pure function from a pod, its namespace and the config to the injected pod.

No I/O. The result carries the patched pod, the RFC 6902 patch against the original, warnings, and
whether the pod is admitted; the webhook server, offline inject and the golden tests all call it.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from outrider.sidecar import config as sidecar_settings
from outrider.sidecar.config_merge import deep_merge
from outrider.webhook import __version__, meshes, resource
from outrider.webhook import annotations as ann
from outrider.webhook import strict as strict_rules
from outrider.webhook.config import WebhookConfig, thaw
from outrider.webhook.egress import EgressPlan, plan_egress_cached
from outrider.webhook.mcp_policy import POLICY_CONFIG_MAP, POLICY_DIR, plan_policy
from outrider.webhook.memo import Memo
from outrider.webhook.patch import JsonPatch, diff_into, escape
from outrider.webhook.shape import as_list as _list
from outrider.webhook.shape import as_map as _map

INIT_NAME = "outrider-init"
PROXY_NAME = "outrider-proxy"
SPIFFE_VOLUME_NAME = "outrider-spiffe"
POLICY_VOLUME_NAME = "outrider-egress-policy"
MCP_POLICY_VOLUME_NAME = "outrider-policy"
SPIFFE_MOUNT_PATH = "/spiffe-workload-api"
SPIFFE_SOCKET = f"unix://{SPIFFE_MOUNT_PATH}/spire-agent.sock"
ADMIN_PORT_NAME = "outrider-admin"
INBOUND_PORT_NAME = "outrider-mcp"
OS_LABEL = "kubernetes.io/os"
PROBE_KINDS = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}

Pod = dict[str, Any]


@dataclass(frozen=True)
class InjectionResult:
    allowed: bool
    pod: Pod  # the injected pod (or an unchanged copy when skipped or refused)
    patch: JsonPatch = field(default_factory=list)
    warnings: tuple[str, ...] = ()
    message: str | None = None  # why the pod was refused (allowed is False)
    injected: bool = False
    skipped: str | None = None  # why the pod was left alone (allowed, no patch)


class _Refused(Exception):
    pass


def inject(
    pod: Mapping[str, Any],
    namespace_labels: Mapping[str, str],
    config: WebhookConfig,
    namespace_policy: Mapping[str, Any] | None = None,
    namespace: str | None = None,
    namespace_annotations: Mapping[str, str] | None = None,
) -> InjectionResult:
    """Inject Outrider into `pod` (a Pod or a pod template: `metadata` + `spec`)."""
    # Read-only from here on: the injected pod is built copy-on-write and shares untouched subtrees.
    original: Pod = pod if isinstance(pod, dict) else dict(pod)
    warnings: list[str] = []
    mode = ann.namespace_mode(namespace_labels)

    def skip(reason: str, warn: bool = True) -> InjectionResult:
        if warn:
            warnings.append(reason)
        return InjectionResult(True, original, [], tuple(warnings), skipped=reason)

    def refuse(message: str) -> InjectionResult:
        return InjectionResult(False, original, [], tuple(warnings), message=message)

    if mode is None:
        return skip(f"namespace is not labelled {ann.NAMESPACE_INJECT}=enabled|strict", warn=False)
    strict = mode == ann.NAMESPACE_STRICT
    metadata = _map(original.get("metadata"))
    spec = original.get("spec")
    if not isinstance(spec, dict) or not _list(spec.get("containers")):
        return refuse("spec.containers: the pod has no containers; nothing to inject into")
    containers = spec["containers"]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in containers):
        return refuse("spec.containers: every container must be an object with a name")
    try:
        settings = ann.parse_pod(metadata, config.token_audiences)
    except ann.AnnotationError as exc:
        return refuse(str(exc))
    for key in ann.unknown_keys(metadata):
        warnings.append(f"annotation {key} is not an Outrider annotation this version knows; ignored")

    if settings.already_injected:
        # In strict namespaces the marker is not trusted: a pod could carry it beside a fake or
        # loosened sidecar. It must match what this webhook would inject now, or it is refused.
        problem = (
            _verify_injected(
                original, metadata, spec, settings, namespace_labels, namespace_policy, config, namespace
            )
            if strict
            else None
        )
        if problem:
            return refuse(
                f"metadata.annotations[{ann.STATUS}] says the pod is injected but {problem}; remove the "
                "Outrider containers, volumes and annotation (or re-run outrider inject with the current "
                "config) so Outrider can inject the pod"
            )
        return skip(f"pod already injected ({ann.STATUS} is set); left unchanged")
    if settings.opt_out:
        where = f"metadata.{settings.opt_out_source}s[{ann.POD_INJECT}]"
        if strict:
            return refuse(
                f'{where}="false": opting out is not allowed in namespaces labelled '
                f"{ann.NAMESPACE_INJECT}=strict; remove the {settings.opt_out_source}"
            )
        return skip(f'pod opted out with {where}="false"; not injected')
    if spec.get("hostNetwork") is True:
        if strict:
            return refuse(
                "spec.hostNetwork: true shares the node's network, which the sidecar cannot capture; "
                f"set hostNetwork: false (namespace is {ann.NAMESPACE_INJECT}=strict)"
            )
        return skip("spec.hostNetwork is true: the sidecar cannot capture the node's network; not injected")
    if (
        _map(spec.get("os")).get("name") == "windows"
        or _map(spec.get("nodeSelector")).get(OS_LABEL) == "windows"
    ):
        # iptables capture, the Linux sidecar image and the SPIFFE CSI socket do not exist there.
        if strict:
            return refuse(
                "spec.os.name (or spec.nodeSelector[kubernetes.io/os]): windows pods cannot run the "
                "Outrider sidecar; run the MCP server on "
                f"Linux nodes (namespace is {ann.NAMESPACE_INJECT}=strict)"
            )
        return skip(
            "spec.os.name (or spec.nodeSelector[kubernetes.io/os]) is windows: the Outrider sidecar runs "
            "on Linux only; not injected"
        )
    mesh = meshes.conflict(metadata, spec, namespace_labels, namespace_annotations or {})
    if mesh is not None:
        if strict:
            return refuse(
                f"{mesh.reason}; two traffic-capturing proxies in one pod break each other; {mesh.fix} "
                f"(namespace is {ann.NAMESPACE_INJECT}=strict)"
            )
        return skip(
            f"{mesh.reason}; two traffic-capturing proxies in one pod break each other, so Outrider "
            f"does not inject it; {mesh.fix} to use Outrider"
        )

    try:
        escapes = _escapes(spec, strict, config)
        if escapes and strict:
            raise _Refused(strict_rules.refusal(escapes))
        warnings.extend(escapes)
        _check_port_clash(spec)
        mcp_port, app_index, server = _find_mcp_port(spec, settings.mcp_port, warnings)
        try:
            plan = plan_egress_cached(
                original, namespace_labels, namespace_policy, config.plain_egress_default_policy
            )
        except Exception as exc:  # the planner is another team's code; a crash must not be ours
            raise _Refused(
                f"cannot plan egress for this pod ({type(exc).__name__}); check its annotations"
            ) from None
        warnings.extend(plan.warnings)
        if plan.errors:
            raise _Refused("; ".join(plan.errors))
        if plan.mode not in ("capture", "explicit"):
            raise _Refused(f"egress plan mode {plan.mode!r} is not 'capture' or 'explicit'")
        pod_ns = str(metadata.get("namespace") or namespace or "default")
        resource_uri = _pod_resource(config, settings, metadata, spec, pod_ns)
        audience = settings.token_audience or config.default_audience
        mcp_policy = plan_policy(pod_ns, settings.policy, config.plain_mcp_policy)
        config_json = _sidecar_config_json(config, mcp_port, audience, plan, mcp_policy, resource_uri)
    except _Refused as exc:
        return refuse(str(exc))

    patched, ops = _apply(
        original,
        config,
        settings,
        plan,
        mcp_port,
        app_index,
        server,
        pod_ns,
        warnings,
        config_json,
        resource_uri,
        mcp_policy,
    )
    return InjectionResult(True, patched, ops, tuple(warnings), injected=True)


def _verify_injected(
    pod: Pod,
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    settings: ann.PodSettings,
    namespace_labels: Mapping[str, str],
    namespace_policy: Mapping[str, Any] | None,
    config: WebhookConfig,
    namespace: str | None = None,
) -> str | None:
    """Why an already-injected pod does not match a fresh injection (None when it does)."""
    try:
        status = json.loads(_map(metadata.get("annotations"))[ann.STATUS])
    except (ValueError, TypeError):
        return "its value is not the JSON Outrider writes"
    if not isinstance(status, dict):
        return "its value is not the JSON Outrider writes"
    if status.get("configHash") != config.hash:
        return f"it was injected with another config (hash {status.get('configHash')!r}, now {config.hash!r})"
    by_name = {strict_rules.name_of(c): c for c in _all_containers(spec)}
    ours = [
        n
        for n in (*_list(status.get("initContainers")), *_list(status.get("containers")))
        if isinstance(n, str)
    ]
    missing = [str(n) for n in ours if n not in by_name]
    if not ours or missing:
        return f"the containers it names are missing ({', '.join(missing) or 'none named'})"
    escapes = _escapes(spec, True, config, skip=set(map(str, ours)))
    if escapes:
        return escapes[0]
    # The MCP port decides what inbound traffic is captured: it must be the one the pod declares.
    app_spec = {
        **spec,
        "containers": [c for c in spec["containers"] if strict_rules.name_of(c) not in ours],
        "initContainers": [
            c for c in _list(spec.get("initContainers")) if strict_rules.name_of(c) not in ours
        ],
    }
    try:
        mcp_port, _, _ = _find_mcp_port(app_spec, settings.mcp_port, [])
    except _Refused as exc:
        return str(exc)
    if status.get("mcpPort") != mcp_port:
        return f"it records MCP port {status.get('mcpPort')!r} but the pod's MCP port is {mcp_port!r}"
    try:
        plan = plan_egress_cached(pod, namespace_labels, namespace_policy, config.plain_egress_default_policy)
    except Exception:
        return "its egress plan cannot be checked"
    try:
        pod_ns = str(metadata.get("namespace") or namespace or "default")
        resource_uri = _pod_resource(config, settings, metadata, spec, pod_ns)
    except _Refused as exc:
        return str(exc)
    if status.get("resource") != resource_uri:
        return f"it records resource {status.get('resource')!r} but this pod's resource is {resource_uri!r}"
    proxy = by_name[ours[-1]]
    mcp_policy = plan_policy(pod_ns, settings.policy, config.plain_mcp_policy)
    expected_env = sidecar_config(
        config, mcp_port, settings.token_audience or config.default_audience, plan, mcp_policy, resource_uri
    )
    # A YAML manifest (outrider inject) may hold any type here: `value: 5` is an int, not a string.
    env = {
        e["name"]: e.get("value")
        for e in _list(proxy.get("env"))
        if isinstance(e, dict) and isinstance(e.get("name"), str)
    }
    try:
        actual_env = json.loads(env.get("OUTRIDER_CONFIG") or "null")
    except (ValueError, TypeError):
        actual_env = None
    if (
        proxy.get("image") != config.sidecar_image
        or proxy.get("command") != ["outrider"]
        or proxy.get("args") != ["sidecar"]
        or proxy.get("securityContext") != _restricted(ann.SIDECAR_UID)
        or actual_env != expected_env
    ):
        return f"container {ours[-1]} is not the sidecar this webhook injects"
    if plan.mode == "capture":
        init = by_name[ours[0]] if len(ours) > 1 else {}
        init_args = ["iptables", *plan.init_args]
        if mcp_port is not None:
            init_args += ["--inbound-ports", str(mcp_port)]
        if init.get("image") != config.sidecar_image or init.get("args") != init_args:
            return "its traffic-capture init container is missing or not the one this webhook injects"
    return None


def _all_containers(spec: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    for key in ("initContainers", "containers"):
        yield from (c for c in _list(spec.get(key)) if isinstance(c, dict))


def _escapes(
    spec: Mapping[str, Any], strict: bool, config: WebhookConfig, skip: set[str] | None = None
) -> list[str]:
    """Ways around the sidecar: warned about in `enabled` namespaces, refused in `strict` ones."""
    found = strict_rules.problems(spec, strict, skip or (), config.spiffe_csi_driver)
    if strict and not config.native_sidecar:
        ours = skip or set()
        for i, c in enumerate(_list(spec.get("initContainers"))):
            if isinstance(c, dict) and strict_rules.name_of(c) not in ours:
                found.append(
                    f"spec.initContainers[{i}] ({c.get('name')}) would run before outrider-init in the "
                    "classic layout (webhook config native_sidecar: false), so its traffic is not "
                    "captured; move its work into an app container or ask the operator for the native "
                    "sidecar layout"
                )
    return found


def _check_port_clash(spec: Mapping[str, Any]) -> None:
    # `_all_containers` spelt out: no generator per admission
    for key in ("initContainers", "containers"):
        for c in _list(spec.get(key)):
            if not isinstance(c, dict):
                continue
            for p in _list(c.get("ports")):
                if isinstance(p, dict) and p.get("containerPort") in ann.SIDECAR_PORTS:
                    raise _Refused(
                        f"container {c.get('name')} declares containerPort {p.get('containerPort')}, "
                        f"which the outrider-proxy sidecar uses ({', '.join(map(str, ann.SIDECAR_PORTS))}); "
                        "move it to another port"
                    )


def _tcp_ports(container: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        p
        for p in _list(container.get("ports"))
        if isinstance(p, dict)
        and isinstance(p.get("containerPort"), int)
        and p.get("protocol", "TCP") == "TCP"
    ]


def _restartable_inits(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The native sidecars among the init containers (restartPolicy Always, Kubernetes >= 1.29): they
    run beside the app containers for the pod's life, so one may be the MCP server."""
    return [
        c
        for c in _list(spec.get("initContainers"))
        if isinstance(c, dict) and c.get("restartPolicy") == "Always" and isinstance(c.get("name"), str)
    ]


def _find_mcp_port(
    spec: Mapping[str, Any], wanted: int | str | None, warnings: list[str]
) -> tuple[int | None, int, str | None]:
    """The MCP port number, the index of the app container that keeps the preStop sleep, and the name
    of the container that serves the port (None when none declares it).

    App containers are searched first, then native sidecars (restartable init containers); a port a
    native sidecar serves gives index 0 (the first app container keeps the preStop sleep: a native
    sidecar outlives the app containers anyway) and that sidecar's name, which becomes the
    default-container annotation (`kubectl` looks it up among the init containers too). Run-to-
    completion init containers never serve it.
    """
    containers = spec["containers"]
    serving = [*containers, *_restartable_inits(spec)]

    def found(port: int, i: int) -> tuple[int, int, str | None]:
        name = serving[i].get("name")
        return port, i if i < len(containers) else 0, name if isinstance(name, str) else None

    if isinstance(wanted, str):
        for i, c in enumerate(serving):
            for p in _tcp_ports(c):
                if p.get("name") == wanted:
                    return found(int(p["containerPort"]), i)
        names = sorted({str(p["name"]) for c in serving for p in _tcp_ports(c) if p.get("name")})
        raise _Refused(
            f"annotation {ann.MCP_PORT}={wanted!r} names no TCP containerPort of an app container; "
            f"allowed: a port number or one of {names or 'the containers declare no named ports'}"
        )
    if isinstance(wanted, int):
        for i, c in enumerate(serving):
            if any(p["containerPort"] == wanted for p in _tcp_ports(c)):
                return found(wanted, i)
        return wanted, 0, None
    for i, c in enumerate(serving):
        ports = _tcp_ports(c)
        if ports:
            if ports[0]["containerPort"] in ann.SIDECAR_PORTS:
                break
            return found(int(ports[0]["containerPort"]), i)
    warnings.append(
        f"no MCP port found (no {ann.MCP_PORT} annotation and no TCP containerPort); inbound MCP "
        f"traffic is not proxied; set {ann.MCP_PORT}"
    )
    return None, 0, None


def _free_name(wanted: str, taken: set[str]) -> str:
    if wanted not in taken:
        taken.add(wanted)
        return wanted
    n = 1
    while f"{wanted}-{n}" in taken:
        n += 1
    taken.add(f"{wanted}-{n}")
    return f"{wanted}-{n}"


def _free_port_name(wanted: str, taken: set[str]) -> str:
    # IANA_SVC_NAME is at most 15 characters, so suffixes replace the tail rather than extend it.
    if wanted not in taken:
        taken.add(wanted)
        return wanted
    n = 1
    while True:
        candidate = f"{wanted[: 15 - len(str(n)) - 1]}-{n}"
        if candidate not in taken:
            taken.add(candidate)
            return candidate
        n += 1


def _port_number(container: Mapping[str, Any], port: Any) -> int | None:
    """The port a probe's `port` reaches, resolved as the kubelet does (`findPortByName`): a name is
    looked up among the container's ports whatever their protocol, since the probe itself is TCP."""
    if isinstance(port, int):
        return port
    if isinstance(port, str):
        if port.isdecimal():  # not isdigit: "²" is a digit that int() refuses
            return int(port)
        for p in _list(container.get("ports")):
            if isinstance(p, dict) and p.get("name") == port and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None


def _rewrite_probes(
    containers: list[dict[str, Any]], mcp_port: int, native_only: bool = False
) -> dict[str, Any]:
    """Point kubelet probes on the MCP port at the admin port; return the originals by path.

    `native_only`: `containers` are init containers, of which only native sidecars (restartPolicy
    Always) serve traffic; run-to-completion ones keep their probes (the kubelet never runs them).
    """
    originals: dict[str, Any] = {}
    for index, c in enumerate(containers):
        if native_only and (c.get("restartPolicy") != "Always" or not isinstance(c.get("name"), str)):
            continue
        copied = False
        for kind, suffix in PROBE_KINDS.items():
            probe = c.get(kind)
            if not isinstance(probe, dict):
                continue
            handler_key = "httpGet" if isinstance(probe.get("httpGet"), dict) else None
            if handler_key is None and isinstance(probe.get("tcpSocket"), dict):
                handler_key = "tcpSocket"
            if handler_key is None:
                continue  # exec and grpc probes do not pass through the capture
            handler = probe[handler_key]
            if handler.get("host"):
                # The kubelet connects to that address, not to this pod's IP: the capture (rules in
                # the pod's network namespace) never sees the probe, and a replay against 127.0.0.1
                # would check another server than the one written.
                continue
            port = _port_number(c, handler.get("port"))
            if port != mcp_port:
                continue
            path = f"/app-health/{c['name']}/{suffix}"
            record: dict[str, Any]
            if handler_key == "httpGet":
                original: dict[str, Any] = {
                    "path": handler.get("path") or "/",
                    "port": port,
                    "scheme": handler.get("scheme") or "HTTP",
                }
                if handler.get("httpHeaders"):
                    original["httpHeaders"] = handler["httpHeaders"]
                record = {"httpGet": original}
            else:
                record = {"tcpSocket": {"port": port}}
            if "timeoutSeconds" in probe:
                record["timeoutSeconds"] = probe["timeoutSeconds"]
            originals[path] = record
            new_probe = {k: v for k, v in probe.items() if k not in ("httpGet", "tcpSocket")}
            new_probe["httpGet"] = {"path": path, "port": ann.ADMIN_PORT, "scheme": "HTTP"}
            if not copied:  # copy-on-write: untouched containers stay shared with the original
                c = containers[index] = dict(c)
                copied = True
            c[kind] = new_probe
    return originals


def _pod_resource(
    config: WebhookConfig,
    settings: ann.PodSettings,
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    namespace: str,
) -> str | None:
    """This pod's protected resource URI: the annotation (inside the patterns) or the template."""
    if settings.resource is None and config.resource_template is None:
        return None
    labels = {str(k): v for k, v in _map(metadata.get("labels")).items() if isinstance(v, str)}
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    facts = resource.PodFacts(namespace=namespace, service_account=str(sa), labels=labels)
    if settings.resource is not None:
        allowed = config.resource_patterns
        for i, pattern in enumerate(allowed):
            if resource.matches(
                settings.resource, pattern, facts, config.resource_base_url, f"resource_patterns[{i}]"
            ):
                return settings.resource
        described = (resource.describe(p, facts, config.resource_base_url) for p in allowed)
        shown = tuple(d for d in described if d is not None)
        raise _Refused(str(ann.resource_not_allowed(settings.resource, shown, bool(allowed))))
    assert config.resource_template is not None
    try:
        return resource.expand(config.resource_template, facts, config.resource_base_url, "resource_template")
    except resource.ResourceError as exc:
        raise _Refused(f"cannot build this MCP server's resource URI: {exc}") from None


def sidecar_config(
    config: WebhookConfig,
    mcp_port: int | None,
    audience: str | None,
    plan: EgressPlan,
    mcp_policy: Mapping[str, Any] | None = None,
    resource_uri: str | None = None,
) -> dict[str, Any]:
    """The per-pod OUTRIDER_CONFIG: the operator's `sidecar:` block under the per-pod values."""
    policy = plan.policy if type(plan.policy) is dict else thaw(plan.policy)
    per_pod: dict[str, Any] = {"egress": {"mode": plan.mode, "policy": policy}}
    if mcp_policy is not None:
        per_pod["policy"] = dict(mcp_policy)
    if mcp_port is not None:
        per_pod["inbound"] = {"mcp_port": mcp_port}
    if resource_uri is not None:
        per_pod.setdefault("inbound", {})["resource"] = resource_uri
    if audience:
        per_pod["exchange"] = {"audience": audience}
    return deep_merge(config.plain_sidecar, per_pod)


def _sorted_json(value: Any) -> str:
    """Compact JSON with sorted keys: what `json.dumps(sort_keys=True)` writes, ~5x faster.

    orjson keeps non-ASCII (and DEL) unescaped where json escapes them, so such text goes through
    json; floats, which a pod never has here, may be spelt differently (1e-7 vs 1e-07) but parse equal.
    """
    text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    if text.isascii() and b"\x7f" not in text:
        return text.decode()
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# OUTRIDER_CONFIG text (or the sidecar's refusal of it) by (plan, config, port, audience, policy,
# resource): cached plans come back as the same object, so most admissions reuse the JSON and its
# check. The entry holds its plan, so the id() in the key stays its own.
_ConfigKey = tuple[int, str, int | None, str | None, str, str | None]
_CONFIG_JSON: Memo[_ConfigKey, tuple[EgressPlan, str, str | None]] = Memo(1024)
# The merged config without the per-pod `inbound` values, and the first error of its other sections.
_CONFIG_BASE: Memo[
    tuple[int, str, None, str | None, str], tuple[EgressPlan, dict[str, Any], tuple[str, str] | None]
] = Memo(512)
# The first error of the per-pod `inbound` section (("", "") for none). That section is the config's
# own `inbound` block (fixed by the config hash) with the pod's MCP port and resource URI merged in,
# so those three are every input: pods with other plans, audiences or policies share the check.
_INBOUND_ERRORS: Memo[tuple[str, type, int | None, str | None], tuple[str, str]] = Memo(4096)
_OTHER_SECTIONS = tuple(s for s in sidecar_settings.SECTIONS if s != "inbound")
# Sections the engine writes per pod (plan, audience, MCP policy); the others are the operator's
# `sidecar:` block alone, so their first error is one per config hash.
_PER_POD_SECTIONS = ("exchange", "egress", "policy")
_CONFIG_ONLY_SECTIONS = tuple(s for s in _OTHER_SECTIONS if s not in _PER_POD_SECTIONS)
_CONFIG_ONLY_ERRORS: Memo[str, tuple[str, str]] = Memo(64)
# The first error of the per-pod sections by (config hash, audience, MCP policy text, egress mode), for
# plans whose policy is a plain dict (what `plan_egress` returns): the sidecar's `egress` check reads the
# mode and only whether the policy is a mapping, so a pod with its own allowlist (a new plan) shares it.
_PER_POD_ERRORS: Memo[tuple[str, str | None, str, str], tuple[str, str]] = Memo(256)


def _sidecar_config_json(
    config: WebhookConfig,
    mcp_port: int | None,
    audience: str | None,
    plan: EgressPlan,
    mcp_policy: Mapping[str, Any] | None = None,
    resource_uri: str | None = None,
) -> str:
    """The pod's OUTRIDER_CONFIG text; `_Refused` with the sidecar's own error when it would not start."""
    # The policy section is part of the key by value (it is small and differs per namespace/annotation).
    policy_key = "" if mcp_policy is None else json.dumps(mcp_policy, sort_keys=True)
    key = (id(plan), config.hash, mcp_port, audience, policy_key, resource_uri)
    found = _CONFIG_JSON.get(key)
    if found is not None and found[0] is plan:
        if found[2] is not None:
            raise _Refused(found[2])
        return found[1]
    # The merged config without the port is shared by every pod with this plan and audience (the
    # thawed policy and the merge are the costly part); the port is merged in as deep_merge would.
    base_key = (id(plan), config.hash, None, audience, policy_key)
    base = _CONFIG_BASE.get(base_key)
    if base is None or base[0] is not plan:
        merged = sidecar_config(config, None, audience, plan, mcp_policy)
        other = None
        with contextlib.suppress(sidecar_settings.ConfigError):  # reported per pod, by `validate`
            sidecar_settings.check_sections(merged)
            own = _CONFIG_ONLY_ERRORS.get(config.hash)
            if own is None:
                first = sidecar_settings.first_error(merged, _CONFIG_ONLY_SECTIONS)
                own = _CONFIG_ONLY_ERRORS.put(config.hash, first or ("", ""))
            errors = [e for e in (own, _per_pod_error(merged, config, audience, policy_key, plan)) if e[0]]
            other = min(errors, key=lambda e: sidecar_settings.SECTIONS.index(e[0])) if errors else ("", "")
        base = _CONFIG_BASE.put(base_key, (plan, merged, other))
    value = base[1]
    per_pod_inbound: dict[str, Any] = {}
    if mcp_port is not None:
        per_pod_inbound["mcp_port"] = mcp_port
    if resource_uri is not None:
        per_pod_inbound["resource"] = resource_uri
    if per_pod_inbound:
        inbound = value.get("inbound")
        value = {
            **value,
            "inbound": {**inbound, **per_pod_inbound} if isinstance(inbound, Mapping) else per_pod_inbound,
        }
    # orjson spells some floats differently from json (1e-07 vs 1e-7): floats take the json path.
    floats = _floats_in(config.hash, config.plain_sidecar) or _floats_in(plan, plan.policy)
    text = json.dumps(value, sort_keys=True, separators=(",", ":")) if floats else _sorted_json(value)
    if base[2] is None:
        error = _sidecar_refusal(value)
    else:
        inbound_key = (config.hash, type(mcp_port), mcp_port, resource_uri)
        inbound_error = _INBOUND_ERRORS.get(inbound_key)
        if inbound_error is None:
            first = sidecar_settings.first_error(value, ("inbound",))
            inbound_error = _INBOUND_ERRORS.put(inbound_key, first or ("", ""))
        error = _sidecar_refusal(value, base[2], inbound_error)
    _CONFIG_JSON.put(key, (plan, text, error))
    if error is not None:
        raise _Refused(error)
    return text


def _per_pod_error(
    merged: Mapping[str, Any], config: WebhookConfig, audience: str | None, policy_key: str, plan: EgressPlan
) -> tuple[str, str]:
    """The first error of the per-pod sections of `merged` (("", "") for none)."""
    if type(plan.policy) is not dict:  # an odd plan: its policy's type may decide the egress check
        return sidecar_settings.first_error(merged, _PER_POD_SECTIONS) or ("", "")
    key = (config.hash, audience, policy_key, plan.mode)
    found = _PER_POD_ERRORS.get(key)
    if found is None:
        found = _PER_POD_ERRORS.put(key, sidecar_settings.first_error(merged, _PER_POD_SECTIONS) or ("", ""))
    return found


def _sidecar_refusal(
    value: Mapping[str, Any],
    other: tuple[str, str] | None = None,
    inbound: tuple[str, str] | None = None,
) -> str | None:
    """The sidecar's own start-up error for this OUTRIDER_CONFIG, or None when it would start.

    `other`: the first error of every section but `inbound` (("", "") for none), already known from
    the config shared by many pods; then only `inbound`, the per-pod part, is checked again (unless
    `inbound` gives its first error, ("", "") for none), and the first error in section order is the
    one `validate` would give. None: check everything.
    """
    message: str | None = None
    if other is None:
        try:
            sidecar_settings.validate(value)
        except sidecar_settings.ConfigError as exc:
            message = str(exc)
    else:
        if inbound is None:
            inbound = sidecar_settings.first_error(value, ("inbound",))
        found = [e for e in (other, inbound) if e and e[0]]
        if found:
            message = min(found, key=lambda e: sidecar_settings.SECTIONS.index(e[0]))[1]
    if message is None:
        return None
    return (
        f"the outrider-proxy sidecar would refuse this pod's configuration (OUTRIDER_CONFIG): {message}; "
        "fix the pod's outrider.dev/* annotations or ask the operator to fix the webhook config"
    )


def _has_float(value: Any) -> bool:
    """Whether a float sits anywhere in `value` (mappings, lists and tuples walked).

    One loop over a stack, exact types first: a plan's policy (~25 nodes of dicts, lists, strings
    and ints) costs ~2 us instead of ~10 us of recursive generators and ABC `isinstance` checks.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is int:
            continue
        if kind is dict:
            stack.extend(item.values())
        elif kind is list or kind is tuple:
            stack.extend(item)
        elif kind is float:
            return True
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


# Whether a config's `sidecar:` block or a plan's policy holds a float, by config hash or plan; the
# per-pod values merged over them (port, audience, mode) never do. Plans are kept so ids stay theirs.
_FLOATS: Memo[Any, tuple[Any, bool]] = Memo(512)


def _floats_in(owner: Any, value: Any) -> bool:
    key = owner if isinstance(owner, str) else id(owner)
    found = _FLOATS.get(key)
    if found is not None and found[0] is owner:
        return found[1]
    result = _has_float(value)
    _FLOATS.put(key, (owner, result))
    return result


def _restricted(uid: int) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsGroup": uid,
        "runAsNonRoot": True,
        "runAsUser": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _stop_delay(config: WebhookConfig, spec: Mapping[str, Any]) -> int:
    """The app's preStop sleep: `app_stop_delay_seconds`, leaving the pod's grace period at least
    2 s for the app and the proxy to stop (0: none)."""
    grace = spec.get("terminationGracePeriodSeconds")
    grace = grace if isinstance(grace, int) and not isinstance(grace, bool) else 30
    return max(0, min(config.app_stop_delay_seconds, grace - 2))


@dataclass(frozen=True)
class _Parts:
    """What every pod injected with one config gets alike, built once per config.

    The injected pod and the patch share these objects (as they share the input's untouched
    subtrees), so neither may be mutated in place; per-pod values get their own objects.
    """

    config: WebhookConfig
    command: list[str]
    sidecar_args: list[str]
    resources: dict[str, Any]
    restricted: dict[str, Any]
    init_security: dict[str, Any]
    env_head: tuple[dict[str, Any], ...]
    env_tail: tuple[dict[str, Any], ...]
    default_ports: list[dict[str, Any]]
    readiness: dict[str, Any]
    liveness: dict[str, Any]
    startup: dict[str, Any]


_PARTS: Memo[str, _Parts] = Memo(16)


def _parts(config: WebhookConfig) -> _Parts:
    found = _PARTS.get(config.hash)
    if found is not None and found.config is config:
        return found

    def admin_probe(path: str, period: int, failures: int) -> dict[str, Any]:
        handler = {"path": path, "port": ann.ADMIN_PORT, "scheme": "HTTP"}
        return {"httpGet": handler, "periodSeconds": period, "failureThreshold": failures}

    return _PARTS.put(
        config.hash,
        _Parts(
            config=config,
            command=["outrider"],
            sidecar_args=["sidecar"],
            resources={k: dict(v) for k, v in config.plain_resources.items()},
            restricted=_restricted(ann.SIDECAR_UID),
            init_security={
                "allowPrivilegeEscalation": False,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                "privileged": False,
                "readOnlyRootFilesystem": True,
                "runAsGroup": 0,
                "runAsNonRoot": False,
                "runAsUser": 0,
            },
            env_head=(
                {"name": "OUTRIDER_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {
                    "name": "OUTRIDER_POD_NAMESPACE",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                },
                {"name": "SPIFFE_ENDPOINT_SOCKET", "value": SPIFFE_SOCKET},
            ),
            env_tail=tuple({"name": name, "value": value} for name, value in config.sidecar_env),
            default_ports=_proxy_ports(ADMIN_PORT_NAME, INBOUND_PORT_NAME),
            readiness=admin_probe("/readyz", 2, 30),
            liveness=admin_probe("/healthz", 10, 3),
            # The kubelet starts the app only after a native sidecar's startupProbe passes.
            startup=admin_probe("/healthz", 1, 120),
        ),
    )


def _proxy_ports(admin: str, inbound: str) -> list[dict[str, Any]]:
    return [
        {"name": admin, "containerPort": ann.ADMIN_PORT, "protocol": "TCP"},
        {"name": inbound, "containerPort": ann.INBOUND_PORT, "protocol": "TCP"},
    ]


def _named(items: Any) -> bool:
    """A list of objects that all have a string name (the patch appends or inserts by position)."""
    if type(items) is not list:
        return False
    for item in items:  # noqa: SIM110 - a plain loop: no generator per list on every admission
        if type(item) is not dict or type(item.get("name")) is not str:
            return False
    return True


def _add_each(path: str, values: Iterable[Any], ops: JsonPatch) -> None:
    ops.extend({"op": "add", "path": path, "value": v} for v in values)


def _diff_changed(old: list[dict[str, Any]], new: list[dict[str, Any]], shift: int, ops: JsonPatch) -> None:
    """Patch the entries of `new` that are not `old`'s (copied when changed), at index + `shift`."""
    for i, item in enumerate(old):
        if new[i] is not item:
            diff_into(item, new[i], f"/spec/initContainers/{i + shift}", ops)


def _apply(
    pod: Pod,
    config: WebhookConfig,
    settings: ann.PodSettings,
    plan: EgressPlan,
    mcp_port: int | None,
    app_index: int,
    server: str | None,
    namespace: str,
    warnings: list[str],
    config_json: str,
    resource_uri: str | None,
    mcp_policy: Mapping[str, Any] | None = None,
) -> tuple[Pod, JsonPatch]:
    """The injected pod and the RFC 6902 patch from `pod` to it, built together.

    The patch is what `webhook.patch.diff(pod, injected)` gives, op for op, without deep-copying or
    walking the pod: the changes are few and known (annotations added, app containers and native
    sidecars changed in place, ours inserted or appended by position, volumes appended); a list of an
    unusual shape (null, an entry without a string name) goes through the generic diff, as it would in
    `diff`. `inject`
    has checked that `spec` is a mapping and every container an object with a string name.
    """
    original = pod
    parts = _parts(config)
    # Copy only what changes (pod, metadata, spec, app containers); everything else is shared.
    pod = dict(pod)
    old_metadata = original.get("metadata")
    metadata = dict(old_metadata) if isinstance(old_metadata, dict) else {}
    pod["metadata"] = metadata
    old_spec: dict[str, Any] = original["spec"]
    spec = dict(old_spec)
    pod["spec"] = spec
    # Containers are copied only when changed (probes, env), so the diff skips the others by identity.
    spec_containers: list[dict[str, Any]] = spec["containers"]
    containers = list(spec_containers)
    spec["containers"] = containers
    user_inits = [c for c in _list(spec.get("initContainers")) if isinstance(c, dict)]
    taken: set[str] = set()
    taken_ports: set[str] = set()
    for c in (*user_inits, *containers):
        taken.add(str(c.get("name")))
        for p in _list(c.get("ports")):
            if isinstance(p, dict) and p.get("name"):
                taken_ports.add(str(p.get("name")))
    volumes = _list(spec.get("volumes"))
    taken_volumes = {str(v.get("name")) for v in volumes if isinstance(v, dict)}

    capture = plan.mode == "capture"
    init_name = _free_name(INIT_NAME, taken) if capture else None
    proxy_name = _free_name(PROXY_NAME, taken)
    volume_name = _free_name(SPIFFE_VOLUME_NAME, taken_volumes)

    # Init containers are copied only when changed too (a native sidecar's probes on the MCP port).
    inits = list(user_inits)
    app_probes: dict[str, Any] = {}
    if capture and mcp_port is not None:
        app_probes = _rewrite_probes(containers, mcp_port)
        app_probes.update(_rewrite_probes(inits, mcp_port, native_only=True))
    env: list[dict[str, Any]] = [
        *parts.env_head,
        {"name": "OUTRIDER_CONFIG", "value": config_json},
        *parts.env_tail,
    ]
    if app_probes:
        env.append({"name": "OUTRIDER_APP_PROBES", "value": _sorted_json(app_probes)})

    if ADMIN_PORT_NAME in taken_ports or INBOUND_PORT_NAME in taken_ports:
        ports = _proxy_ports(
            _free_port_name(ADMIN_PORT_NAME, taken_ports), _free_port_name(INBOUND_PORT_NAME, taken_ports)
        )
    else:
        ports = parts.default_ports
    mounts: list[dict[str, Any]] = [{"name": volume_name, "mountPath": SPIFFE_MOUNT_PATH, "readOnly": True}]
    proxy: dict[str, Any] = {
        "name": proxy_name,
        "image": config.sidecar_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": parts.sidecar_args,
        "command": parts.command,
        "env": env,
        "ports": ports,
        "readinessProbe": parts.readiness,
        "livenessProbe": parts.liveness,
        "resources": parts.resources,
        "securityContext": parts.restricted,
        "volumeMounts": mounts,
    }
    if config.native_sidecar:
        proxy["restartPolicy"] = "Always"
        proxy["startupProbe"] = parts.startup

    stop_delay = _stop_delay(config, spec)
    if stop_delay:
        # Deleting a pod removes it from the Service's endpoints and sends SIGTERM at the same time;
        # an app that stops listening at once refuses the calls still routed here until every
        # kube-proxy has caught up. A preStop sleep holds its SIGTERM back. A native sidecar is
        # stopped only after the app has exited, so it needs none; the classic layout's proxy would
        # otherwise start draining while the app still serves, so it waits as long.
        sleep = {"preStop": {"sleep": {"seconds": stop_delay}}}
        app = containers[app_index]
        if not _map(app.get("lifecycle")).get("preStop"):
            if app is spec_containers[app_index]:
                app = containers[app_index] = dict(app)
            app["lifecycle"] = {**_map(app.get("lifecycle")), **sleep}
        else:
            stop_delay = 0  # the app's own preStop decides when it hears SIGTERM
        if not config.native_sidecar and stop_delay:
            proxy["lifecycle"] = sleep

    new_inits: list[dict[str, Any]] = []
    if capture and init_name is not None:
        init_args = ["iptables", *plan.init_args]
        if mcp_port is not None:
            init_args += ["--inbound-ports", str(mcp_port)]
        new_inits.append(
            {
                "name": init_name,
                "image": config.sidecar_image,
                "imagePullPolicy": config.image_pull_policy,
                "args": init_args,
                "command": parts.command,
                "resources": parts.resources,
                "securityContext": parts.init_security,
            }
        )
    for name, value in plan.app_env:
        for index, c in enumerate(containers):
            existing = _list(c.get("env"))
            if any(isinstance(e, dict) and e.get("name") == name for e in existing):
                warnings.append(f"container {c['name']} sets {name} itself; Outrider's value is not applied")
                continue
            if c is spec_containers[index]:
                c = containers[index] = dict(c)
            c["env"] = [*existing, {"name": name, "value": value}]

    # The spec's keys this injection sets, with the ops for each (in the new spec's key order below).
    spec_ops: dict[str, JsonPatch] = {}
    old_inits = old_spec.get("initContainers")
    if config.native_sidecar:
        # Capture and proxy come first, so user init containers already run behind the proxy.
        ours = [*new_inits, proxy]
        spec["initContainers"] = [*ours, *inits]
        if old_inits and _named(old_inits):
            # ours in front (indexes 0..n-1); the old entries, all kept, match by name behind them,
            # so a changed one (probes) is patched at its shifted index after the inserts
            spec_ops["initContainers"] = [
                {"op": "add", "path": f"/spec/initContainers/{i}", "value": v} for i, v in enumerate(ours)
            ]
            _diff_changed(old_inits, inits, len(ours), spec_ops["initContainers"])
        else:
            spec_ops["initContainers"] = []
    else:
        # Classic layout: user init containers keep their network, so outrider-init goes last.
        if new_inits:
            spec["initContainers"] = [*inits, *new_inits]
            spec_ops["initContainers"] = []
            if old_inits and _named(old_inits):
                # the old entries in place (a changed one patched there), ours appended
                _diff_changed(old_inits, inits, 0, spec_ops["initContainers"])
                _add_each("/spec/initContainers/-", new_inits, spec_ops["initContainers"])
        containers.append(proxy)
    new_volumes: list[dict[str, Any]] = [
        {"name": volume_name, "csi": {"driver": config.spiffe_csi_driver, "readOnly": True}}
    ]
    policy_map = getattr(plan, "policy_config_map", None)
    policy_file = getattr(plan, "policy_file", None)
    if policy_map and policy_file:
        # The namespace may narrow the egress policy at run time with this (optional) ConfigMap.
        policy_volume = _free_name(POLICY_VOLUME_NAME, taken_volumes)
        new_volumes.append({"name": policy_volume, "configMap": {"name": policy_map, "optional": True}})
        mounts.append({"name": policy_volume, "mountPath": posixpath.dirname(policy_file), "readOnly": True})
    if mcp_policy is not None:
        # The namespace may narrow the MCP policy and rate limits at run time with this ConfigMap.
        mcp_volume = _free_name(MCP_POLICY_VOLUME_NAME, taken_volumes)
        new_volumes.append({"name": mcp_volume, "configMap": {"name": POLICY_CONFIG_MAP, "optional": True}})
        mounts.append({"name": mcp_volume, "mountPath": POLICY_DIR, "readOnly": True})
    for mount in config.sidecar_mounts:
        # Operator-chosen Secrets/ConfigMaps for the sidecar's *_file settings: the proxy only.
        mount_volume = _free_name(mount.name, taken_volumes)
        new_volumes.append(mount.volume(mount_volume))
        mounts.append({"name": mount_volume, "mountPath": mount.mount_path, "readOnly": True})
    spec["volumes"] = [*volumes, *new_volumes]
    spec_ops["volumes"] = []
    added_pull_secrets: list[str] = []
    if config.image_pull_secrets:
        # The sidecar image may sit in a private registry; the pod's own pull secrets are kept.
        pull = _list(spec.get("imagePullSecrets"))
        have = {s.get("name") for s in pull if isinstance(s, dict) and isinstance(s.get("name"), str)}
        added_pull_secrets = [n for n in config.image_pull_secrets if n not in have]
        if added_pull_secrets:
            spec["imagePullSecrets"] = [*pull, *({"name": n} for n in added_pull_secrets)]
            spec_ops["imagePullSecrets"] = []

    old_annotations = _map(metadata.get("annotations"))
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    status = {
        "version": __version__,
        "initContainers": [n for n in (init_name, proxy_name if config.native_sidecar else None) if n],
        "containers": [] if config.native_sidecar else [proxy_name],
        "volumes": [v["name"] for v in new_volumes],
        "configHash": config.hash,
        "egressMode": plan.mode,
        "mcpPort": mcp_port,
        **({"resource": resource_uri} if resource_uri is not None else {}),
        **({"imagePullSecrets": added_pull_secrets} if added_pull_secrets else {}),
        **({"appStopDelaySeconds": stop_delay} if stop_delay else {}),
        "spiffeId": f"spiffe://{config.trust_domain}/ns/{namespace}/sa/{sa}",
    }
    annotations = {**old_annotations, ann.STATUS: _sorted_json(status)}
    if ann.DEFAULT_CONTAINER not in annotations:
        # The MCP server the pod exists for (a native sidecar's name too), else the first app container.
        annotations[ann.DEFAULT_CONTAINER] = server or containers[app_index]["name"]
    metadata["annotations"] = annotations

    # The patch: top-level keys in the injected pod's order (`metadata` last when the pod had none).
    ops: JsonPatch = []
    for key in pod:
        if key == "metadata":
            if key not in original:
                ops.append({"op": "add", "path": "/metadata", "value": metadata})
            elif type(old_metadata) is not dict:
                diff_into(old_metadata, metadata, "/metadata", ops)
            elif "annotations" in old_metadata:
                # a copy of the old metadata with only its annotations replaced: what `diff` finds there
                diff_into(old_metadata["annotations"], annotations, "/metadata/annotations", ops)
            else:
                ops.append({"op": "add", "path": "/metadata/annotations", "value": annotations})
        elif key == "spec":
            for spec_key, value in spec.items():
                if spec_key == "containers":
                    # same entries in place (changed ones copied), then the classic sidecar appended
                    for i, item in enumerate(spec_containers):
                        if containers[i] is not item:
                            diff_into(item, containers[i], f"/spec/containers/{i}", ops)
                    _add_each("/spec/containers/-", containers[len(spec_containers) :], ops)
                    continue
                if spec_key not in spec_ops:
                    continue
                path = "/spec/" + escape(spec_key)
                if spec_key not in old_spec:
                    ops.append({"op": "add", "path": path, "value": value})
                elif spec_ops[spec_key]:
                    ops.extend(spec_ops[spec_key])
                elif _named(old_spec[spec_key]):
                    # the old entries kept in front, ours appended
                    _add_each(path + "/-", value[len(old_spec[spec_key]) :], ops)
                else:
                    diff_into(old_spec[spec_key], value, path, ops)
    return pod, ops
