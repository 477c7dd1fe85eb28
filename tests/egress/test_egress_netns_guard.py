"""`outrider iptables` refuses to change what looks like a host's network namespace (unless --force).

The refusal is proven on this machine's own namespace without ever applying a rule there: the test
first asks the guard in-process and stops if it would let the CLI through, and runs the CLI with no
iptables binary on its PATH. The "allowed" side runs in real network namespaces (tests/egress/netlab).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from outrider.sidecar.egress.netns_guard import INITIAL_NET_NS_INODE, NetnsFacts, host_reasons, read_facts

from .netlab import Lab, _run


@pytest.mark.parametrize(
    ("facts", "fragment"),
    [
        (NetnsFacts(True, True, 123, ("eth0",)), "host's init process"),
        (NetnsFacts(False, False, INITIAL_NET_NS_INODE, ("eth0",)), "initial network namespace"),
        (NetnsFacts(True, None, 123, ("eth0",)), "cannot be compared"),
        (NetnsFacts(False, None, 123, ("eth0", "eth1")), "2 interfaces up"),
    ],
)
def test_host_looking_namespaces_are_named(facts: NetnsFacts, fragment: str) -> None:
    reasons = host_reasons(facts)
    assert reasons and fragment in "; ".join(reasons)


@pytest.mark.parametrize(
    "facts",
    [
        NetnsFacts(True, False, 123, ("eth0",)),  # ip netns exec: host PID namespace, own netns
        NetnsFacts(False, True, 123, ("eth0",)),  # a pod: its PID 1 shares the pod's network
        NetnsFacts(False, None, 123, ()),  # a pod before its interface is up
    ],
)
def test_pod_looking_namespaces_pass(facts: NetnsFacts) -> None:
    assert host_reasons(facts) == []


def _host_rules() -> str:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False).stdout
    return "\n".join(line for line in out.splitlines() if "OUTRIDER" in line)


def test_cli_refuses_this_machines_namespace_and_changes_nothing() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to read the namespaces of /proc/1 or /proc/2")
    reasons = host_reasons(read_facts())
    # Never run the apply path where the guard would let it through: this is the host.
    assert reasons, "the guard does not recognise this machine's own network namespace as a host's"
    before = _host_rules()
    env = {"PATH": "/nonexistent-outrider-test", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "outrider.webhook.cli",
            "iptables",
            "--ipv6",
            "off",
            "--inbound-ports",
            "8080",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.startswith("outrider iptables: refusing to change the rules here")
    assert "--force" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert _host_rules() == before
    dry = subprocess.run(
        [sys.executable, "-m", "outrider.webhook.cli", "iptables", "--dry-run", "--ipv6", "off"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert dry.returncode == 0 and "OUTRIDER_OUTPUT" in dry.stdout  # printing is always allowed


def test_cli_applies_in_a_pod_namespace_but_not_with_a_second_interface(bare_lab: Lab) -> None:
    applied = bare_lab.iptables("--inbound-ports", "8080")
    assert "applied" in applied.stdout and "OUTRIDER_OUTPUT" in bare_lab.iptables_save()
    bare_lab.iptables("--cleanup")
    # A second interface up (a host has several; a pod one): refused, nothing applied.
    _run(
        "ip",
        "-n",
        bare_lab.pod,
        "link",
        "add",
        f"{bare_lab.tag}d",
        "type",
        "veth",
        "peer",
        "name",
        f"{bare_lab.tag}e",
    )
    _run("ip", "-n", bare_lab.pod, "link", "set", f"{bare_lab.tag}d", "up")
    refused = subprocess.run(
        bare_lab.in_pod(sys.executable, "-m", "outrider.webhook.cli", "iptables", "--inbound-ports", "8080"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 3 and "2 interfaces up besides loopback" in refused.stderr, refused.stderr
    assert f"{bare_lab.tag}d" in refused.stderr
    assert "OUTRIDER" not in bare_lab.iptables_save()
    forced = bare_lab.iptables("--inbound-ports", "8080", "--force")
    assert "applied" in forced.stdout and "OUTRIDER_OUTPUT" in bare_lab.iptables_save()
