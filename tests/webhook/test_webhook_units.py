"""Unit tests for the pure parts: annotations, config, JSON Patch building and engine edge cases."""

from __future__ import annotations

import copy
import json
from collections.abc import Hashable, Mapping
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrider.webhook import annotations as ann
from outrider.webhook import engine
from outrider.webhook.config import ConfigError, ConfigHolder, WebhookConfig, parse_config
from outrider.webhook.egress import EgressPlan
from outrider.webhook.patch import diff, escape, pointer

ENABLED = {"outrider.dev/inject": "enabled"}


def _pod(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 8080}]}]}
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"}, "spec": base}


# --- annotations -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "70000", "http_port", "-1", "UPPER", "a" * 16, "15006"])
def test_bad_mcp_port_names_the_annotation_and_allowed_values(value: str) -> None:
    with pytest.raises(ann.AnnotationError) as err:
        ann.parse_mcp_port(value)
    assert "outrider.dev/mcp-port" in str(err.value)
    assert value in str(err.value)


@pytest.mark.parametrize(
    ("value", "expected"), [("8080", 8080), (" 3000 ", 3000), ("mcp", "mcp"), ("mcp-http", "mcp-http")]
)
def test_good_mcp_port(value: str, expected: int | str) -> None:
    assert ann.parse_mcp_port(value) == expected


@pytest.mark.parametrize("value", ["0", "65536"])
def test_mcp_port_range_edges_are_refused(value: str) -> None:
    with pytest.raises(ann.AnnotationError, match="is out of range"):
        ann.parse_mcp_port(value)


@pytest.mark.parametrize("value", ["1", "65535", 1, 65535])
def test_mcp_port_range_edges_are_accepted(value: str | int) -> None:
    assert ann.parse_mcp_port(value) == int(value)


@pytest.mark.parametrize("value", ["disabled", "", "Enabled", "true", "strict ", "yes"])
def test_unknown_namespace_label_value_is_not_an_opt_in(value: str) -> None:
    labels = {"outrider.dev/inject": value}
    assert ann.namespace_mode(labels) is None
    result = engine.inject(_pod(), labels, WebhookConfig())
    assert result.allowed and not result.injected and result.patch == []
    assert result.skipped == "namespace is not labelled outrider.dev/inject=enabled|strict"
    assert result.warnings == ()


@pytest.mark.parametrize("value", ["enabled", "strict"])
def test_known_namespace_label_values_opt_in(value: str) -> None:
    assert ann.namespace_mode({"outrider.dev/inject": value}) == value
    assert ann.namespace_mode({}) is None


def test_inject_flag_values() -> None:
    assert ann.parse_inject_flag("false", "label") is False
    assert ann.parse_inject_flag("True", "label") is True
    with pytest.raises(ann.AnnotationError, match='allowed values: "true", "false"'):
        ann.parse_inject_flag("no", "annotation")


@pytest.mark.parametrize(
    ("value", "expected"), [(True, True), (False, False), (" FALSE ", False), (None, None)]
)
def test_inject_flag_accepts_yaml_booleans(value: Any, expected: bool | None) -> None:
    assert ann.parse_inject_flag(value, "label") is expected


@pytest.mark.parametrize("value", [0, 1, [], {}, "", "off"])
def test_inject_flag_refuses_other_types(value: Any) -> None:
    with pytest.raises(ann.AnnotationError, match=r"^label outrider.dev/inject="):
        ann.parse_inject_flag(value, "label")


@pytest.mark.parametrize(
    ("labels", "annotations", "source"),
    [
        ({"outrider.dev/inject": "false"}, {"outrider.dev/inject": "true"}, "label"),
        ({"outrider.dev/inject": "false"}, {"outrider.dev/inject": "false"}, "label"),
        ({"outrider.dev/inject": "true"}, {"outrider.dev/inject": "false"}, "annotation"),
        ({}, {"outrider.dev/inject": "false"}, "annotation"),
        ({"outrider.dev/inject": "true"}, {}, None),
        ({}, {}, None),
    ],
)
def test_pod_opt_out_and_where_it_came_from(
    labels: dict[str, str], annotations: dict[str, str], source: str | None
) -> None:
    settings = ann.parse_pod({"labels": labels, "annotations": annotations}, ())
    assert (settings.opt_out, settings.opt_out_source) == (source is not None, source)
    result = engine.inject(
        {**_pod(), "metadata": {"labels": labels, "annotations": annotations}}, ENABLED, WebhookConfig()
    )
    assert result.injected is (source is None)
    if source:
        where = f"metadata.{source}s[outrider.dev/inject]"
        assert result.skipped == f'pod opted out with {where}="false"; not injected'
        refused = engine.inject(
            {**_pod(), "metadata": {"labels": labels, "annotations": annotations}},
            {"outrider.dev/inject": "strict"},
            WebhookConfig(),
        )
        assert not refused.allowed and (refused.message or "").startswith(f'{where}="false": opting out')


def test_pod_settings_read_every_annotation() -> None:
    settings = ann.parse_pod(
        {
            "annotations": {
                "outrider.dev/mcp-port": "9000",
                "outrider.dev/token-audience": "https://a",
                "outrider.dev/status": "{}",
            }
        },
        ("https://a",),
    )
    assert (settings.mcp_port, settings.token_audience, settings.already_injected) == (
        9000,
        "https://a",
        True,
    )
    bare = ann.parse_pod({"labels": "not a map", "annotations": None}, ())
    assert bare == ann.PodSettings()


@pytest.mark.parametrize("order", [1, -1])
def test_values_that_compare_equal_across_types_are_read_each_on_its_own(order: int) -> None:
    # parse_pod remembers its answers by value; YAML hands the webhook True, 1 and 1.0, which are equal
    # and hash alike in Python but read differently. Whichever pod comes first, neither borrows the
    # other's answer: a refused value must not ride on an accepted one.
    label_true = {"labels": {"outrider.dev/inject": True}}
    label_one = {"labels": {"outrider.dev/inject": 1}}
    port_int = {"annotations": {"outrider.dev/mcp-port": 8080}}
    port_float = {"annotations": {"outrider.dev/mcp-port": 8080.0}}
    for accepted, refused, said in (
        (label_true, label_one, "label outrider.dev/inject=1 is not valid"),
        (port_int, port_float, "annotation outrider.dev/mcp-port=8080.0 is not valid"),
    ):
        for metadata in (accepted, refused)[::order] * 2:
            if metadata is accepted:
                settings = ann.parse_pod(metadata, ())
                assert (settings.opt_out, settings.mcp_port) == (
                    False,
                    8080 if metadata is port_int else None,
                )
            else:
                with pytest.raises(ann.AnnotationError, match=f"^{said}"):
                    ann.parse_pod(metadata, ())


@pytest.mark.parametrize(
    ("metadata", "said"),
    [
        (
            {"labels": {"outrider.dev/inject": {"on": True}}},
            "label outrider.dev/inject={'on': True} is not valid",
        ),
        (
            {"annotations": {"outrider.dev/mcp-port": [8080]}},
            "annotation outrider.dev/mcp-port=[8080] is not valid",
        ),
        (
            {
                "annotations": {
                    "outrider.dev/token-audience": "https://a",
                    "outrider.dev/resource": ["https://a"],
                }
            },
            "annotation outrider.dev/resource=['https://a'] is not valid",
        ),
    ],
)
def test_a_list_or_map_where_a_value_belongs_is_refused_by_name(metadata: dict[str, Any], said: str) -> None:
    # YAML lets a manifest put a list or a map where a string belongs; each is refused with the key it
    # sits under, every time (such values cannot be remembered by value, so they are read afresh)
    for _ in range(2):
        with pytest.raises(ann.AnnotationError) as caught:
            ann.parse_pod(metadata, ("https://a",))
        assert str(caught.value).startswith(said)


def test_unknown_keys_are_only_outrider_ones_sorted() -> None:
    metadata = {
        "annotations": {
            "outrider.dev/zz": "1",
            "outrider.dev/aa": "1",
            "outrider.dev/mcp-port": "8080",
            "example.com/outrider.dev/x": "1",
            7: "not a string key",
        }
    }
    assert ann.unknown_keys(metadata) == ["outrider.dev/aa", "outrider.dev/zz"]


def test_token_audience_shape_and_absence() -> None:
    assert ann.parse_token_audience(None, ()) is None
    assert ann.parse_token_audience(" https://a ", ("https://a",)) == "https://a"
    for bad in ("has space", "quote'd", "", "x" * 513):
        with pytest.raises(ann.AnnotationError, match="is not a valid audience"):
            ann.parse_token_audience(bad, ("https://a",))


def test_pod_policy_annotation_is_read_and_checked() -> None:
    text = "forbid(principal, action, resource);"
    settings = ann.parse_pod({"annotations": {"outrider.dev/policy": text}}, ())
    assert settings.policy == text
    assert ann.parse_pod({"annotations": {"outrider.dev/inject": "true"}}, ()).policy is None
    with pytest.raises(ann.AnnotationError, match=r"^annotation outrider.dev/policy.*permit"):
        ann.parse_pod({"annotations": {"outrider.dev/policy": "permit(principal, action, resource);"}}, ())
    with pytest.raises(
        ann.AnnotationError, match=r"^annotation outrider.dev/policy: must be Cedar policy text$"
    ):
        ann.parse_policy(["forbid"])


@pytest.mark.parametrize("where", ["label", "annotation"])
def test_bad_inject_value_names_label_or_annotation(where: str) -> None:
    metadata = {f"{where}s": {"outrider.dev/inject": "no"}}
    with pytest.raises(ann.AnnotationError) as err:
        ann.parse_pod(metadata, ())
    assert (
        str(err.value)
        == f"""{where} outrider.dev/inject='no' is not valid; allowed values: "true", "false\""""
    )


def test_mcp_port_and_audience_messages_say_what_is_allowed() -> None:
    allowed = "a port number 1-65535 or the name of a containerPort of an app container"
    with pytest.raises(ann.AnnotationError) as err:
        ann.parse_mcp_port("0")
    assert str(err.value) == f"annotation outrider.dev/mcp-port='0' is out of range; allowed: {allowed}"
    with pytest.raises(ann.AnnotationError) as err:
        ann.parse_mcp_port("Bad Name")
    assert str(err.value) == f"annotation outrider.dev/mcp-port='Bad Name' is not valid; allowed: {allowed}"
    with pytest.raises(ann.AnnotationError) as err:
        ann.parse_mcp_port("15020")
    assert "(15001, 15006, 15020); move the MCP server to another port" in str(err.value)
    with pytest.raises(ann.AnnotationError) as err:
        ann.parse_token_audience("a b", ("x",))
    assert str(err.value).endswith("(a URI or client id without spaces or quotes)")
    with pytest.raises(ann.AnnotationError) as err:
        ann.parse_token_audience("c", ("a", "b"))
    assert str(err.value).endswith("allowed values: a, b")
    with pytest.raises(ann.AnnotationError) as err:
        ann.parse_token_audience("c", ())
    assert str(err.value).endswith(
        "allows no token audiences (token_audiences is empty); ask the operator to add it"
    )


def test_token_audience_only_narrows() -> None:
    assert ann.parse_token_audience("https://a", ("https://a", "https://b")) == "https://a"
    with pytest.raises(ann.AnnotationError, match="allowed values: https://a"):
        ann.parse_token_audience("https://evil", ("https://a",))
    with pytest.raises(ann.AnnotationError, match="token_audiences is empty"):
        ann.parse_token_audience("https://a", ())


def test_unknown_outrider_annotation_is_a_warning() -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {"outrider.dev/mcp-prot": "8080"}
    result = engine.inject(pod, ENABLED, WebhookConfig())
    assert result.injected
    assert any("outrider.dev/mcp-prot" in w for w in result.warnings)


# --- config ------------------------------------------------------------------------------------


def test_config_defaults_and_hash_are_stable() -> None:
    assert parse_config({}) == WebhookConfig()
    assert parse_config(None).hash == WebhookConfig().hash
    assert parse_config({"native_sidecar": False}).hash != WebhookConfig().hash
    assert WebhookConfig().native_sidecar is True


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"imagePullPolicy": "Always"}, "unknown webhook config key(s) ['imagePullPolicy']"),
        ({"image_pull_policy": "Sometimes"}, "allowed: ['Always', 'IfNotPresent', 'Never']"),
        ({"native_sidecar": "yes"}, "native_sidecar"),
        ({"resources": {"requests": {"cpu": "lots"}}}, "resources.requests.cpu"),
        ({"resources": {"requests": {"gpu": "1"}}}, "resources.requests.gpu"),
        ({"token_audiences": "https://a"}, "token_audiences"),
        ({"token_audiences": ["a"], "default_audience": "b"}, "default_audience"),
        ({"trust_domain": "Example.COM"}, "trust_domain"),
        ({"sidecar": ["x"]}, "sidecar"),
        ({"sidecar_image": ""}, "sidecar_image"),
    ],
)
def test_config_errors_name_the_key(data: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert fragment in str(err.value)


def test_config_is_frozen_and_holder_swaps() -> None:
    config = parse_config({"sidecar": {"telemetry": {"audit": "off"}}})
    with pytest.raises(TypeError):
        config.sidecar["telemetry"] = {}  # type: ignore[index]
    holder = ConfigHolder()
    holder.replace(config)
    assert holder.current is config


def test_sidecar_block_is_merged_under_per_pod_values() -> None:
    config = parse_config(
        {
            "sidecar": {
                "inbound": {"mcp_port": 1, "issuer": "https://idp", "resource": "https://mcp"},
                "exchange": {"audience": "x"},
            },
            "token_audiences": ["https://api"],
            "default_audience": "https://api",
        }
    )
    pod = engine.inject(_pod(), ENABLED, config).pod
    proxy = pod["spec"]["initContainers"][1]
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    merged = json.loads(env["OUTRIDER_CONFIG"])
    assert merged["inbound"] == {"mcp_port": 8080, "issuer": "https://idp", "resource": "https://mcp"}
    assert merged["exchange"] == {"audience": "https://api"}
    assert merged["egress"]["mode"] == "capture"


# --- JSON Patch --------------------------------------------------------------------------------


def test_pointer_escapes_rfc6901() -> None:
    assert escape("a/b~c") == "a~1b~0c"
    assert (
        pointer("metadata", "annotations", "outrider.dev/status")
        == "/metadata/annotations/outrider.dev~1status"
    )


def test_patch_with_awkward_keys_applies() -> None:
    original = {"metadata": {"annotations": {"a~/b": "1", "x/y": "2"}}, "spec": {"l": None}}
    modified = copy.deepcopy(original)
    modified["metadata"]["annotations"]["outrider.dev/status"] = "{}"
    modified["metadata"]["annotations"]["~weird/"] = "3"
    modified["spec"]["l"] = [1, 2]
    ops = diff(original, modified)
    assert jsonpatch.apply_patch(original, ops) == modified
    assert {"op": "add", "path": "/metadata/annotations/outrider.dev~1status", "value": "{}"} in ops


def test_missing_list_is_created_once_then_appended() -> None:
    original = _pod()
    result = engine.inject(original, ENABLED, WebhookConfig())
    paths = [op["path"] for op in result.patch]
    assert paths.count("/spec/initContainers") == 1
    assert paths.count("/spec/volumes") == 1
    assert jsonpatch.apply_patch(original, result.patch) == result.pod


def test_existing_lists_are_extended_not_replaced() -> None:
    original = _pod(
        initContainers=[{"name": "setup", "image": "busybox"}],
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    result = engine.inject(original, ENABLED, WebhookConfig())
    ops = {op["path"]: op["op"] for op in result.patch}
    assert ops["/spec/initContainers/0"] == "add" and ops["/spec/initContainers/1"] == "add"
    assert ops["/spec/volumes/-"] == "add"
    assert "/spec/volumes" not in ops and "/spec/initContainers" not in ops
    assert jsonpatch.apply_patch(original, result.patch) == result.pod


# --- engine edge cases ---------------------------------------------------------------------------


def test_explicit_mode_has_no_init_container_and_sets_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = EgressPlan(
        mode="explicit", policy={"allow": []}, app_env=(("HTTPS_PROXY", "http://127.0.0.1:15001"),)
    )
    monkeypatch.setattr(engine, "plan_egress_cached", lambda *args: plan)
    pod = _pod()
    pod["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/r", "port": 8080}}
    result = engine.inject(pod, ENABLED, WebhookConfig())
    names = [c["name"] for c in result.pod["spec"]["initContainers"]]
    assert names == ["outrider-proxy"]
    app = result.pod["spec"]["containers"][0]
    assert {"name": "HTTPS_PROXY", "value": "http://127.0.0.1:15001"} in app["env"]
    # Without capture, the kubelet still reaches the app directly: probes are left alone.
    assert app["readinessProbe"] == {"httpGet": {"path": "/r", "port": 8080}}


def test_egress_errors_refuse_the_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = EgressPlan(mode="capture", policy={}, errors=("annotation outrider.dev/egress-allow: bad rule",))
    monkeypatch.setattr(engine, "plan_egress_cached", lambda *args: plan)
    result = engine.inject(_pod(), ENABLED, WebhookConfig())
    assert not result.allowed and "egress-allow" in (result.message or "")


def test_egress_planner_crash_is_a_refusal_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any) -> EgressPlan:
        raise KeyError("x")

    monkeypatch.setattr(engine, "plan_egress_cached", boom)
    result = engine.inject(_pod(), ENABLED, WebhookConfig())
    assert not result.allowed and "KeyError" in (result.message or "")


def test_proxy_uid_survives_pod_level_run_as_user() -> None:
    pod = _pod(securityContext={"runAsUser": 1000, "runAsGroup": 1000})
    proxy = engine.inject(pod, ENABLED, WebhookConfig()).pod["spec"]["initContainers"][1]
    assert proxy["securityContext"]["runAsUser"] == 15337 and proxy["securityContext"]["runAsGroup"] == 15337


def test_strict_forged_status_is_refused() -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {ann.STATUS: '{"initContainers":["outrider-proxy"],"containers":[]}'}
    strict = engine.inject(pod, {"outrider.dev/inject": "strict"}, WebhookConfig())
    assert not strict.allowed and "another config" in (strict.message or "")
    enabled = engine.inject(pod, ENABLED, WebhookConfig())
    assert enabled.allowed and enabled.patch == []


STRICT = {"outrider.dev/inject": "strict"}
SAFE = {"runAsUser": 1000, "runAsNonRoot": True, "allowPrivilegeEscalation": False}


def _safe_pod(**spec: Any) -> dict[str, Any]:
    """A pod that strict namespaces accept: pinned non-root UID, no privilege escalation."""
    pod = _pod(**spec)
    pod["spec"]["containers"][0]["securityContext"] = dict(SAFE)
    return pod


@pytest.mark.parametrize("native", [True, False])
def test_strict_accepts_a_genuine_injection(native: bool) -> None:
    config = WebhookConfig(native_sidecar=native)
    injected = engine.inject(_safe_pod(), STRICT, config).pod
    again = engine.inject(injected, STRICT, config)
    assert again.allowed and again.patch == [] and again.skipped


def _tamper(change: Any) -> str | None:
    injected = copy.deepcopy(engine.inject(_safe_pod(), STRICT, WebhookConfig()).pod)
    change(injected)
    result = engine.inject(injected, STRICT, WebhookConfig())
    assert not result.allowed
    return result.message


def test_strict_refuses_a_swapped_sidecar_image() -> None:
    message = _tamper(lambda p: p["spec"]["initContainers"][1].__setitem__("image", "busybox"))
    assert "outrider-proxy is not the sidecar this webhook injects" in (message or "")


def test_strict_refuses_a_dropped_capture() -> None:
    message = _tamper(lambda p: p["spec"]["initContainers"][0].__setitem__("args", ["iptables", "--dry-run"]))
    assert "traffic-capture init container" in (message or "")


def test_strict_refuses_a_moved_mcp_port() -> None:
    def move(p: dict[str, Any]) -> None:
        status = json.loads(p["metadata"]["annotations"][ann.STATUS])
        status["mcpPort"] = 9999
        p["metadata"]["annotations"][ann.STATUS] = json.dumps(status)

    assert "MCP port 9999" in (_tamper(move) or "")


def test_strict_refuses_net_admin_added_after_injection() -> None:
    def grant(p: dict[str, Any]) -> None:
        p["spec"]["containers"][0]["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}

    assert "NET_ADMIN" in (_tamper(grant) or "")


def test_user_default_container_annotation_is_kept() -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {ann.DEFAULT_CONTAINER: "app"}
    pod["spec"]["containers"].insert(0, {"name": "helper", "image": "y", "ports": [{"containerPort": 9}]})
    result = engine.inject(pod, ENABLED, WebhookConfig())
    assert result.pod["metadata"]["annotations"][ann.DEFAULT_CONTAINER] == "app"


pod_like = st.fixed_dictionaries(
    {
        "metadata": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {},
                optional={
                    "annotations": st.one_of(
                        st.none(),
                        st.dictionaries(
                            st.sampled_from(
                                [ann.MCP_PORT, ann.POD_INJECT, ann.TOKEN_AUDIENCE, ann.STATUS, "x/y"]
                            ),
                            st.text(max_size=8),
                        ),
                    ),
                    "labels": st.one_of(
                        st.none(),
                        st.dictionaries(
                            st.sampled_from([ann.POD_INJECT, "app"]), st.sampled_from(["true", "false", "x"])
                        ),
                    ),
                },
            ),
        ),
        "spec": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {
                    "containers": st.lists(
                        st.fixed_dictionaries(
                            {
                                "name": st.sampled_from(["app", "outrider-proxy", "b", "istio-proxy"]),
                                "image": st.just("i"),
                            },
                            optional={
                                "ports": st.one_of(
                                    st.none(),
                                    st.lists(
                                        st.fixed_dictionaries(
                                            {"containerPort": st.integers(1, 65535)},
                                            optional={
                                                "name": st.sampled_from(["mcp", "http"]),
                                                "protocol": st.sampled_from(["TCP", "UDP"]),
                                            },
                                        ),
                                        max_size=3,
                                    ),
                                ),
                                "readinessProbe": st.one_of(
                                    st.none(),
                                    st.fixed_dictionaries(
                                        {
                                            "httpGet": st.fixed_dictionaries(
                                                {
                                                    "port": st.one_of(
                                                        st.integers(1, 65535),
                                                        st.sampled_from(["mcp", "http"]),
                                                    )
                                                }
                                            )
                                        }
                                    ),
                                ),
                                "env": st.one_of(
                                    st.none(),
                                    st.lists(
                                        st.fixed_dictionaries(
                                            {
                                                "name": st.sampled_from(["A", "HTTP_PROXY"]),
                                                "value": st.just("v"),
                                            }
                                        ),
                                        max_size=2,
                                        unique_by=lambda e: e["name"],
                                    ),
                                ),
                                "securityContext": st.one_of(
                                    st.none(),
                                    st.fixed_dictionaries(
                                        {},
                                        optional={
                                            "runAsUser": st.sampled_from([0, 15337]),
                                            "privileged": st.booleans(),
                                        },
                                    ),
                                ),
                            },
                        ),
                        max_size=3,
                        unique_by=lambda c: c["name"],
                    ),
                },
                optional={
                    "hostNetwork": st.booleans(),
                    "initContainers": st.one_of(
                        st.none(), st.just([]), st.just([{"name": "init", "image": "i"}])
                    ),
                    "volumes": st.one_of(st.none(), st.just([{"name": "outrider-spiffe", "emptyDir": {}}])),
                },
            ),
        ),
    }
)


@settings(max_examples=300, deadline=None)
@given(pod=pod_like, strict=st.booleans(), native=st.booleans())
def test_fuzz_engine_never_crashes_and_patches_apply(pod: dict[str, Any], strict: bool, native: bool) -> None:
    labels = {"outrider.dev/inject": "strict" if strict else "enabled"}
    config = WebhookConfig(native_sidecar=native, token_audiences=("a",))
    result = engine.inject(pod, labels, config)
    if not result.allowed:
        assert result.message and result.patch == []
        return
    assert jsonpatch.apply_patch(copy.deepcopy(pod), result.patch) == result.pod
    again = engine.inject(result.pod, labels, config)
    assert again.allowed and again.patch == [] and again.pod == result.pod


def test_answer_cache_key_is_exact() -> None:
    from outrider.webhook.server import AnswerCache

    def key(obj: Any, uid: str, labels: dict[str, str] = ENABLED) -> Hashable:
        body = json.dumps({"request": {"uid": uid, "object": obj}}, separators=(",", ":")).encode()
        return AnswerCache.key("h", "ns", labels, None, obj, body, uid)

    pod = _pod()
    assert key(pod, "u1") == key(copy.deepcopy(pod), "u2")  # same pod, another request
    other = _pod()
    other["spec"]["containers"][0]["image"] = "y"
    assert key(pod, "u1") != key(other, "u2")
    assert key(pod, "u1") != key(pod, "u2", {"outrider.dev/inject": "strict"})
    # The uid text also inside the object: the body shortcut is not used, objects still differ.
    a, b = _pod(), _pod()
    a["metadata"]["labels"] = {"x": "u1"}
    b["metadata"]["labels"] = {"x": "u2"}
    a["metadata"]["annotations"] = {"uid": "u1"}
    b["metadata"]["annotations"] = {"uid": "u2"}
    assert key(a, "u1") != key(b, "u2")


def test_answer_cache_key_follows_every_fact_besides_the_pod() -> None:
    from types import MappingProxyType

    from outrider.webhook.server import AnswerCache

    pod = _pod()
    body = json.dumps({"request": {"uid": "u1", "object": pod}}, separators=(",", ":")).encode()

    def key(**changed: Any) -> Hashable:
        facts: dict[str, Any] = {
            "config_hash": "h",
            "namespace": "ns",
            "labels": ENABLED,
            "policy": None,
            "namespace_annotations": {},
        }
        facts.update(changed)
        return AnswerCache.key(
            facts["config_hash"],
            facts["namespace"],
            facts["labels"],
            facts["policy"],
            pod,
            body,
            "u1",
            facts["namespace_annotations"],
        )

    base = key()
    variants = [
        key(config_hash="h2"),
        key(namespace="ns2"),
        key(labels={**ENABLED, "team": "a"}),
        key(policy={"allow": ["x.example:443"]}),
        key(policy={}),
        key(namespace_annotations={"sidecar.istio.io/inject": "false"}),
        # what orjson refuses (a non-string key, a Mapping that is not a dict) is still told apart
        key(labels={**ENABLED, 1: "a"}),
        key(policy={"allow": [2**70]}),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert key(labels={"team": "a", **ENABLED}) == key(labels={**ENABLED, "team": "a"})  # key order
    assert key(labels=MappingProxyType(dict(ENABLED))) == key(labels=MappingProxyType(dict(ENABLED)))
    assert key(namespace_annotations=None) == base


def test_answer_cache_key_of_a_usual_body_is_the_body_itself_not_a_digest() -> None:
    """A body up to EXACT_BODY_LIMIT is its own key (minus the request's uid): no digest that two
    pods could share, and Python's bytes hash over it is ~3x cheaper than SHA-256. A larger body is
    keyed by a digest; the two kinds never meet."""
    from outrider.webhook.server import AnswerCache, _facts

    def body(obj: Any, uid: str) -> bytes:
        return json.dumps({"request": {"uid": uid, "object": obj}}, separators=(",", ":")).encode()

    pod = _pod()
    small = body(pod, "u1")
    assert len(small) <= AnswerCache.EXACT_BODY_LIMIT
    key = AnswerCache.key("h", "ns", ENABLED, None, pod, small, "u1")
    assert key == (_facts("h", "ns", ENABLED, None, None), small.replace(b'"uid":"u1"', b""))
    assert key == AnswerCache.key("h", "ns", ENABLED, None, pod, body(pod, "u2"), "u2")
    big = _pod()
    big["metadata"]["annotations"] = {"note": "x" * AnswerCache.EXACT_BODY_LIMIT}
    big_key = AnswerCache.key("h", "ns", ENABLED, None, big, body(big, "u1"), "u1")
    assert isinstance(big_key, bytes) and len(big_key) == 32
    assert big_key == AnswerCache.key("h", "ns", ENABLED, None, big, body(big, "u2"), "u2")
    other = copy.deepcopy(big)
    other["metadata"]["annotations"]["note"] += "y"
    assert big_key != AnswerCache.key("h", "ns", ENABLED, None, other, body(other, "u1"), "u1")
    cache = AnswerCache(4)
    cache.put(key, ("injected", b"{}"))
    cache.put(big_key, ("skipped", b"{}"))
    assert cache.get(key) == ("injected", b"{}") and cache.get(big_key) == ("skipped", b"{}")


@pytest.mark.parametrize(
    "uid", ["705ab4f5-6393-11e8-b7cc-42010a800002", 'a"b\\c', "caf\u00e9", "tab\there", "del\x7f"]
)
def test_answer_cache_key_finds_the_uid_as_json_spells_it(uid: str) -> None:
    from outrider.webhook.server import AnswerCache

    pod, other = _pod(), _pod()
    other["spec"]["containers"][0]["image"] = "y"

    def key(obj: Any, request_uid: str) -> Hashable:
        body = json.dumps({"request": {"uid": request_uid, "object": obj}}, separators=(",", ":")).encode()
        return AnswerCache.key("h", "ns", ENABLED, None, obj, body, request_uid)

    assert key(pod, uid) == key(copy.deepcopy(pod), uid + "2")  # another request, same pod
    assert key(pod, uid) != key(other, uid)
    # the uid's JSON spelling is found in the body (the cheap path), however the uid is spelt
    marker = b'"uid":' + json.dumps(uid).encode()
    body = json.dumps({"request": {"uid": uid, "object": pod}}, separators=(",", ":")).encode()
    assert body.count(marker) == 1
    from outrider.webhook.server import _quoted

    assert _quoted(uid) == json.dumps(uid).encode()


def test_cached_egress_plan_equals_a_fresh_plan_for_every_fixture() -> None:
    from webhook_support import load_fixture, pod_template, templated_fixture_names

    from outrider.webhook.egress import plan_egress, plan_egress_cached

    for name in templated_fixture_names():
        doc, labels, config = load_fixture(name)
        pod = pod_template(doc) if doc["kind"] != "Pod" else doc
        policy = config.plain_egress_default_policy
        for ns_policy in (None, {"allow": ["db.internal:5432"], "includeClusterDefault": True}):
            fresh = plan_egress(pod, labels, ns_policy, policy)
            assert plan_egress_cached(pod, labels, ns_policy, policy) == fresh, name
            assert plan_egress_cached(pod, labels, ns_policy, policy) == fresh, name


def test_cached_egress_plan_follows_each_input() -> None:
    from outrider.webhook.egress import plan_egress_cached

    pod = _pod()
    policy = {"allow": ["api.github.com:443"]}
    base = plan_egress_cached(pod, ENABLED, None, policy)
    narrowed = copy.deepcopy(pod)
    narrowed["metadata"]["annotations"] = {"outrider.dev/egress-allow": "api.github.com:443"}
    dns = _pod(dnsConfig={"nameservers": ["10.0.0.53"]})
    explicit = {**ENABLED, "pod-security.kubernetes.io/enforce": "restricted"}
    assert plan_egress_cached(narrowed, ENABLED, None, policy).policy != base.policy
    assert plan_egress_cached(dns, ENABLED, None, policy).init_args == ("--dns-server", "10.0.0.53")
    assert plan_egress_cached(pod, explicit, None, policy).mode == "explicit"
    assert plan_egress_cached(pod, ENABLED, {"allow": []}, policy).policy != base.policy
    assert plan_egress_cached(pod, ENABLED, None, {"allow": ["x.example:443"]}).policy != base.policy


@pytest.mark.parametrize(
    "value",
    [
        {"b": 1, "a": ["x\n\t\x01", '"\\/', None, True]},
        {"path": "/caf\u00e9", "h": [{"name": "X", "value": "\u2028\x7f"}]},
        {"n": -3, "nested": {"z": {}, "y": []}},
    ],
)
def test_sorted_json_writes_what_json_dumps_writes(value: Any) -> None:
    assert engine._sorted_json(value) == json.dumps(value, sort_keys=True, separators=(",", ":"))


def test_per_pod_refusal_is_the_one_the_whole_check_gives() -> None:
    """The webhook re-checks only `inbound` per pod; the first error must still be `validate`'s own."""
    import itertools

    from outrider.sidecar import config as sidecar_settings
    from outrider.webhook.engine import _OTHER_SECTIONS, _sidecar_refusal

    bad = {
        "identity": {"socket": "tcp://nope"},
        "inbound": {"mcp_port": 0},
        "exchange": {"cache_size": "many"},
        "policy": {"storage": "nowhere"},
        "telemetry": {"audit": 7},
    }
    good = {"inbound": {"mcp_port": 8080}}
    for count in range(len(bad) + 1):
        for chosen in itertools.combinations(bad, count):
            value = {**good, **{name: bad[name] for name in chosen}}
            sidecar_settings.check_sections(value)
            other = sidecar_settings.first_error(value, _OTHER_SECTIONS) or ("", "")
            expected = _sidecar_refusal(value)
            assert _sidecar_refusal(value, other) == expected, chosen
            assert (expected is None) == (count == 0), chosen


# An exchange the sidecar refuses without an audience (okta needs one): a per-pod error, since the pod's
# `outrider.dev/token-audience` supplies it. Loading refuses such a config (the typical pod it checks
# has no audience); these configs are built in-process to reach the per-pod checks behind that.
_OKTA = {
    "token_endpoint": "https://idp.example/token",
    "profile": "okta",
    "client_id": "c",
    "auth": "jwt-svid",
}
_REFUSED = "the outrider-proxy sidecar would refuse this pod's configuration (OUTRIDER_CONFIG): "


@pytest.mark.parametrize("order", [1, -1])
def test_one_pods_config_error_never_refuses_another_pod(order: int) -> None:
    """The per-pod checks are shared by pods with the same port: a pod whose own annotation makes the
    config valid is admitted whether a refused pod came first or not, and the refused one stays so."""
    config = WebhookConfig(
        sidecar={"exchange": {**_OKTA, "client_id": f"c{order}"}}, token_audiences=("https://api",)
    )
    bare = _pod()
    with_audience = _pod()
    with_audience["metadata"]["annotations"] = {"outrider.dev/token-audience": "https://api"}
    for pod in (bare, with_audience, bare, with_audience)[::order]:
        result = engine.inject(copy.deepcopy(pod), ENABLED, config)
        if pod is with_audience:
            assert result.allowed and result.injected, result.message
        else:
            assert not result.allowed
            assert (result.message or "").startswith(_REFUSED + "exchange.audience: required"), result.message


@pytest.mark.parametrize(
    ("sidecar", "first"),
    [
        ({"identity": {"socket": "tcp://nope"}, "exchange": _OKTA}, "identity.socket: 'tcp://nope'"),
        ({"telemetry": {"audit": 7}, "exchange": _OKTA}, "exchange.audience: required"),
        ({"telemetry": {"audit": 7}}, "telemetry.audit: 7 is not valid"),
    ],
)
def test_a_config_the_sidecar_would_refuse_names_its_first_error(sidecar: dict[str, Any], first: str) -> None:
    """Errors in the operator's own sections (checked once per config) and in the per-pod ones: the
    refusal names the one the sidecar itself would stop on (section order), for every pod."""
    for _ in range(2):  # the second pod is answered from the caches
        result = engine.inject(_pod(), ENABLED, WebhookConfig(sidecar=sidecar))
        assert not result.allowed
        assert (result.message or "").startswith(_REFUSED + first), result.message


class _List(list):  # type: ignore[type-arg]
    pass


class _Float(float):
    pass


class _FrozenMap(Mapping[str, Any]):
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Any:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _reference_refusal(
    config: WebhookConfig, audience: str | None, plan: EgressPlan, mcp_policy: dict[str, Any] | None
) -> str | None:
    """The refusal from the whole check of the whole merged config (no caches)."""
    return engine._sidecar_refusal(engine.sidecar_config(config, 8080, audience, plan, mcp_policy))


def _answer(
    config: WebhookConfig, audience: str | None, plan: EgressPlan, mcp_policy: dict[str, Any] | None
) -> str | None:
    try:
        engine._sidecar_config_json(config, 8080, audience, plan, mcp_policy)
    except engine._Refused as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("order", [1, -1])
def test_per_pod_section_errors_are_shared_only_by_equal_inputs(order: int) -> None:
    """Pods with their own allowlist (a new plan each) share the per-pod sections' first error by
    config, audience, MCP policy and egress mode: each of those that differs gets its own answer,
    whichever came first, and every answer is the whole check's."""
    from outrider.webhook import memo

    okta = WebhookConfig(
        sidecar={"exchange": {**_OKTA, "client_id": "shared"}}, token_audiences=("https://api",)
    )
    plain = WebhookConfig()
    # the operator's own `inbound` port is bad, but every pod brings its own: no pod is refused for it
    port_zero = WebhookConfig(sidecar={"inbound": {"mcp_port": 0}})
    cases: list[tuple[WebhookConfig, str | None, str, dict[str, Any] | None, Any]] = [
        (okta, None, "capture", None, {"layers": []}),
        (okta, "https://api", "capture", None, {"layers": []}),
        (plain, None, "capture", None, {"layers": []}),
        (plain, None, "capture", {"storage": "nowhere"}, {"layers": []}),
        (plain, None, "explicit", {"storage": "nowhere"}, {"layers": []}),
        (plain, None, "capture", {}, {"layers": []}),
        (plain, None, "explicit", None, ["not", "a", "mapping"]),
        (plain, None, "explicit", None, _FrozenMap({"layers": []})),  # not a dict, but a mapping
        (port_zero, None, "capture", None, _FrozenMap({"layers": []})),
        (port_zero, None, "capture", None, {"layers": []}),
        (plain, None, "capture", None, ("a", "tuple")),
        (plain, None, "capture", None, {"layers": [{"allow": ["a.example"]}]}),
    ]
    memo.clear_all()
    seen = set()
    for config, audience, mode, mcp_policy, policy in (cases + cases)[::order]:
        plan = EgressPlan(mode=mode, policy=policy)  # a new plan per pod, as an own allowlist gives
        expected = _reference_refusal(config, audience, plan, mcp_policy)
        assert _answer(config, audience, plan, mcp_policy) == expected, (audience, mode, mcp_policy, policy)
        seen.add(None if expected is None else expected.split(": ", 2)[1].split(":")[0])
    # every section the cache could confuse refuses somewhere, and some pods are admitted
    assert seen == {None, "exchange.audience", "egress.policy", "policy.storage"}, seen


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.lists(inner, max_size=4).map(tuple)
            | st.dictionaries(st.text(max_size=2), inner, max_size=4)
            | st.dictionaries(st.text(max_size=2), inner, max_size=4).map(_FrozenMap)
        ),
        max_leaves=12,
    )
)
def test_has_float_finds_a_float_anywhere(value: Any) -> None:
    def reference(item: Any) -> bool:
        if type(item) is float:
            return True
        if isinstance(item, Mapping):
            return any(reference(v) for v in item.values())
        if isinstance(item, list | tuple):
            return any(reference(v) for v in item)
        return False

    assert engine._has_float(value) is reference(value)


def test_has_float_walks_past_leaves_and_into_odd_containers() -> None:
    assert engine._has_float([1.5, "a"]) and engine._has_float([1.5, 1]) and engine._has_float([1.5, None])
    assert engine._has_float(["a", {"k": (1, [2, 0.5])}])
    assert engine._has_float(_FrozenMap({"k": 0.5})) and engine._has_float(_List([0.5]))
    assert not engine._has_float(_FrozenMap({"k": [1, "x", True, None]}))
    assert not engine._has_float(_Float(0.5))  # the float check is by exact type, as orjson spells subclasses
    assert not engine._has_float({"a": [1, "x"], "b": (True, None)}) and not engine._has_float(2)


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    for entry in container["env"]:
        if entry["name"] == name:
            entry["value"] = value
            return
    raise AssertionError(f"no {name} in {container['name']}")


def _loosened_config(container: dict[str, Any]) -> None:
    config = json.loads(next(e["value"] for e in container["env"] if e["name"] == "OUTRIDER_CONFIG"))
    config.setdefault("egress", {})["policy"] = {"allow": ["*:*"]}
    _set_env(container, "OUTRIDER_CONFIG", json.dumps(config))


def _status(pod: dict[str, Any], **change: Any) -> None:
    status = json.loads(pod["metadata"]["annotations"][ann.STATUS])
    pod["metadata"]["annotations"][ann.STATUS] = json.dumps({**status, **change})


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda p: p["spec"]["initContainers"][1].__setitem__("command", ["sh"]), "is not the sidecar"),
        (
            lambda p: p["spec"]["initContainers"][1].__setitem__("args", ["sidecar", "--x"]),
            "is not the sidecar",
        ),
        (
            lambda p: p["spec"]["initContainers"][1]["securityContext"].__setitem__("runAsUser", 0),
            "is not the sidecar",
        ),
        (lambda p: _loosened_config(p["spec"]["initContainers"][1]), "is not the sidecar"),
        (
            lambda p: _set_env(p["spec"]["initContainers"][1], "OUTRIDER_CONFIG", "{not json"),
            "is not the sidecar",
        ),
        (lambda p: p["spec"]["initContainers"][0].__setitem__("image", "busybox"), "traffic-capture init"),
        (lambda p: p["metadata"]["annotations"].__setitem__(ann.STATUS, "not json"), "not the JSON Outrider"),
        (lambda p: p["metadata"]["annotations"].__setitem__(ann.STATUS, "[1]"), "not the JSON Outrider"),
        (
            lambda p: _status(p, initContainers=["outrider-init", "gone"]),
            "containers it names are missing (gone)",
        ),
        (
            lambda p: _status(p, initContainers=[], containers=[]),
            "containers it names are missing (none named)",
        ),
        (lambda p: _status(p, mcpPort=1), "it records MCP port 1"),
        (
            lambda p: _status(p, resource="https://elsewhere/mcp"),
            "it records resource 'https://elsewhere/mcp'",
        ),
    ],
)
def test_strict_refuses_every_loosened_part_of_an_injection(change: Any, said: str) -> None:
    """A pod carrying the status annotation is skipped in strict namespaces only when it is exactly what
    this webhook injects now: every part an attacker could loosen is compared (a sidecar running another
    command, as root, with a wider egress policy; no capture; a forged or inconsistent record)."""
    message = _tamper(change) or ""
    assert said in message, message
    assert "says the pod is injected but" in message


@pytest.mark.parametrize(
    ("taken", "expected"),
    [
        ((), ["outrider-admin", "outrider-mcp"]),
        (("outrider-admin",), ["outrider-admi-1", "outrider-mcp"]),
        (("outrider-mcp",), ["outrider-admin", "outrider-mcp-1"]),
        (("outrider-admin", "outrider-mcp"), ["outrider-admi-1", "outrider-mcp-1"]),
    ],
)
def test_proxy_port_names_avoid_the_pods_own(taken: tuple[str, ...], expected: list[str]) -> None:
    """Either name taken by an app port gets a free one; the other keeps its own (one pod, two layouts)."""
    ports = [{"name": "mcp", "containerPort": 8080}] + [
        {"name": name, "containerPort": 9000 + i} for i, name in enumerate(taken)
    ]
    for native in (True, False):
        result = engine.inject(
            _pod(containers=[{"name": "app", "image": "x", "ports": ports}]),
            ENABLED,
            WebhookConfig(native_sidecar=native),
        )
        spec = result.pod["spec"]
        proxy = next(
            c for c in (*spec.get("initContainers", []), *spec["containers"]) if c["name"] == "outrider-proxy"
        )
        assert [p["name"] for p in proxy["ports"]] == expected
        assert [p["containerPort"] for p in proxy["ports"]] == [15020, 15006]
