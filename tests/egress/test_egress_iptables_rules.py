"""Golden rule lists for `outrider iptables --dry-run` (regenerate with UPDATE_GOLDEN=1), and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from outrider.sidecar.egress.iptables import CaptureOptions, plan_rules

GOLDEN = Path(__file__).parent / "testdata"

CASES = {
    "default": CaptureOptions(dns_servers=("10.96.0.10",)),
    "inbound-dns-exclude": CaptureOptions(
        inbound_ports=(8080,),
        dns_servers=("10.96.0.10", "fd00:10:96::a"),
        exclude_cidrs=("10.1.0.0/16", "fd00:1::/64"),
        exclude_ports=(5432,),
    ),
    "ipv6-drop": CaptureOptions(inbound_ports=(3000,), dns_servers=("169.254.20.10",), ipv6="drop"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_rules(name: str, update_golden: bool) -> None:
    rendered = "\n".join(plan_rules(CASES[name])) + "\n"
    path = GOLDEN / f"iptables-{name}.txt"
    if update_golden:
        path.write_text(rendered)
    assert path.exists(), f"no golden rule list for {name}; run UPDATE_GOLDEN=1 pytest tests/egress"
    assert rendered == path.read_text()


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_rule_names_outrider(name: str) -> None:
    for line in plan_rules(CASES[name]):
        assert " -N " in line or '--comment "outrider: ' in line, line


def test_rule_order_sidecar_and_loopback_return_before_redirect() -> None:
    lines = [line for line in plan_rules(CASES["inbound-dns-exclude"]) if "-A OUTRIDER_OUTPUT" in line]
    v4 = [line for line in lines if line.startswith("iptables ")]
    assert "--uid-owner 15337 -j RETURN" in v4[0] and v4[-1].split(" -m comment")[0].endswith(
        "-j OUTRIDER_REDIRECT"
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outrider.webhook.cli", "iptables", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_cli_dry_run_reads_resolv_conf_and_flags(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search svc.cluster.local\nnameserver 10.96.0.10\nnameserver bogus\n")
    result = _cli("--dry-run", "--resolv-conf", str(resolv), "--dns-server", "192.0.2.53", "--ipv6", "drop")
    assert result.returncode == 0, result.stderr
    assert "-d 10.96.0.10 -p udp --dport 53 -j RETURN" in result.stdout
    assert "-d 192.0.2.53 -p udp --dport 53 -j RETURN" in result.stdout
    assert "ip6tables -t filter -A OUTRIDER_V6_DROP -j DROP" in result.stdout


def test_cli_rejects_bad_input(tmp_path: Path) -> None:
    result = _cli("--dry-run", "--resolv-conf", str(tmp_path / "none"), "--exclude-cidr", "10.0.0.0/99")
    assert result.returncode == 2 and "outrider iptables" in result.stderr


def test_missing_tool_is_a_failed_command_not_a_crash() -> None:
    from outrider.sidecar.egress.iptables import run_command

    result = run_command(["outrider-no-such-iptables", "-S"])
    assert result.returncode == 127 and "not found" in result.stderr


def test_apply_and_cleanup_with_a_recording_runner() -> None:
    from subprocess import CompletedProcess

    from outrider.sidecar.egress.iptables import apply, cleanup

    calls: list[list[str]] = []

    def runner(argv: object) -> CompletedProcess[str]:
        args = list(argv)  # type: ignore[call-overload]
        calls.append(args)
        # Nothing exists yet: every -S/-C fails, every change succeeds.
        return CompletedProcess(args, 1 if ("-S" in args or "-C" in args) else 0, "", "")

    changes = apply(CASES["default"], runner)
    assert sorted(changes) == sorted(plan_rules(CASES["default"]))  # the same rules, jumps last
    assert cleanup(CASES["default"], runner) == []  # nothing there: nothing removed
