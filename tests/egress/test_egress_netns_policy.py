"""The policy as the webhook resolves it, enforced in a real pod namespace, then narrowed live by the file.

`plan_egress` output (operator policy ∩ `outrider.dev/egress-allow`) goes into the sidecar's config
exactly as the engine writes it; then the mounted policy file narrows it further without a restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from outrider.webhook.egress import EGRESS_ALLOW, plan_egress

from .conftest import _require_netns
from .netlab import POLICY, Lab, lab

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture
def planned_lab(tmp_path: Path) -> Iterator[tuple[Lab, Path]]:
    _require_netns()
    pod = {
        "metadata": {
            "name": "mcp",
            "namespace": "shop",
            "annotations": {EGRESS_ALLOW: "allowed.test:443 denied.test"},
        },
        "spec": {"containers": [{"name": "app"}]},
    }
    plan = plan_egress(pod, {}, POLICY, None)
    assert plan.mode == "capture" and not plan.errors
    with lab(capture=False, sidecar_config=None) as current:
        policy_file = current.workdir / "policy" / "policy.yaml"
        policy_file.parent.mkdir(mode=0o755)
        current.iptables(*plan.init_args, "--inbound-ports", "8080")
        config = {
            "egress": {
                "mode": plan.mode,
                "policy": dict(plan.policy),
                "policy_file": str(policy_file),
                "reload_interval_s": 0.2,
            }
        }
        current.start_sidecar(config)
        yield current, policy_file


def test_plan_then_live_narrowing(planned_lab: tuple[Lab, Path]) -> None:
    current, policy_file = planned_lab
    assert current.app("https", host="allowed.test")["status"] == 200
    narrowed = current.app("http", host="allowed.test")  # the annotation kept 443 only
    assert narrowed["status"] == 403 and "annotation outrider.dev/egress-allow" in narrowed["body"]
    assert not current.app("https", host="denied.test")["ok"]  # the annotation cannot add a name
    decision = current.wait_decision(name="allowed.test", allowed=True)
    assert decision["source"] == f"annotation {EGRESS_ALLOW}"

    policy_file.write_text("allow: ['*.wild.test:443']\n")  # the namespace's ConfigMap narrows further
    deadline = time.monotonic() + 10
    while current.app("https", host="allowed.test")["ok"]:
        assert time.monotonic() < deadline, "the narrowed policy file was not applied"
        time.sleep(0.2)
    policy_file.write_text("allow: [not..valid]\n")  # rejected: the last good file stays
    time.sleep(0.6)
    assert not current.app("https", host="allowed.test")["ok"]
    policy_file.write_text("allow: ['allowed.test:*']\n")  # back to the pod-spec policy, never wider
    deadline = time.monotonic() + 10
    while not current.app("https", host="allowed.test")["ok"]:
        assert time.monotonic() < deadline, "the relaxed policy file was not applied"
        time.sleep(0.2)
    assert current.app("http", host="allowed.test")["status"] == 403
