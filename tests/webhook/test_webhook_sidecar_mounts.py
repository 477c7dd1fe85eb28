"""`sidecar_mounts` (Secrets/ConfigMaps for outrider-proxy only) and the refusal of inline secrets."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outrider.webhook import egress, engine
from outrider.webhook.config import RESERVED_MOUNT_PATHS, ConfigError, WebhookConfig, parse_config

MOUNT = {"name": "idp", "secret": "outrider-idp-client", "mountPath": "/var/run/secrets/outrider/idp"}
LABELS = {"outrider.dev/inject": "enabled"}


def _pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "tools"},
        "spec": {
            "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 8080}]}],
            **spec,
        },
    }


def test_reserved_paths_are_the_engines_own_mounts() -> None:
    assert engine.SPIFFE_MOUNT_PATH in RESERVED_MOUNT_PATHS
    assert posixpath.dirname(egress.POLICY_FILE) in RESERVED_MOUNT_PATHS


def test_default_is_no_mounts_and_the_hash_of_old_configs_is_unchanged() -> None:
    assert WebhookConfig().sidecar_mounts == ()
    assert "sidecar_mounts" not in WebhookConfig().to_mapping()
    with_mount = parse_config({"sidecar_mounts": [MOUNT]})
    assert with_mount.hash != WebhookConfig().hash
    assert with_mount.to_mapping()["sidecar_mounts"] == [MOUNT]


def test_secret_and_configmap_with_items_parse() -> None:
    cfg = parse_config(
        {
            "sidecar_mounts": [
                {**MOUNT, "items": [{"key": "client-secret", "path": "client-secret"}]},
                {"name": "ca", "configMap": "idp-ca", "mountPath": "/etc/outrider/idp-ca/"},
            ]
        }
    )
    first, second = cfg.sidecar_mounts
    assert first.volume("v") == {
        "name": "v",
        "secret": {
            "secretName": "outrider-idp-client",
            "items": [{"key": "client-secret", "path": "client-secret"}],
        },
    }
    assert second.volume("ca") == {"name": "ca", "configMap": {"name": "idp-ca"}}
    assert second.mount_path == "/etc/outrider/idp-ca"


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        (
            {**MOUNT, "mountPath": "var/run/x"},
            r"sidecar_mounts\[0\]\.mountPath: 'var/run/x' must be an absolute",
        ),
        ({**MOUNT, "mountPath": "/var/../etc"}, r"mountPath: .* absolute, normalised"),
        ({**MOUNT, "mountPath": "/"}, r"mountPath: '/' would hide"),
        ({**MOUNT, "mountPath": "/spiffe-workload-api"}, r"clashes with /spiffe-workload-api"),
        ({**MOUNT, "mountPath": "/spiffe-workload-api/x"}, r"clashes with /spiffe-workload-api"),
        ({**MOUNT, "mountPath": "/etc/outrider"}, r"clashes with /etc/outrider/egress"),
        ({**MOUNT, "name": "Bad_Name"}, r"sidecar_mounts\[0\]\.name: 'Bad_Name' is not a volume name"),
        ({**MOUNT, "name": "a" * 64}, r"\.name: .* at most 63"),
        ({**MOUNT, "secret": "Not Valid"}, r"\.secret: 'Not Valid' is not a secret name"),
        ({"name": "x", "mountPath": "/x"}, r"exactly one of 'secret' or 'configMap'"),
        ({**MOUNT, "configMap": "c"}, r"exactly one of 'secret' or 'configMap'"),
        ({**MOUNT, "hostPath": "/etc"}, r"unknown key\(s\) \['hostPath'\].*only Secret and ConfigMap"),
        (
            {**MOUNT, "items": [{"key": "k", "path": "../k"}]},
            r"items\[0\]\.path: '\.\./k' must be a relative",
        ),
        ({**MOUNT, "items": [{"key": "k", "path": "/k"}]}, r"items\[0\]\.path"),
        ({**MOUNT, "items": [{"key": "k k", "path": "k"}]}, r"items\[0\]\.key"),
        ({**MOUNT, "items": "k"}, r"items: must be a list"),
        ("idp", r"sidecar_mounts\[0\]: must be a mapping"),
    ],
)
def test_bad_mounts_are_refused_with_the_key_named(entry: Any, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config({"sidecar_mounts": [entry]})


def test_mounts_must_be_a_list_and_not_clash_with_each_other() -> None:
    with pytest.raises(ConfigError, match="sidecar_mounts: must be a list"):
        parse_config({"sidecar_mounts": MOUNT})
    with pytest.raises(ConfigError, match=r"sidecar_mounts\[1\]\.name: 'idp' is used by another"):
        parse_config({"sidecar_mounts": [MOUNT, {**MOUNT, "mountPath": "/other"}]})
    with pytest.raises(ConfigError, match=r"sidecar_mounts\[1\]\.mountPath: .* must not nest"):
        parse_config(
            {"sidecar_mounts": [MOUNT, {**MOUNT, "name": "b", "mountPath": MOUNT["mountPath"] + "/x"}]}
        )


@pytest.mark.parametrize(
    "sidecar",
    [
        {"telemetry": {"hash_salt": "pepper-123"}},
        {"exchange": {"client_secret": "s3cr3t-value"}},
        {"exchange": {"extra": {"db_password": "hunter2"}}},
        {"custom": [{"Private-Key": "-----BEGIN"}]},
        {"telemetry": {"hash_salt": 12345}},
    ],
)
def test_inline_secrets_are_refused_without_echoing_them(sidecar: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"sidecar": sidecar})
    message = str(caught.value)
    assert "sidecar_mounts" in message and "_file" in message
    for secret in ("pepper-123", "s3cr3t-value", "hunter2", "BEGIN", "12345"):
        assert secret not in message


def test_secret_file_paths_and_choices_are_fine() -> None:
    cfg = parse_config(
        {
            "sidecar": {
                "exchange": {
                    "auth": "client-secret",
                    "client_secret_file": "/var/run/secrets/outrider/idp/client-secret",
                    "client_secret_method": "post",
                },
                "telemetry": {
                    "hash_user": True,
                    "hash_salt": "",
                    "hash_salt_file": "/s/salt",
                    "redact_keys": ["password", "client_secret"],
                },
            },
            "sidecar_mounts": [MOUNT],
        }
    )
    assert cfg.sidecar["exchange"]["client_secret_file"].endswith("client-secret")


def _everything(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("egress_mode", ["capture", "explicit"])
def test_mounts_go_to_the_proxy_only(native: bool, egress_mode: str) -> None:
    cfg = parse_config(
        {
            "native_sidecar": native,
            "egress_default_policy": {"mode": egress_mode, "allow": ["api.github.com:443"]},
            "sidecar_mounts": [MOUNT, {"name": "ca", "configMap": "idp-ca", "mountPath": "/etc/idp-ca"}],
        }
    )
    app_mount = {"name": "idp", "mountPath": "/data"}
    pod = _pod(volumes=[{"name": "idp", "emptyDir": {}}])
    pod["spec"]["containers"][0]["volumeMounts"] = [app_mount]
    result = engine.inject(pod, LABELS, cfg)
    assert result.injected, result.message
    status = json.loads(result.pod["metadata"]["annotations"]["outrider.dev/status"])
    volumes = {v["name"]: v for v in result.pod["spec"]["volumes"]}
    assert volumes["idp"] == {"name": "idp", "emptyDir": {}}  # the app's own volume is untouched
    assert volumes["idp-1"]["secret"] == {"secretName": "outrider-idp-client"}
    assert volumes["ca"]["configMap"] == {"name": "idp-ca"}
    assert {"idp-1", "ca"} <= set(status["volumes"])
    proxy_name = (status["initContainers"] + status["containers"])[-1]
    for name, container in _everything(result.pod).items():
        mounts = {m["name"]: m for m in container.get("volumeMounts") or []}
        if name == proxy_name:
            assert mounts["idp-1"] == {"name": "idp-1", "mountPath": MOUNT["mountPath"], "readOnly": True}
            assert mounts["ca"] == {"name": "ca", "mountPath": "/etc/idp-ca", "readOnly": True}
        else:
            assert "idp-1" not in mounts and "ca" not in mounts
    assert result.pod["spec"]["containers"][0]["volumeMounts"] == [app_mount]
    # injected once: the marker makes a second pass a no-op
    assert engine.inject(result.pod, LABELS, cfg).patch == []


def test_strict_refuses_a_debug_container_mounting_the_sidecars_secret() -> None:
    from outrider.webhook import strict

    cfg = parse_config({"sidecar_mounts": [MOUNT]})
    pod = _pod(securityContext={"runAsUser": 1000, "runAsNonRoot": True})
    pod["spec"]["containers"][0]["securityContext"] = {"allowPrivilegeEscalation": False}
    result = engine.inject(pod, {"outrider.dev/inject": "strict"}, cfg)
    assert result.injected, result.message
    injected = result.pod
    debug = {
        "name": "debug",
        "image": "busybox",
        "securityContext": {"allowPrivilegeEscalation": False},
        "volumeMounts": [{"name": "idp", "mountPath": "/steal"}],
    }
    updated = {**injected, "spec": {**injected["spec"], "ephemeralContainers": [debug]}}
    problems = strict.ephemeral_problems(injected, updated)
    assert problems == [
        "spec.ephemeralContainers[0] (debug).volumeMounts[0] mounts idp, a volume only outrider-proxy may "
        "mount (its Secrets or egress policy); remove the mount"
    ]


_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=12)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
)
_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["idp", "salt", "outrider-spiffe", "Bad", ""]) | _SCALARS,
        "secret": st.sampled_from(["s", "a.b", "Nope"]) | _SCALARS,
        "configMap": st.sampled_from(["c"]) | _SCALARS,
        "mountPath": st.sampled_from(["/a", "/a/b", "/etc/outrider", "/", "x", "/a/../b"]) | _SCALARS,
        "items": st.lists(
            st.fixed_dictionaries({"key": st.text(max_size=5), "path": st.text(max_size=5)}), max_size=2
        )
        | _VALUES,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ENTRY, max_size=3) | _VALUES)
def test_any_sidecar_mounts_value_is_a_config_error_or_injects_cleanly(value: Any) -> None:
    try:
        cfg = parse_config({"sidecar_mounts": value})
    except ConfigError:
        return
    result = engine.inject(_pod(volumes=[{"name": "idp", "emptyDir": {}}]), LABELS, cfg)
    assert result.injected
    names = [v["name"] for v in result.pod["spec"]["volumes"]]
    assert len(names) == len(set(names))
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", **result.pod}, "1.34", strict=True)


# --- sidecar_env: where outrider-proxy exports its spans and metrics -----------------------------


def _proxy_env(cfg: WebhookConfig) -> dict[str, Any]:
    result = engine.inject(_pod(), LABELS, cfg)
    assert result.allowed and engine.inject(result.pod, LABELS, cfg).patch == []  # still idempotent
    spec = result.pod["spec"]
    (proxy,) = [
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "outrider-proxy"
    ]
    return {e["name"]: e.get("value") for e in proxy["env"]}


def test_sidecar_env_sets_otel_variables_on_the_proxy_only() -> None:
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.observability:4318",
        "OTEL_METRIC_EXPORT_INTERVAL": 5000,
    }
    cfg = parse_config({"sidecar_env": otel})
    assert cfg.sidecar_env == (
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.observability:4318"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "5000"),
    )
    env = _proxy_env(cfg)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector.observability:4318"
    assert env["OTEL_METRIC_EXPORT_INTERVAL"] == "5000"
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in _proxy_env(WebhookConfig())
    assert cfg.hash != WebhookConfig().hash
    assert "sidecar_env" not in WebhookConfig().to_mapping()  # old configs keep their hash


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PATH": "/tmp"}, "only OpenTelemetry variables"),
        ({"otel_service_name": "x"}, "only OpenTelemetry variables"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cr3t"}, "carry credentials"),
        ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x=s3cr3t"}, "carry credentials"),
        ({"OTEL_SERVICE_NAME": ["a"]}, "must be a string"),
        ({"OTEL_SDK_DISABLED": True}, "must be a string"),
        (["OTEL_SERVICE_NAME"], "must be a mapping"),
    ],
)
def test_sidecar_env_refuses_other_names_credentials_and_odd_types(env: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        parse_config({"sidecar_env": env})
    assert "s3cr3t" not in str(refused.value)
