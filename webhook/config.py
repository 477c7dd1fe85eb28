"""The webhook's configuration: what the operator sets, parsed once into a frozen `WebhookConfig`.

`parse_config` validates a plain mapping (YAML file or ConfigMap), `ConfigHolder` lets the
in-cluster code swap it at run time, `WebhookConfig.hash` goes into every pod's status annotation.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from outrider.sidecar.config_merge import deep_merge
from outrider.webhook import __version__, resource


class ConfigError(ValueError):
    """A webhook config value is wrong; the message names the key, the value and what is allowed."""


PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A plain, JSON-ready copy of a frozen mapping (for the pod spec and OUTRIDER_CONFIG)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value


DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = _frozen(
    {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}
)


@dataclass(frozen=True)
class SidecarMount:
    """One Secret or ConfigMap volume mounted read-only into outrider-proxy (never the app)."""

    name: str  # the volume name wanted (a free name is picked when the pod already uses it)
    source: str  # "secret" | "configMap"
    source_name: str  # the Secret's / ConfigMap's name, in the pod's own namespace
    mount_path: str
    items: tuple[tuple[str, str], ...] = ()  # (key, relative path); empty: every key as a file

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, self.source: self.source_name, "mountPath": self.mount_path}
        if self.items:
            out["items"] = [{"key": k, "path": p} for k, p in self.items]
        return out

    def volume(self, name: str) -> dict[str, Any]:
        """The pod volume for this mount under the (free) volume `name`."""
        ref = {"secretName": self.source_name} if self.source == "secret" else {"name": self.source_name}
        if self.items:
            ref["items"] = [{"key": k, "path": p} for k, p in self.items]  # type: ignore[assignment]
        return {"name": name, self.source: ref}


@dataclass(frozen=True)
class WebhookConfig:
    # The outrider image; it holds both `outrider sidecar` and `outrider iptables`.
    sidecar_image: str = f"ghcr.io/outrider-dev/outrider:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    # requests/limits of outrider-proxy (outrider-init gets the same: it runs before the app).
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: DEFAULT_RESOURCES)
    # True: outrider-proxy is an initContainer with restartPolicy Always (Kubernetes >= 1.29), so
    # Jobs complete and the proxy is ready before the app starts. False: the classic layout.
    native_sidecar: bool = True
    # preStop sleep added to the MCP server's container (unless it has a preStop of its own): its
    # SIGTERM waits this long, so kube-proxy removes the pod from the Service before it stops
    # listening; capped at the pod's terminationGracePeriodSeconds - 2; 0 adds none (Kubernetes 1.30+).
    app_stop_delay_seconds: int = 5
    # SPIFFE trust domain; the pod's expected SPIFFE ID is recorded in the status annotation.
    trust_domain: str = "cluster.local"
    # CSI driver that exposes the SPIFFE Workload API socket (spiffe-csi-driver).
    spiffe_csi_driver: str = "csi.spiffe.io"
    # Audiences an app team may pick with outrider.dev/token-audience; default when none is given.
    token_audiences: tuple[str, ...] = ()
    default_audience: str | None = None
    # The cluster's default egress policy; opaque here, interpreted by webhook.egress.plan_egress.
    egress_default_policy: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # Opaque sidecar config, deep-merged under the per-pod values into OUTRIDER_CONFIG. Secret
    # values are refused here (they would sit in plain text in the pod spec): use a `*_file` path.
    sidecar: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # Secrets/ConfigMaps (in the pod's namespace) mounted read-only into outrider-proxy only,
    # for the sidecar's `*_file` settings (exchange.client_secret_file, telemetry.hash_salt_file, ...).
    sidecar_mounts: tuple[SidecarMount, ...] = ()
    # OpenTelemetry variables for outrider-proxy (where its spans and metrics go), as (name, value)
    # pairs; only OTEL_* names, never the header variables (they carry exporter credentials).
    sidecar_env: tuple[tuple[str, str], ...] = ()
    # Image pull secrets (names of Secrets in the pod's namespace) added to injected pods, for a
    # sidecar image in a private registry; the pod's own entries are kept.
    image_pull_secrets: tuple[str, ...] = ()
    # Every MCP server is its own protected resource: the URI (token audience, RFC 9728 `resource`)
    # of each pod, from the pod's facts ({namespace}, {service_account}, {app}, {label:KEY},
    # {base_url}); `resource_patterns` are what `outrider.dev/resource` may pick ('*': one DNS label).
    resource_template: str | None = None
    resource_base_url: str | None = None
    resource_patterns: tuple[str, ...] = ()
    # The operators' Cedar policies and rate limits for MCP calls: `default` (cluster) and
    # `namespaces` (each replaces the default in its namespace). Empty: no policy (allow all callers).
    mcp_policy: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    # Derived values are computed once per config (the engine reads them on every admission).
    @cached_property
    def hash(self) -> str:
        """A short, stable digest of everything that shapes an injected pod."""
        return config_hash(self)

    @cached_property
    def plain_sidecar(self) -> dict[str, Any]:
        return thaw(self.sidecar)  # type: ignore[no-any-return]

    @cached_property
    def plain_egress_default_policy(self) -> dict[str, Any]:
        return thaw(self.egress_default_policy)  # type: ignore[no-any-return]

    @cached_property
    def plain_mcp_policy(self) -> dict[str, Any]:
        return thaw(self.mcp_policy)  # type: ignore[no-any-return]

    @cached_property
    def plain_resources(self) -> dict[str, Any]:
        return thaw(self.resources)  # type: ignore[no-any-return]

    def to_mapping(self) -> dict[str, Any]:
        out = {f.name: thaw(getattr(self, f.name)) for f in fields(self)}
        out["sidecar_mounts"] = [m.to_mapping() for m in self.sidecar_mounts]
        out["sidecar_env"] = dict(self.sidecar_env)
        # Keys added later are left out while unset, so configs without them keep their hash.
        for key in ("sidecar_mounts", *_LATER_KEYS):
            if not out[key]:
                del out[key]
        return out


_LATER_KEYS = (
    "sidecar_env",
    "mcp_policy",
    "image_pull_secrets",
    "resource_template",
    "resource_base_url",
    "resource_patterns",
)


def config_hash(config: WebhookConfig) -> str:
    canonical = json.dumps(config.to_mapping(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


KEYS = tuple(f.name for f in fields(WebhookConfig))


def _str(data: Mapping[str, Any], key: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: {value!r} must be a non-empty string")
    return value.strip()


def _resources(value: Any) -> Mapping[str, Mapping[str, str]]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"resources: {value!r} must be a mapping with 'requests' and/or 'limits'")
    unknown = sorted(set(value) - {"requests", "limits"})
    if unknown:
        raise ConfigError(f"resources: unknown key(s) {unknown}; allowed: ['requests', 'limits']")
    out: dict[str, dict[str, str]] = {}
    for part in ("requests", "limits"):
        section = value.get(part) or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"resources.{part}: must be a mapping of cpu/memory quantities")
        for name, qty in section.items():
            if name not in _RESOURCE_NAMES:
                raise ConfigError(
                    f"resources.{part}.{name}: unknown resource; allowed: {list(_RESOURCE_NAMES)}"
                )
            if not _QUANTITY.match(str(qty)):
                raise ConfigError(
                    f"resources.{part}.{name}: {qty!r} is not a Kubernetes quantity (e.g. 100m, 128Mi)"
                )
            out.setdefault(part, {})[str(name)] = str(qty)
    return _frozen(out)  # type: ignore[no-any-return]


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ITEM_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
MOUNT_SOURCES = ("secret", "configMap")
# Where outrider-proxy already mounts something: the SPIFFE socket and the policy ConfigMaps.
RESERVED_MOUNT_PATHS = ("/spiffe-workload-api", "/etc/outrider/egress", "/etc/outrider/policy")


def _nested(a: str, b: str) -> bool:
    """Whether one absolute, normalised path is the other or lies inside it."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _sidecar_mounts(value: Any) -> tuple[SidecarMount, ...]:
    """Validate `sidecar_mounts` (the only place mounts are checked; the engine trusts the result)."""
    if not isinstance(value, list | tuple):
        raise ConfigError("sidecar_mounts: must be a list of {name, secret|configMap, mountPath, items?}")
    mounts: list[SidecarMount] = []
    for i, raw in enumerate(value):
        where = f"sidecar_mounts[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: must be a mapping with name, secret or configMap, and mountPath")
        unknown = sorted(str(k) for k in set(raw) - {"name", "secret", "configMap", "mountPath", "items"})
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {unknown}; allowed: ['name', 'secret', 'configMap', 'mountPath', "
                "'items'] (only Secret and ConfigMap volumes can be mounted)"
            )
        name = raw.get("name")
        if not isinstance(name, str) or len(name) > 63 or not _DNS_LABEL.match(name):
            raise ConfigError(
                f"{where}.name: {name!r} is not a volume name (a DNS-1123 label: lowercase letters, "
                "digits and '-', at most 63 characters)"
            )
        sources = [s for s in MOUNT_SOURCES if s in raw]
        if len(sources) != 1:
            raise ConfigError(f"{where}: set exactly one of 'secret' or 'configMap' (the object's name)")
        source = sources[0]
        source_name = raw[source]
        if (
            not isinstance(source_name, str)
            or len(source_name) > 253
            or not _DNS_SUBDOMAIN.match(source_name)
        ):
            raise ConfigError(
                f"{where}.{source}: {source_name!r} is not a {source} name (a DNS-1123 subdomain: "
                "lowercase letters, digits, '-' and '.')"
            )
        path = raw.get("mountPath")
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or path.startswith("//")
            or ":" in path
            or posixpath.normpath(path) != (path.rstrip("/") or "/")
        ):
            raise ConfigError(
                f"{where}.mountPath: {path!r} must be an absolute, normalised path (no '..', '//' or ':'), "
                "e.g. /var/run/secrets/outrider/idp"
            )
        path = posixpath.normpath(path)
        if path == "/":
            raise ConfigError(f"{where}.mountPath: '/' would hide the sidecar's own filesystem")
        for reserved in RESERVED_MOUNT_PATHS:
            if _nested(path, reserved):
                raise ConfigError(
                    f"{where}.mountPath: {path!r} clashes with {reserved}, where outrider-proxy mounts "
                    f"its own volume; pick a path outside it (reserved: {list(RESERVED_MOUNT_PATHS)})"
                )
        for other in mounts:
            if other.name == name:
                raise ConfigError(f"{where}.name: {name!r} is used by another sidecar_mounts entry")
            if _nested(path, other.mount_path):
                raise ConfigError(
                    f"{where}.mountPath: {path!r} clashes with {other.mount_path!r} of sidecar_mounts "
                    f"entry {other.name!r}; mount paths must not nest"
                )
        items_raw = raw.get("items", [])
        if not isinstance(items_raw, list | tuple):
            raise ConfigError(f"{where}.items: must be a list of {{key, path}}")
        items: list[tuple[str, str]] = []
        for j, item in enumerate(items_raw):
            key = item.get("key") if isinstance(item, Mapping) else None
            rel = item.get("path") if isinstance(item, Mapping) else None
            if not isinstance(item, Mapping) or set(item) - {"key", "path"}:
                raise ConfigError(f"{where}.items[{j}]: must be a mapping with 'key' and 'path' only")
            if not isinstance(key, str) or not _ITEM_KEY.match(key) or len(key) > 253:
                raise ConfigError(f"{where}.items[{j}].key: {key!r} is not a Secret/ConfigMap key")
            if (
                not isinstance(rel, str)
                or not rel
                or rel.startswith("/")
                or ".." in rel.split("/")
                or posixpath.normpath(rel) != rel
            ):
                raise ConfigError(
                    f"{where}.items[{j}].path: {rel!r} must be a relative path inside the mount (no '..')"
                )
            items.append((key, rel))
        mounts.append(SidecarMount(name, source, source_name, path, tuple(items)))
    return tuple(mounts)


_OTEL_NAME = re.compile(r"^OTEL_[A-Z0-9_]+$")


def _sidecar_env(value: Any) -> tuple[tuple[str, str], ...]:
    """Validate `sidecar_env`: OTEL_* variables for outrider-proxy, plain values only."""
    if not isinstance(value, Mapping):
        raise ConfigError("sidecar_env: must be a mapping of OTEL_* variable names to values")
    out: list[tuple[str, str]] = []
    for name, raw in value.items():
        if not isinstance(name, str) or not _OTEL_NAME.match(name):
            raise ConfigError(
                f"sidecar_env.{name}: only OpenTelemetry variables (OTEL_*, upper case) can be set "
                "for outrider-proxy"
            )
        if "HEADERS" in name:
            # Never echo the value: exporter headers carry credentials.
            raise ConfigError(
                f"sidecar_env.{name}: exporter headers carry credentials and would be plain text in "
                "the pod spec; export to a collector in the cluster that adds them instead"
            )
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            raise ConfigError(f"sidecar_env.{name}: {raw!r} must be a string")
        out.append((name, str(raw)))
    return tuple(sorted(out))


# Sidecar keys holding secret values: refused inline (they would be plain text in the pod spec).
_SECRET_WORDS = ("secret", "password", "passwd", "salt", "private_key", "privatekey")
# Keys that name a secret but hold no secret value: file paths and method/mode choices.
_NOT_SECRET_SUFFIXES = ("_file", "_path", "_method", "_mode")


def _inline_secrets(value: Any, path: str) -> list[str]:
    found: list[str] = []
    if isinstance(value, Mapping):
        for key, child in value.items():
            where = f"{path}.{key}"
            norm = str(key).lower().replace("-", "_")
            secretish = any(w in norm for w in _SECRET_WORDS) and not norm.endswith(_NOT_SECRET_SUFFIXES)
            if (
                secretish
                and not isinstance(child, bool)
                and isinstance(child, str | int | float)
                and str(child)
            ):
                found.append(where)
            else:
                found += _inline_secrets(child, where)
    elif isinstance(value, list | tuple):
        for i, child in enumerate(value):
            found += _inline_secrets(child, f"{path}[{i}]")
    return found


def parse_config(data: Mapping[str, Any] | None) -> WebhookConfig:
    """Validate a plain mapping into a `WebhookConfig`; unknown keys are errors (typos bite late)."""
    data = data or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"webhook config must be a mapping of {list(KEYS)}")
    unknown = sorted(str(k) for k in set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown webhook config key(s) {unknown}; allowed: {list(KEYS)}")
    defaults = WebhookConfig()
    pull = data.get("image_pull_policy", defaults.image_pull_policy)
    if pull not in PULL_POLICIES:
        raise ConfigError(f"image_pull_policy: {pull!r} is not valid; allowed: {list(PULL_POLICIES)}")
    native = data.get("native_sidecar", defaults.native_sidecar)
    if not isinstance(native, bool):
        raise ConfigError(f"native_sidecar: {native!r} must be true or false")
    stop_delay = data.get("app_stop_delay_seconds", defaults.app_stop_delay_seconds)
    if isinstance(stop_delay, bool) or not isinstance(stop_delay, int) or not 0 <= stop_delay <= 300:
        raise ConfigError(f"app_stop_delay_seconds: {stop_delay!r} must be a whole number of seconds (0-300)")
    audiences_raw = data.get("token_audiences", [])
    if not isinstance(audiences_raw, list | tuple) or not all(
        isinstance(a, str) and a.strip() for a in audiences_raw
    ):
        raise ConfigError(f"token_audiences: {audiences_raw!r} must be a list of non-empty strings")
    audiences = tuple(a.strip() for a in audiences_raw)
    default_audience = data.get("default_audience")
    if default_audience is not None:
        if not isinstance(default_audience, str) or not default_audience.strip():
            raise ConfigError(f"default_audience: {default_audience!r} must be a non-empty string")
        default_audience = default_audience.strip()
        if audiences and default_audience not in audiences:
            raise ConfigError(
                f"default_audience: {default_audience!r} is not in token_audiences {list(audiences)}"
            )
        if not audiences:
            audiences = (default_audience,)
    for key in ("egress_default_policy", "sidecar"):
        if not isinstance(data.get(key, {}), Mapping):
            raise ConfigError(f"{key}: must be a mapping")
    secrets = _inline_secrets(data.get("sidecar", {}), "sidecar")
    if secrets:
        # Never echo the value: it is a secret.
        raise ConfigError(
            f"{', '.join(secrets)}: secret values cannot be set inline (OUTRIDER_CONFIG is plain text "
            "in the pod spec, readable by anyone who can get pods); put the secret in a Secret, mount it "
            "with sidecar_mounts and point the matching *_file setting at it (e.g. "
            "exchange.client_secret_file, telemetry.hash_salt_file)"
        )
    trust_domain = _str(data, "trust_domain", defaults.trust_domain)
    if not re.fullmatch(r"[a-z0-9._-]+", trust_domain):
        raise ConfigError(
            f"trust_domain: {trust_domain!r} is not a SPIFFE trust domain (lowercase letters, digits, . _ -)"
        )
    from outrider.webhook.mcp_policy import McpPolicyError, validate

    try:
        mcp_policy = validate(data.get("mcp_policy"))
    except McpPolicyError as exc:
        raise ConfigError(str(exc)) from None
    base_url, template, patterns = _resource_settings(data)
    config = WebhookConfig(
        image_pull_secrets=_pull_secrets(data.get("image_pull_secrets", [])),
        resource_template=template,
        resource_base_url=base_url,
        resource_patterns=patterns,
        sidecar_image=_str(data, "sidecar_image", defaults.sidecar_image),
        image_pull_policy=str(pull),
        resources=_resources(data["resources"]) if "resources" in data else DEFAULT_RESOURCES,
        native_sidecar=native,
        app_stop_delay_seconds=stop_delay,
        trust_domain=trust_domain,
        spiffe_csi_driver=_str(data, "spiffe_csi_driver", defaults.spiffe_csi_driver),
        token_audiences=audiences,
        default_audience=default_audience,
        egress_default_policy=_frozen(data.get("egress_default_policy", {})),
        sidecar=_frozen(data.get("sidecar", {})),
        sidecar_mounts=_sidecar_mounts(data.get("sidecar_mounts", [])),
        sidecar_env=_sidecar_env(data.get("sidecar_env", {})),
        mcp_policy=_frozen(mcp_policy),
    )
    try:
        _ = config.hash  # once here, not on the first admission: it also proves every value is JSON
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"webhook config holds a value JSON cannot carry ({exc}); quote YAML dates and timestamps"
        ) from None
    _check_sidecar_block(config)
    return config


def _pull_secrets(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(n, str) and len(n) <= 253 and _DNS_SUBDOMAIN.match(n) for n in value
    ):
        raise ConfigError(
            f"image_pull_secrets: {value!r} must be a list of Secret names (DNS-1123 subdomains) in the "
            "pods' namespaces, for example [outrider-registry]"
        )
    if len(set(value)) != len(value):
        raise ConfigError(f"image_pull_secrets: {list(value)!r} names a Secret twice")
    return tuple(value)


def _resource_settings(data: Mapping[str, Any]) -> tuple[str | None, str | None, tuple[str, ...]]:
    """Validate resource_base_url, resource_template and resource_patterns (load time, not per pod)."""
    base_url = data.get("resource_base_url")
    if base_url is not None:
        if not isinstance(base_url, str):
            raise ConfigError(f"resource_base_url: {base_url!r} must be a URL string")
        try:
            base_url = resource.check_base_url(base_url.strip())
        except resource.ResourceError as exc:
            raise ConfigError(str(exc)) from None
    template = data.get("resource_template")
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise ConfigError(f"resource_template: {template!r} must be a URL template string")
    patterns = data.get("resource_patterns", [])
    if isinstance(patterns, str) or not isinstance(patterns, list | tuple):
        raise ConfigError(f"resource_patterns: {patterns!r} must be a list of URL patterns")
    try:
        if template is not None:
            template = template.strip()
            resource.check_template(template, "resource_template", base_url=base_url, wildcards=False)
        for i, pattern in enumerate(patterns):
            if not isinstance(pattern, str) or not pattern.strip():
                raise ConfigError(f"resource_patterns[{i}]: {pattern!r} must be a URL pattern string")
            resource.check_template(pattern, f"resource_patterns[{i}]", base_url=base_url, wildcards=True)
    except resource.ResourceError as exc:
        raise ConfigError(str(exc)) from None
    sidecar = data.get("sidecar") or {}
    inbound = sidecar.get("inbound") if isinstance(sidecar, Mapping) else None
    if (template or patterns) and isinstance(inbound, Mapping) and inbound.get("resource"):
        raise ConfigError(
            "sidecar.inbound.resource: set per server by resource_template/resource_patterns; one "
            "cluster-wide value would make every MCP server accept the others' tokens; remove it"
        )
    return base_url, template, tuple(p.strip() for p in patterns)


# Ports the injected pod spec, its probes and the iptables rules are built around (design.md).
FIXED_SIDECAR_PORTS = (("admin", "port", 15020), ("inbound", "port", 15006), ("egress", "port", 15001))


def _check_sidecar_block(config: WebhookConfig) -> None:
    """Refuse what the sidecar would refuse, so a typo never crash-loops every new MCP pod.

    The `sidecar:` block is parsed by the sidecar's own parser, merged under the per-pod values a
    typical pod gets (every pod's merged config is checked again at admission).
    """
    from outrider.sidecar import config as sidecar_config  # the sidecar's parser; imported on first load

    raw = config.plain_sidecar
    for section, key, port in FIXED_SIDECAR_PORTS:
        part = raw.get(section)
        if isinstance(part, Mapping) and key in part and part[key] != port:
            raise ConfigError(
                f"sidecar.{section}.{key}: {part[key]!r} cannot be changed: the injected container ports, "
                f"probes and iptables rules use {port}; remove the key"
            )
    egress = raw.get("egress")
    for key, where in (
        ("mode", "the namespace label outrider.dev/egress-mode"),
        ("policy", "egress_default_policy"),
    ):
        if isinstance(egress, Mapping) and key in egress:
            raise ConfigError(
                f"sidecar.egress.{key}: set per pod by the webhook (from {where}); this value would be "
                "replaced in every pod, remove it"
            )
    per_pod: dict[str, Any] = {"egress": {"mode": "capture", "policy": {}}, "inbound": {"mcp_port": 8080}}
    if config.resource_template:
        per_pod["inbound"]["resource"] = resource.sample(config.resource_template, config.resource_base_url)
    if config.default_audience:
        per_pod["exchange"] = {"audience": config.default_audience}
    try:
        sidecar_config.validate(deep_merge(raw, per_pod))
    except sidecar_config.ConfigError as exc:
        raise ConfigError(f"sidecar: {exc} (every injected sidecar would stop with this error)") from None


def load_config_file(path: str | Path) -> WebhookConfig:
    """Read a YAML/JSON file into a `WebhookConfig`; every failure is a one-line `ConfigError`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read webhook config {path}: {exc.strerror}") from None
    return parse_config_text(text, path)


def parse_config_text(text: str, path: str | Path) -> WebhookConfig:
    """The config file's text (already read) into a `WebhookConfig`; `path` only names it in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        from outrider.sidecar.config import yaml_problem

        raise ConfigError(f"webhook config {path} is not valid YAML: {yaml_problem(exc)}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"webhook config {path} must hold a mapping of {list(KEYS)}")
    return parse_config(data)


class ConfigHolder:
    """The current config, swapped whole by the in-cluster ConfigMap watch (readers never lock)."""

    def __init__(self, config: WebhookConfig | None = None) -> None:
        self._config = config or WebhookConfig()

    @property
    def current(self) -> WebhookConfig:
        return self._config

    def replace(self, config: WebhookConfig) -> None:
        self._config = config
