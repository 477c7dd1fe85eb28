"""Pure parts of webhook/cluster: ConfigMap parsing and option parsing (no cluster needed)."""

from __future__ import annotations

import argparse

import pytest

from outrider.webhook.cluster.configmap import parse_configmap
from outrider.webhook.cluster.options import ClusterOptions
from outrider.webhook.config import ConfigError


def test_configmap_with_both_keys() -> None:
    parsed = parse_configmap(
        {
            "config.yaml": "sidecar_image: r.example/o:1\n",
            "namespace-egress.yaml": "team: {allow: [a.example]}\n",
        }
    )
    assert parsed.webhook.sidecar_image == "r.example/o:1"
    assert parsed.namespace_egress == {"team": {"allow": ["a.example"]}}


def test_empty_configmap_is_the_default_config() -> None:
    assert parse_configmap({}).webhook.sidecar_image == parse_configmap(None).webhook.sidecar_image


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"config.yml": "x: 1"}, "unknown key(s) ['config.yml']"),
        ({"config.yaml": "[1, 2]"}, "must be a mapping"),
        ({"config.yaml": "a: [b"}, "not valid YAML"),
        ({"config.yaml": "image_pull_policy: Sometimes"}, "image_pull_policy"),
        ({"namespace-egress.yaml": "team: [a]"}, "namespace-egress.yaml"),
    ],
)
def test_bad_configmaps_name_the_problem(data: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_configmap(data)
    assert needle in str(err.value)


def test_options_from_cli_and_environment() -> None:
    args = argparse.Namespace(
        kubeconfig="/k",
        in_cluster=False,
        namespace="ns",
        webhook_config_name="w",
        cert_mode=None,
        config_map="cm",
    )
    opts = ClusterOptions.from_args(
        args,
        {
            "POD_NAME": "p-1",
            "POD_UID": "u-1",
            "OUTRIDER_CERT_VALIDITY_SECONDS": "300",
            "OUTRIDER_CERT_EXTRA_SANS": "127.0.0.1, x",
        },
    )
    assert (opts.kubeconfig, opts.namespace, opts.webhook_config_name, opts.config_map) == (
        "/k",
        "ns",
        "w",
        "cm",
    )
    assert opts.cert_mode == "self-managed" and (opts.pod_name, opts.pod_uid) == ("p-1", "u-1")
    assert opts.cert_validity_seconds == 300 and opts.cert_renew_before_seconds == 100
    assert opts.extra_sans == ("127.0.0.1", "x")


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"OUTRIDER_CLUSTER_SYNC_SECONDS": "soon"}, "OUTRIDER_CLUSTER_SYNC_SECONDS"),
        ({"OUTRIDER_CA_SETTLE_SECONDS": "-1"}, "positive"),
        ({"OUTRIDER_CERT_VALIDITY_SECONDS": "10", "OUTRIDER_CERT_RENEW_BEFORE_SECONDS": "20"}, "shorter"),
    ],
)
def test_bad_tuning_is_refused(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ClusterOptions.from_args(argparse.Namespace(), env)
