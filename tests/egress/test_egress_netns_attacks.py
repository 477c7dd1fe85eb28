"""Red-team attacks in real network namespaces: capture bypasses and hostile names, against the real rules.

A hostile app (UID 1000, or root where the attack needs NET_RAW) tries to get bytes to places the
policy does not allow; every test checks what the internet actually received (hit log / a raw watcher).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import _require_netns
from .netlab import (
    ALLOWED_V4,
    CIDR_HOST_V4,
    DENIED_V4,
    DENIED_V6,
    DNS_LISTED,
    DNS_UNLISTED,
    HERE,
    META_V4,
    POLICY,
    PYTHON,
    SIDECAR_UID,
    Lab,
    lab,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

SECRET_PORT = 8081  # a pod-local service on loopback that no outside name may lead to
ATTACK_POLICY = {
    "allow": [
        *POLICY["allow"],
        "meta.test",
        "mapped.test",
        "rebind.test",
        "aliased.test",
        f"loop.test:{SECRET_PORT}",
    ]
}


@pytest.fixture(scope="module")
def attack_lab() -> Iterator[Lab]:
    _require_netns()
    with lab(capture=True, sidecar_config=None) as current:
        # `spec.hostAliases` (app-team owned) lands in the pod's shared /etc/hosts; so does whatever a
        # root app writes there. `ip netns exec` mounts this file over /etc/hosts for every pod process.
        (Path("/etc/netns") / current.pod / "hosts").write_text(
            f"127.0.0.1 localhost\n{DENIED_V4} aliased.test\n"
        )
        config = {
            "egress": {
                "mode": "capture",
                "policy": ATTACK_POLICY,
                "policy_file": str(current.workdir / "narrow.yaml"),
                "reload_interval_s": 0.1,
                "hello_timeout_s": 1.0,
                "dns_cache_s": 0,
            }
        }
        current.start_sidecar(config)
        yield current


def no_hits(lab_: Lab, ip: str) -> bool:
    return lab_.hits(ip=ip) == []


def test_run_as_group_15337_is_still_captured(attack_lab: Lab) -> None:
    # `--gid-owner` matches the primary GID: with a GID exemption, runAsGroup 15337 left uncaptured.
    for gid, groups in ((SIDECAR_UID, ()), (1000, (SIDECAR_UID,)), (SIDECAR_UID, (SIDECAR_UID, 1000))):
        result = attack_lab.app("http", host="denied.test", ip=DENIED_V4, gid=gid, groups=groups)
        assert result["status"] == 403, (gid, groups, result)
    assert no_hits(attack_lab, DENIED_V4)
    assert "--gid-owner" not in attack_lab.iptables_save()


def _watch(lab_: Lab, marker: str) -> subprocess.Popen[str]:
    argv = ["ip", "netns", "exec", lab_.net, PYTHON, str(HERE / "raw_probe.py"), "watch", "1.5", marker]
    watcher = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert watcher.stdout is not None and '"ready"' in watcher.stdout.readline()
    return watcher


@pytest.mark.parametrize("flags", ["R", "SF", "FPU", "A", "PA"])
def test_hand_made_tcp_segments_never_leave_the_pod(attack_lab: Lab, flags: str) -> None:
    # Root in the app container has NET_RAW by default. Segments that conntrack calls INVALID (a lone
    # RST, SYN+FIN) skip the nat table, so before the OUTRIDER_TCP chain they left unredirected.
    assert not _send_raw(attack_lab, flags, f"EXFIL-{flags}-{time.monotonic_ns()}")


def _send_raw(lab_: Lab, flags: str, marker: str) -> bool:
    """Root in the pod sends one hand-made segment to DENIED_V4:7000; True when the internet saw it."""
    watcher = _watch(lab_, marker)
    argv = [PYTHON, str(HERE / "raw_probe.py"), "send", DENIED_V4, "7000", flags, marker]
    sent = subprocess.run(lab_.in_pod(*argv), capture_output=True, text=True, timeout=30, check=False)
    assert '"sent"' in sent.stdout, sent.stderr  # sent, or refused locally with EPERM by a DROP rule
    out, _ = watcher.communicate(timeout=10)
    seen: bool = json.loads(out.strip().splitlines()[-1])["seen"]
    return seen


def test_invalid_tcp_segments_leave_without_the_rules_and_not_with_them(bare_lab: Lab) -> None:
    # The control for the test above: the watcher does see such segments when nothing stops them.
    assert _send_raw(bare_lab, "R", f"before-{time.monotonic_ns()}")
    bare_lab.iptables("--ipv6", "capture")
    assert not _send_raw(bare_lab, "R", f"after-{time.monotonic_ns()}")
    assert not _send_raw(bare_lab, "SF", f"after-{time.monotonic_ns()}")
    bare_lab.iptables("--cleanup")


def test_metadata_address_is_denied_by_ip_and_by_name(attack_lab: Lab) -> None:
    direct = attack_lab.app("http", ip=META_V4)
    assert direct["status"] == 403
    by_name = attack_lab.app("http", host="meta.test")  # an allowed name whose DNS points at metadata
    assert by_name["status"] == 502
    mapped = attack_lab.app("http", host="mapped.test", ip=ALLOWED_V4)  # AAAA ::ffff:169.254.169.254
    assert mapped["status"] == 502
    decision = attack_lab.wait_decision(name="meta.test", allowed=False)
    assert "no address of meta.test" in decision["reason"]
    assert no_hits(attack_lab, META_V4)


def test_dns_rebinding_to_metadata_never_reaches_it(attack_lab: Lab) -> None:
    # rebind.test answers the metadata address and an allowed one in turn (dns_cache_s is 0 here).
    for _ in range(4):
        result = attack_lab.app("http", host="rebind.test", ip=ALLOWED_V4)
        assert result["status"] in (200, 502), result
        if result["status"] == 200:
            assert json.loads(result["body"])["served_by"] == ALLOWED_V4
    assert no_hits(attack_lab, META_V4)


def test_a_name_cannot_lead_to_the_pods_own_loopback(attack_lab: Lab) -> None:
    secret = attack_lab.popen_in_pod(PYTHON, "-m", "http.server", str(SECRET_PORT), "--bind", "127.0.0.1")
    log = Path(attack_lab.workdir / f"process-{len(attack_lab.processes) - 1}.err")
    deadline = time.monotonic() + 10
    while not attack_lab.app("http", ip="127.0.0.1", port=SECRET_PORT).get("ok"):  # up (loopback: direct)
        assert time.monotonic() < deadline, "the loopback service did not start"
        time.sleep(0.1)
    served = log.read_text().count('"GET / HTTP/1.1"')
    result = attack_lab.app("http", host="loop.test", ip=ALLOWED_V4, port=SECRET_PORT)
    assert result["status"] == 502
    assert log.read_text().count('"GET / HTTP/1.1"') == served
    secret.terminate()


def test_dns_over_tcp_to_an_unlisted_resolver_is_judged_like_any_tcp(attack_lab: Lab) -> None:
    assert not attack_lab.app("tcp", ip=DNS_UNLISTED, port=53)["ok"]
    attack_lab.wait_decision(destination_ip=DNS_UNLISTED, destination_port=53, allowed=False)
    before = len(attack_lab.decisions(destination_ip=DNS_LISTED))
    attack_lab.app("tcp", ip=DNS_LISTED, port=53)  # the pod resolver: left uncaptured by design
    assert len(attack_lab.decisions(destination_ip=DNS_LISTED)) == before


def test_a_captured_app_using_the_listener_as_a_proxy_gets_the_same_allowlist(attack_lab: Lab) -> None:
    for proxy in ("http://127.0.0.1:15001", "http://[::1]:15001"):
        denied = attack_lab.app("https", host="denied.test", proxy=proxy)
        assert not denied["ok"] and "403" in denied["error"]
        allowed = attack_lab.app("https", host="allowed.test", proxy=proxy)
        assert allowed["status"] == 200
    alias = attack_lab.app("http", ip="127.0.0.2", port=15001, host="denied.test")
    assert not alias["ok"] and "Refused" in alias["error"]  # only 127.0.0.1 and ::1 listen
    assert no_hits(attack_lab, DENIED_V4) and attack_lab.hits(ip=DENIED_V6) == []


def test_ipv4_mapped_destinations_are_captured_and_judged_as_ipv4(attack_lab: Lab) -> None:
    assert attack_lab.app("http", host="denied.test", ip=f"::ffff:{DENIED_V4}")["status"] == 403
    echoed = attack_lab.app("tcp", ip=f"::ffff:{CIDR_HOST_V4}", port=7000)  # a CIDR rule allows it
    assert echoed["ok"] and echoed["data"].startswith(f"hello from {CIDR_HOST_V4}:7000")
    assert no_hits(attack_lab, DENIED_V4)


@pytest.mark.parametrize(
    "head",
    [
        "GET / HTTP/1.1\\r\\nHost: allowed.test\\r\\nHost: denied.test\\r\\n\\r\\n",
        "GET / HTTP/1.1\\r\\nHost: denied.test@allowed.test\\r\\n\\r\\n",
        "GET / HTTP/1.0\\r\\n\\r\\n",
        "GET http://denied.test/ HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n",
    ],
)
def test_ambiguous_or_missing_http_names_are_refused(attack_lab: Lab, head: str) -> None:
    result = attack_lab.app("raw", ip=DENIED_V4, port=80, data=head)
    assert result["status"] == 403, result
    assert no_hits(attack_lab, DENIED_V4)


def test_a_narrowing_cidr_layer_cannot_widen_a_name_rule(attack_lab: Lab) -> None:
    # The pod spec allows the *name* allowed.test; the narrowing file only the range holding DENIED_V4.
    # A forged SNI allowed.test sent to DENIED_V4 matches both layers, yet DENIED_V4 is no address of
    # allowed.test, and allowed.test's own addresses are outside the file's range: refused.
    narrow = attack_lab.workdir / "narrow.yaml"
    narrow.write_text("allow: ['10.200.1.16/28:443']\n")
    try:
        deadline = time.monotonic() + 10
        while attack_lab.app("http", host="allowed.test").get("status") != 403:  # the file took effect
            assert time.monotonic() < deadline, "the narrowing file was not reloaded"
            time.sleep(0.1)
        forged = attack_lab.app("https", host="allowed.test", ip=DENIED_V4, sni="allowed.test")
        assert not forged["ok"]
        assert no_hits(attack_lab, DENIED_V4)
        decision = attack_lab.wait_decision(name="allowed.test", destination_port=443, allowed=False)
        assert "no address of allowed.test" in decision["reason"]
    finally:
        narrow.unlink()
    deadline = time.monotonic() + 10
    while attack_lab.app("http", host="allowed.test").get("status") != 200:
        assert time.monotonic() < deadline, "removing the narrowing file was not picked up"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def explicit_attack_lab() -> Iterator[Lab]:
    _require_netns()
    config = {"egress": {"mode": "explicit", "policy": ATTACK_POLICY, "policy_file": None, "dns_cache_s": 0}}
    with lab(capture=False, sidecar_config=config) as current:
        yield current


def test_explicit_proxy_refuses_metadata_by_name_literal_and_mapped_literal(explicit_attack_lab: Lab) -> None:
    proxy = "http://127.0.0.1:15001"
    by_name = explicit_attack_lab.app("http", host="meta.test", proxy=proxy)
    assert by_name["status"] == 502
    tunnel = explicit_attack_lab.app("https", host="meta.test", proxy=proxy)
    assert not tunnel["ok"] and "502" in tunnel["error"]
    for literal in (META_V4, f"::ffff:{META_V4}", "0.0.0.0"):
        assert explicit_attack_lab.app("http", ip=literal, proxy=proxy)["status"] == 403, literal
    for _ in range(3):  # rebinding between the metadata address and an allowed one
        assert explicit_attack_lab.app("http", host="rebind.test", proxy=proxy)["status"] in (200, 502)
    assert no_hits(explicit_attack_lab, META_V4)


def test_binding_to_lo_or_another_source_address_does_not_escape(attack_lab: Lab) -> None:
    # `-o lo` is exempt from capture; an app that forces its socket onto lo (SO_BINDTODEVICE needs no
    # privilege on an unbound socket) must still not get out, even with forwarding on in the pod.
    forwarding = ["ip", "netns", "exec", attack_lab.pod, "sysctl", "-qw"]
    subprocess.run([*forwarding, "net.ipv4.ip_forward=1"], check=True)
    try:
        for uid in (1000, 0):
            on_lo = attack_lab.app("http", host="denied.test", ip=DENIED_V4, device="lo", uid=uid)
            assert not on_lo["ok"], on_lo
    finally:
        subprocess.run([*forwarding, "net.ipv4.ip_forward=0"], check=True)
    from_loopback = attack_lab.app("http", host="denied.test", ip=DENIED_V4, source="127.0.0.1")
    assert from_loopback.get("status") != 200, from_loopback
    from_pod_ip = attack_lab.app("http", host="denied.test", ip=DENIED_V4, source="10.200.0.2")
    assert from_pod_ip["status"] == 403  # captured like any other socket
    assert no_hits(attack_lab, DENIED_V4)


def test_host_aliases_cannot_choose_the_address_of_an_allowed_name(attack_lab: Lab) -> None:
    # The app resolves aliased.test to DENIED_V4 through /etc/hosts and connects there; the enforcer
    # asks DNS itself (never /etc/hosts), so the connection lands on the name's real address.
    result = attack_lab.app("http", host="aliased.test")
    assert result["status"] == 200 and json.loads(result["body"])["served_by"] == ALLOWED_V4
    decision = attack_lab.wait_decision(name="aliased.test", allowed=True)
    assert f"{DENIED_V4} is not an address of aliased.test" in decision["reason"]
    assert no_hits(attack_lab, DENIED_V4)
