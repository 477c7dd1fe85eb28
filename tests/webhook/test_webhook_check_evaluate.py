"""`outrider check`'s pure evaluation: facts in, results out, for the cases a test cluster cannot show."""

from __future__ import annotations

import base64
import datetime
import json

from outrider.webhook.check.evaluate import FAIL, PASS, WARN, Result, evaluate, evaluate_pre, failed
from outrider.webhook.check.facts import Access, DryRun, Facts, Names, PodFacts, names_from_webhook_config
from outrider.webhook.cluster import pki

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
CONFIG = {"config.yaml": "sidecar_image: ghcr.io/outrider-dev/outrider:0.1.0\n"}


def _find(results: list[Result], prefix: str) -> Result:
    (hit,) = [r for r in results if r.name.startswith(prefix)]
    return hit


def _healthy(**overrides: object) -> Facts:
    ca = pki.new_ca(NOW - datetime.timedelta(days=1), datetime.timedelta(days=90))
    serving = pki.issue_serving(
        ca, ("outrider-webhook.outrider-system.svc",), NOW, datetime.timedelta(days=90)
    )
    bundle = base64.b64encode(ca.cert_pem).decode()
    base: dict[str, object] = {
        "now_epoch": NOW.timestamp(),
        "server_version": "v1.34.4",
        "webhook_config": {
            "metadata": {"name": "outrider", "labels": {"app.kubernetes.io/part-of": "outrider"}},
            "webhooks": [{"name": "inject.outrider.dev", "clientConfig": {"caBundle": bundle}}],
        },
        "cert_secret": {"tls.crt": base64.b64encode(serving.cert_pem).decode()},
        "ready_endpoints": 2,
        "dry_run": DryRun("apps", True),
        "config_map": CONFIG,
        "csi_driver": True,
        "cluster_spiffe_ids": (
            {
                "metadata": {"name": "p"},
                "spec": {"workloadSelectorTemplates": ["k8s:container-name:outrider-proxy"]},
            },
        ),
        "namespaces": {"apps": {"outrider.dev/inject": "strict"}},
    }
    base.update(overrides)
    return Facts(**base)  # type: ignore[arg-type]


def test_healthy_facts_all_pass() -> None:
    results = evaluate(_healthy())
    assert [r for r in results if r.status != PASS] == []
    assert not failed(results)


def test_old_cluster_warns_about_native_sidecars_and_fails_below_minimum() -> None:
    assert _find(evaluate(_healthy(server_version="v1.28.3")), "supports native sidecars").status == WARN
    results = evaluate_pre(_healthy(server_version="v1.26.0", access=()))
    assert _find(results, "is running the minimum").status == FAIL
    unreachable = evaluate(Facts(version_error="OSError: connection refused"))
    assert _find(unreachable, "can query").status == FAIL and failed(unreachable)


def test_certificate_close_to_expiry_warns() -> None:
    ca = pki.new_ca(NOW - datetime.timedelta(days=80), datetime.timedelta(days=90))
    serving = pki.issue_serving(ca, ("x",), NOW - datetime.timedelta(days=80), datetime.timedelta(days=85))
    facts = _healthy(
        cert_secret={"tls.crt": base64.b64encode(serving.cert_pem).decode()},
        webhook_config={
            "webhooks": [{"name": "h", "clientConfig": {"caBundle": base64.b64encode(ca.cert_pem).decode()}}]
        },
    )
    validity = _find(evaluate(facts), "serving certificate is valid now")
    assert validity.status == WARN and "(5 days)" in validity.message


def test_strict_namespace_opt_out_is_an_escape_but_enabled_opt_out_is_not() -> None:
    out = PodFacts("apps", "skip", {"outrider.dev/inject": "false"}, {}, ("app",))
    strict = _find(evaluate(_healthy(pods=(out,))), "pods in opted-in namespaces")
    assert strict.status == WARN and "apps/skip" in strict.details
    enabled = _healthy(pods=(out,), namespaces={"apps": {"outrider.dev/inject": "enabled"}})
    assert _find(evaluate(enabled), "pods in opted-in namespaces").status == PASS


def test_stale_pods_get_the_command_of_their_controller() -> None:
    status = json.dumps({"configHash": "0123456789abcdef"})
    pods = (
        PodFacts(
            "apps", "db-0", {}, {"outrider.dev/status": status}, ("outrider-proxy", "db"), "StatefulSet", "db"
        ),
        PodFacts("apps", "solo", {}, {"outrider.dev/status": status}, ("outrider-proxy", "app")),
    )
    stale = _find(evaluate(_healthy(pods=pods)), "pods run the current configuration")
    assert stale.status == WARN
    assert "kubectl -n apps rollout restart statefulset/db" in stale.details
    assert any(d.startswith("kubectl -n apps delete pod solo") for d in stale.details)


def test_egress_mode_follows_pod_security_and_flags_an_impossible_capture() -> None:
    namespaces = {
        "open": {"outrider.dev/inject": "enabled"},
        "locked": {"outrider.dev/inject": "enabled", "pod-security.kubernetes.io/enforce": "restricted"},
        "forced": {
            "outrider.dev/inject": "enabled",
            "pod-security.kubernetes.io/enforce": "baseline",
            "outrider.dev/egress-mode": "capture",
        },
    }
    results = evaluate(_healthy(namespaces=namespaces))
    assert "egress mode capture" in _find(results, "namespace open").message
    assert "egress mode explicit" in _find(results, "namespace locked").message
    assert _find(results, "namespace forced").status == WARN


def test_pre_install_refuses_a_foreign_webhook_configuration_and_lists_missing_rights() -> None:
    foreign = {"metadata": {"name": "outrider", "labels": {}}, "webhooks": []}
    access = (
        Access("create", "", "namespaces", "", True),
        Access("create", "apps", "deployments", "outrider-system", False),
    )
    results = evaluate_pre(_healthy(webhook_config=foreign, access=access))
    assert _find(results, "no MutatingWebhookConfiguration").status == FAIL
    rights = _find(results, "can create the install's objects")
    assert rights.status == FAIL and rights.details == ("create deployments.apps in outrider-system",)


def test_missing_registration_crd_warns_and_no_selecting_one_fails() -> None:
    assert _find(evaluate(_healthy(cluster_spiffe_ids=None)), "a ClusterSPIFFEID").status == WARN
    other = ({"metadata": {"name": "x"}, "spec": {"workloadSelectorTemplates": ["k8s:container-name:app"]}},)
    assert _find(evaluate(_healthy(cluster_spiffe_ids=other)), "a ClusterSPIFFEID").status == FAIL


def test_cli_missing_kubeconfig_is_a_clear_error(tmp_path: object, capsys: object) -> None:
    from outrider.webhook.cli import main

    assert main(["check", "--kubeconfig", "/nonexistent/kubeconfig"]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "--kubeconfig /nonexistent/kubeconfig: no such file" in err and "Traceback" not in err


def test_a_pod_being_deleted_is_not_a_fault() -> None:
    """A rollout in progress: the old pod's proxy drains (unready on purpose) with the old config."""
    status = json.dumps({"configHash": "0123456789abcdef"})
    draining = PodFacts(
        "apps",
        "old",
        {},
        {"outrider.dev/status": status},
        ("outrider-proxy", "app"),
        phase="Running",
        proxy_ready=False,
        terminating=True,
    )
    results = evaluate(_healthy(pods=(draining,)))
    assert [r for r in results if r.status != PASS] == []
    same_but_alive = PodFacts(**{**draining.__dict__, "terminating": False})
    results = evaluate(_healthy(pods=(same_but_alive,)))
    assert _find(results, "outrider-proxy containers are ready").status == FAIL
    assert _find(results, "pods run the current configuration").status == WARN


def _hook(name: str, namespace: str, service: str = "outrider-webhook") -> dict[str, object]:
    return {"name": name, "clientConfig": {"service": {"name": service, "namespace": namespace}}}


def test_check_follows_the_webhook_service_to_a_release_namespace() -> None:
    mwc = {"webhooks": [_hook("inject.outrider.dev", "mcp-gate"), _hook("strict.outrider.dev", "mcp-gate")]}
    found = names_from_webhook_config(Names(), mwc)
    assert (found.namespace, found.service) == ("mcp-gate", "outrider-webhook")
    assert found.cert_secret == "outrider-webhook-certs" and found.webhook_config == "outrider"


def test_check_keeps_its_names_when_the_service_reference_is_missing_or_ambiguous() -> None:
    default = Names()
    assert names_from_webhook_config(default, None) == default
    assert names_from_webhook_config(default, {"webhooks": None}) == default
    assert (
        names_from_webhook_config(default, {"webhooks": [{"clientConfig": {"url": "https://x"}}]}) == default
    )
    assert names_from_webhook_config(default, {"webhooks": ["odd", {"clientConfig": "odd"}]}) == default
    split = {"webhooks": [_hook("a", "one"), _hook("b", "two")]}
    assert names_from_webhook_config(default, split) == default
