"""The injected env is what the sidecar actually accepts: OUTRIDER_CONFIG and OUTRIDER_APP_PROBES
are parsed with the sidecar's own parsers, for every golden fixture that gets injected."""

from __future__ import annotations

import copy
import json

import pytest
from webhook_support import fixture_names, load_fixture, pod_template

from outrider.webhook.offline import inject_document


def _proxy_env(name: str) -> dict[str, str] | None:
    doc, labels, config = load_fixture(name)
    result = inject_document(copy.deepcopy(doc), labels, config)
    if not result.injected:
        return None
    pod = pod_template(result.document)
    status = json.loads(pod["metadata"]["annotations"]["outrider.dev/status"])
    proxy_name = (status["initContainers"] + status["containers"])[-1]
    everything = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
    [proxy] = [c for c in everything if c["name"] == proxy_name]
    return {e["name"]: e["value"] for e in proxy["env"] if "value" in e}


INJECTED = [n for n in fixture_names() if _proxy_env(n) is not None]


def test_most_fixtures_are_injected() -> None:
    assert len(INJECTED) >= 20


@pytest.mark.parametrize("name", INJECTED)
def test_sidecar_accepts_the_injected_config(name: str) -> None:
    from outrider.sidecar.config import load

    env = _proxy_env(name)
    assert env is not None
    config = load(env={"OUTRIDER_CONFIG": env["OUTRIDER_CONFIG"]})
    raw = json.loads(env["OUTRIDER_CONFIG"])
    assert config.egress.mode == raw["egress"]["mode"]
    if "inbound" in raw:
        assert config.inbound.mcp_port == raw["inbound"]["mcp_port"]


def test_sidecar_admin_accepts_the_rewritten_probes() -> None:
    from outrider.sidecar.admin import parse_app_probes

    env = _proxy_env("named-port-probes")
    assert env is not None
    probes = parse_app_probes(env["OUTRIDER_APP_PROBES"])
    assert set(probes) == {
        "/app-health/github/livez",
        "/app-health/github/readyz",
        "/app-health/github/startupz",
    }
    readyz = probes["/app-health/github/readyz"]
    assert readyz.port == 8082 and readyz.path == "/healthz"
    assert readyz.headers == (("X-Probe", "kubelet"),) and readyz.timeout_s == 2.0
    assert probes["/app-health/github/livez"].kind == "tcp"
