"""Golden rule lists for `outrider iptables --dry-run` (regenerate with UPDATE_GOLDEN=1), and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
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
    assert (result.args, result.returncode, result.stdout, result.stderr) == (
        ["outrider-no-such-iptables", "-S"],
        127,
        "",
        "outrider-no-such-iptables: command not found",
    )


def test_a_failed_change_stops_apply_and_says_which_command() -> None:
    """The init container must fail (the pod does not start uncaptured) when a change is refused."""
    from subprocess import CompletedProcess

    from outrider.sidecar.egress.iptables import IptablesError, apply

    def runner(argv: object) -> CompletedProcess[str]:
        args = list(argv)  # type: ignore[call-overload]
        return CompletedProcess(args, 1, "", " permission denied (you must be root)\n")

    with pytest.raises(IptablesError) as refused:
        apply(CASES["default"], runner)
    assert str(refused.value) == (
        "iptables -w -t nat -N OUTRIDER_REDIRECT failed: permission denied (you must be root)"
    )


def test_apply_and_cleanup_with_a_recording_runner() -> None:
    from subprocess import CompletedProcess

    from outrider.sidecar.egress.iptables import apply, cleanup

    calls: list[list[str]] = []

    def runner(argv: object) -> CompletedProcess[str]:
        args = list(argv)  # type: ignore[call-overload]
        calls.append(args)
        # Nothing exists yet: every -S/-C fails, every change succeeds (and nothing else is asked).
        op = args[4]
        assert op in ("-S", "-C", "-N", "-A"), args
        return CompletedProcess(args, 1 if op in ("-S", "-C") else 0, "", "")

    changes = apply(CASES["default"], runner)
    assert sorted(changes) == sorted(plan_rules(CASES["default"]))  # the same rules, jumps last
    assert cleanup(CASES["default"], runner) == []  # nothing there: nothing removed


# -- apply/cleanup against the real iptables, in a throw-away network namespace ------------------------


@pytest.fixture
def netns_runner() -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """`iptables`/`ip6tables` run inside a fresh network namespace of this test's own (never the host's)."""
    from outrider.sidecar.egress.iptables import run_command

    from .netlab import have_netns

    reason = have_netns()
    if reason is not None:
        pytest.skip(f"needs root and network namespaces: {reason}")
    name = f"outrider-ipt-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)

    def runner(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return run_command(["ip", "netns", "exec", name, *argv])

    try:
        yield runner
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def _tables(runner: Callable[..., subprocess.CompletedProcess[str]]) -> list[str]:
    """Every rule and chain of both families, as `-S` prints them (our comments included)."""
    lines: list[str] = []
    for tool in ("iptables", "ip6tables"):
        for table in ("nat", "filter"):
            listing = runner([tool, "-w", "-t", table, "-S"])
            assert listing.returncode == 0, listing.stderr
            lines += [f"{tool} {table} {line}" for line in listing.stdout.splitlines()]
    return lines


@pytest.mark.root
def test_apply_and_cleanup_in_a_real_namespace(
    netns_runner: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """What the init container does: the tables end up holding exactly the plan, a second run changes
    nothing, drift (an extra, a missing or a changed rule, a lost jump) is repaired, cleanup leaves
    the tables as they were."""
    _apply_repair_and_clean_up(netns_runner)


def test_apply_and_cleanup_against_a_model_of_iptables() -> None:
    """The same story against `TablesModel` (no root, milliseconds): the cheap first check of what
    `apply` and `cleanup` decide; the real iptables above is the one that counts."""
    from outrider.sidecar.egress.iptables import apply

    model = TablesModel()
    _apply_repair_and_clean_up(model)
    assert not model.refused, model.refused  # every command the code sent made sense
    # without IPv6 (no ip6tables chains at all) a drifted IPv4 chain is still flushed, not created again
    options = CaptureOptions(dns_servers=("10.96.0.10",), ipv6="off")
    apply(options, model)
    assert model(["iptables", "-w", "-t", "nat", "-A", "OUTRIDER_OUTPUT", "-j", "RETURN"]).returncode == 0
    assert apply(options, model)[0] == "iptables -t nat -F OUTRIDER_OUTPUT"
    assert not model.refused, model.refused


class TablesModel:
    """A stand-in for `iptables`/`ip6tables -w -t TABLE` in a fresh network namespace: chains of rules
    per tool and table, with the answers (exit code, `-S` listing) the code reads. A rule is its
    arguments as given; a jump to a chain that does not exist, deleting a chain that is not empty or
    still jumped to, or a missing rule or chain is refused (exit code 1), as iptables does."""

    BUILT_IN = {
        "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
        "filter": ("INPUT", "FORWARD", "OUTPUT"),
    }
    TARGETS = {"RETURN", "REDIRECT", "DROP", "ACCEPT", "REJECT"}

    def __init__(self) -> None:
        self.chains: dict[tuple[str, str], dict[str, list[tuple[str, ...]]]] = {}
        self.refused: list[list[str]] = []

    def _table(self, tool: str, table: str) -> dict[str, list[tuple[str, ...]]]:
        return self.chains.setdefault((tool, table), {name: [] for name in self.BUILT_IN[table]})

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        args = list(argv)
        tool, rest = args[0], [a for a in args[1:] if a != "-w"]
        assert tool in ("iptables", "ip6tables") and rest[0] == "-t", args
        chains = self._table(tool, rest[1])
        op, name, spec = rest[2], (rest[3] if len(rest) > 3 else None), tuple(rest[4:])

        def answer(ok: bool, out: str = "") -> subprocess.CompletedProcess[str]:
            if not ok and op != "-C" and not (op == "-S" and name is not None):
                self.refused.append(args)
            return subprocess.CompletedProcess(args, 0 if ok else 1, out, "" if ok else "refused")

        def listing(chain: str) -> list[str]:
            head = f"-P {chain} ACCEPT" if chain in self.BUILT_IN[rest[1]] else f"-N {chain}"
            return [head, *(" ".join(["-A", chain, *rule]) for rule in chains[chain])]

        def target_exists(rule: tuple[str, ...]) -> bool:
            target = rule[rule.index("-j") + 1] if "-j" in rule else None
            return target is None or target in self.TARGETS or target in chains

        if op == "-S":
            if name is None:
                return answer(True, "".join(f"{line}\n" for chain in chains for line in listing(chain)))
            return answer(
                name in chains, "".join(f"{line}\n" for line in listing(name)) if name in chains else ""
            )
        if name not in chains and op != "-N":
            return answer(False)
        if op == "-N":
            if name in chains:
                return answer(False)
            chains[name] = []
            return answer(True)
        rules = chains[name]
        if op == "-C":
            return answer(spec in rules)
        if op == "-A":
            if not target_exists(spec):
                return answer(False)
            rules.append(spec)
            return answer(True)
        if op == "-I":
            position, spec = (int(spec[0]), spec[1:]) if spec and spec[0].isdigit() else (1, spec)
            rules.insert(position - 1, spec)
            return answer(True)
        if op == "-D":
            if len(spec) == 1 and spec[0].isdigit():
                index = int(spec[0]) - 1
                if not 0 <= index < len(rules):
                    return answer(False)
                del rules[index]
                return answer(True)
            if spec not in rules:
                return answer(False)
            rules.remove(spec)
            return answer(True)
        if op == "-F":
            rules.clear()
            return answer(True)
        if op == "-X":
            jumped_to = any("-j" in r and r[r.index("-j") + 1] == name for c in chains.values() for r in c)
            if rules or jumped_to or name in self.BUILT_IN[rest[1]]:
                return answer(False)
            del chains[name]
            return answer(True)
        raise AssertionError(f"the model does not know {op}: {args}")


def _apply_repair_and_clean_up(run: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    from outrider.sidecar.egress.iptables import apply, cleanup

    options = CASES["inbound-dns-exclude"]
    empty = _tables(run)
    changes = apply(options, run)
    assert sorted(changes) == sorted(plan_rules(options))
    installed = _tables(run)
    ours = [line for line in installed if line not in empty]
    assert sum(1 for line in ours if " -A " in line) == sum(1 for r in plan_rules(options) if " -A " in r)
    assert apply(options, run) == [] and _tables(run) == installed  # idempotent

    # An extra rule in one of our chains: that chain (only) is flushed and written again.
    assert run(["iptables", "-w", "-t", "nat", "-I", "OUTRIDER_OUTPUT", "1", "-j", "RETURN"]).returncode == 0
    repaired = apply(options, run)
    assert repaired[0] == "iptables -t nat -F OUTRIDER_OUTPUT"
    assert all("OUTRIDER_OUTPUT" in line for line in repaired) and _tables(run) == installed
    # A missing rule (same count of rules is not enough: each one must be there).
    assert run(["ip6tables", "-w", "-t", "nat", "-D", "OUTRIDER_OUTPUT", "1"]).returncode == 0
    assert run(["ip6tables", "-w", "-t", "nat", "-I", "OUTRIDER_OUTPUT", "1", "-j", "RETURN"]).returncode == 0
    assert apply(options, run)[0] == "ip6tables -t nat -F OUTRIDER_OUTPUT" and _tables(run) == installed
    # A lost jump from a built-in chain comes back alone.
    output = run(["iptables", "-w", "-t", "nat", "-S", "OUTPUT"]).stdout.splitlines()
    position = next(i for i, line in enumerate(output) if "-j OUTRIDER_OUTPUT" in line)  # line 0 is -P
    assert run(["iptables", "-w", "-t", "nat", "-D", "OUTPUT", str(position)]).returncode == 0
    jump = next(line for line in plan_rules(options) if line.startswith("iptables -t nat -A OUTPUT "))
    assert apply(options, run) == [jump] and _tables(run) == installed

    # A doubled jump (a second init container run by hand) is removed too; then nothing is left.
    prerouting = next(
        line for line in plan_rules(options) if line.startswith("iptables -t nat -A PREROUTING ")
    )
    doubled = prerouting.replace("-A PREROUTING", "-w -I PREROUTING 1").split(' -m comment --comment "')[0]
    comment = prerouting.split('--comment "')[1].rstrip('"')
    assert run([*doubled.split(), "-m", "comment", "--comment", comment]).returncode == 0
    removed = cleanup(CaptureOptions(), run)
    assert any(line.startswith("iptables -t nat -X ") for line in removed)
    assert removed.count(prerouting.replace(" -A ", " -D ", 1)) == 2  # the doubled jump, said twice
    assert _tables(run) == empty
    assert cleanup(CaptureOptions(), run) == []

    # drop mode: its own filter chain, and cleanup with default options still finds it.
    apply(CASES["ipv6-drop"], run)
    assert any("OUTRIDER_V6_DROP" in line for line in _tables(run))
    assert "ip6tables -t filter -X OUTRIDER_V6_DROP" in cleanup(CaptureOptions(), run)
    assert _tables(run) == empty


def test_resolv_conf_nameservers_in_process(tmp_path: Path) -> None:
    """The DNS servers the init container lets through: addresses only, zone ids dropped, in order."""
    from outrider.sidecar.egress.iptables import resolv_conf_nameservers

    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# comment\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver\nnameserver bogus\n"
        "nameserver fe80::1%eth0 extra\noptions ndots:5\n  nameserver 192.0.2.1\nNAMESERVER 192.0.2.2\n"
    )
    assert resolv_conf_nameservers(resolv) == ["10.96.0.10", "fe80::1", "192.0.2.1"]
    assert resolv_conf_nameservers(tmp_path / "missing") == []


def test_ipv6_off_writes_no_ip6tables_rule_and_drop_only_drops() -> None:
    """`off` (no ip6tables in the pod): nothing for ip6tables at all, or the init container would fail.
    `drop`: IPv6 is not captured, so its only IPv6 rules are the loopback exception and the drop."""
    off = plan_rules(CaptureOptions(dns_servers=("10.96.0.10", "fd00::a"), ipv6="off"))
    assert off and not [line for line in off if line.startswith("ip6tables")]
    assert off == [line for line in plan_rules(CASES["default"]) if line.startswith("iptables")]
    drop = [line for line in plan_rules(CASES["ipv6-drop"]) if line.startswith("ip6tables")]
    assert [line.split(" -m comment")[0] for line in drop if " -A " in line] == [
        "ip6tables -t filter -A OUTRIDER_V6_DROP -o lo -j RETURN",
        "ip6tables -t filter -A OUTRIDER_V6_DROP -j DROP",
        "ip6tables -t filter -A OUTPUT -j OUTRIDER_V6_DROP",
    ]


def test_exclusions_and_dns_servers_are_normalised_once_each() -> None:
    """A range with host bits is its network (not refused), a /31 stays a range (both of its addresses
    are excluded, not one), a /32 is the bare address, and a value given twice is one rule."""
    options = CaptureOptions(
        dns_servers=("10.96.0.10", "10.96.0.10", "fd00::a", "fd00:0::a"),
        exclude_cidrs=("10.1.2.3/16", "10.1.0.0/16", "192.0.2.0/31", "198.51.100.7/32", "fd00:1::5/64"),
    )
    rules = [line.split(" -m comment")[0] for line in plan_rules(options) if " -A OUTRIDER_OUTPUT " in line]
    v4 = " ".join(line for line in rules if line.startswith("iptables "))
    v6 = " ".join(line for line in rules if line.startswith("ip6tables "))
    for text, count in (("-d 10.1.0.0/16 ", 1), ("-d 192.0.2.0/31 ", 1), ("-d 198.51.100.7 ", 1)):
        assert (v4 + " ").count(text) == count, (text, v4)
    assert "10.1.2.3" not in v4 and "/32" not in v4
    assert (v6 + " ").count("-d fd00:1::/64 ") == 1
    single = [
        line.split(" -m comment")[0] for line in plan_rules(CaptureOptions(dns_servers=("10.96.0.10",)))
    ]
    doubled = [
        line.split(" -m comment")[0] for line in plan_rules(CaptureOptions(dns_servers=("10.96.0.10",) * 2))
    ]
    assert doubled == single
    six = [
        line.split(" -m comment")[0]
        for line in plan_rules(CaptureOptions(dns_servers=("fd00::a", "fd00:0::a")))
    ]
    assert six == [
        line.split(" -m comment")[0] for line in plan_rules(CaptureOptions(dns_servers=("fd00::a",)))
    ]


def test_ipv6_is_probed_only_when_the_kernel_has_it_on(tmp_path: Path) -> None:
    """`--ipv6 auto`: IPv6 rules are written only when the kernel has IPv6 (its address list exists and
    it is not disabled) and ip6tables can reach its nat table; the probe runs only then."""
    from subprocess import CompletedProcess

    from outrider.sidecar.egress.iptables import ipv6_available

    calls: list[list[str]] = []

    def answering(code: int) -> Callable[[Sequence[str]], CompletedProcess[str]]:
        def runner(argv: Sequence[str]) -> CompletedProcess[str]:
            calls.append(list(argv))
            return CompletedProcess(list(argv), code, "", "")

        return runner

    proc = tmp_path / "proc"
    assert ipv6_available(answering(0), proc) is False and calls == []  # no IPv6 in the kernel
    (proc / "net").mkdir(parents=True)
    (proc / "net" / "if_inet6").write_text("")
    assert ipv6_available(answering(0), proc) is False and calls == []  # its switch cannot be read
    switch = proc / "sys" / "net" / "ipv6" / "conf" / "all" / "disable_ipv6"
    switch.parent.mkdir(parents=True)
    switch.write_text("1\n")
    assert ipv6_available(answering(0), proc) is False and calls == []  # switched off
    switch.write_text("0\n")
    assert ipv6_available(answering(0), proc) is True
    assert calls == [["ip6tables", "-w", "-t", "nat", "-S", "OUTPUT"]]
    assert ipv6_available(answering(3), proc) is False  # no ip6tables nat table (or no ip6tables)
    # the real /proc of this machine, asked through a runner that says yes
    on = Path("/proc/net/if_inet6").exists() and (
        Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip() != "1"
    )
    assert ipv6_available(answering(0)) is on
