"""The gate the inbound proxy calls, in-process with the in-memory rate-limit store: one verdict per
message of a body (invalid, denied, limited, allowed), the answer sent instead, what is forwarded, and the
counters /metrics shows. The same gate through the real inbound path: tests/inbound/test_policy_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from outrider.sidecar.config_error import ConfigError
from outrider.sidecar.inbound.jsonrpc import parse_body
from outrider.sidecar.policy import engine as engine_module
from outrider.sidecar.policy import gate as gate_module
from outrider.sidecar.policy.answers import denied_error, limited_error
from outrider.sidecar.policy.config import PolicyConfig
from outrider.sidecar.policy.gate import Gate, forwarded_document, refusal_body, refused_errors, reload_loop
from outrider.sidecar.policy.model import Server
from outrider.sidecar.telemetry.observer import Principal

SERVER = Server.from_facts("spiffe://example.org/ns/tools/sa/issues", None, "pod-1")
ALICE = Principal("oidc", "alice", "https://idp")
CEDAR = """
@id("echo") permit(principal, action == Action::"call_tool", resource == Tool::"echo");
@id("lists") permit(principal, action == Action::"list_tools", resource);
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def call(msg_id: int, tool: str) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": tool, "arguments": {}}}


def gate(**policy: object) -> Gate:
    return Gate.from_config(PolicyConfig.from_mapping({"file": None, **policy}), lambda: SERVER)


async def test_one_verdict_per_message_and_the_answers_sent_instead() -> None:
    g = gate(cedar=CEDAR, rate_limits={"per_user": "2/minute"})
    assert g.active
    body = json.dumps(
        [call(1, "echo"), call(2, "rm"), {"nope": 1}, call(3, "echo"), call(4, "echo")]
    ).encode()
    parsed = parse_body(body)
    judgement = await g.judge(ALICE, parsed, "streamable-http")
    outcomes = [(v.forward, v.outcome) for v in judgement.verdicts]
    assert outcomes == [
        (True, "ok"),
        (False, "denied"),
        (False, "invalid"),
        (True, "ok"),
        (False, "limited"),
    ]
    ok, denied, invalid, _, limited = judgement.verdicts
    assert (
        ok.decision is not None and ok.decision.policies == ("echo",) and ok.reason == "permitted by policy"
    )
    assert (
        denied.error == denied_error(2)
        and denied.reason == "no policy in sidecar config policy.cedar permits this call"
    )
    assert invalid.reason == "not a JSON-RPC message; refused unjudged"
    assert limited.retry_after_s > 0 and limited.error == limited_error(4, limited.retry_after_s)
    assert (
        limited.reason == f"rate limit {limited.limit_scope} exceeded; retry after {limited.retry_after_s} s"
    )
    assert judgement.refused and not judgement.nothing_to_forward
    assert judgement.retry_after_s == limited.retry_after_s
    # What goes to the server: the allowed calls only, still a batch; the refusals are answered here.
    assert forwarded_document(parsed, judgement) == [call(1, "echo"), call(3, "echo")]
    errors = refused_errors(parsed, judgement)
    assert [e["id"] for e in errors] == [2, None, 4]
    metrics = g.metrics_text().decode()
    for line in (
        'outrider_policy_decisions_total{outcome="allowed"} 2',
        'outrider_policy_decisions_total{outcome="denied"} 1',
        'outrider_policy_decisions_total{outcome="rate_limited"} 1',
        'outrider_policy_decisions_total{outcome="invalid"} 1',
        "outrider_policy_count 2",
    ):
        assert line + "\n" in metrics, line


async def test_a_body_with_nothing_to_forward_is_answered_whole() -> None:
    g = gate(cedar=CEDAR)
    single = parse_body(json.dumps(call(7, "rm")).encode())
    judgement = await g.judge(ALICE, single, "stateless")
    assert judgement.nothing_to_forward and judgement.retry_after_s == 0
    assert json.loads(refusal_body(single, judgement)) == denied_error(7)
    batch = parse_body(json.dumps([call(8, "rm"), call(9, "rm")]).encode())
    judgement = await g.judge(ALICE, batch, "stateless")
    assert json.loads(refusal_body(batch, judgement)) == [denied_error(8), denied_error(9)]
    # One allowed call left of a batch goes alone (newer servers refuse batches).
    mixed = parse_body(json.dumps([call(10, "echo"), call(11, "rm")]).encode())
    judgement = await g.judge(ALICE, mixed, "stateless")
    assert forwarded_document(mixed, judgement) == call(10, "echo")
    whole = parse_body(json.dumps([call(12, "echo")]).encode())
    assert forwarded_document(whole, await g.judge(ALICE, whole, "stateless")) == [call(12, "echo")]


async def test_without_policy_or_limits_the_gate_is_inactive_and_forwards_everything() -> None:
    g = gate()
    assert not g.active
    parsed = parse_body(json.dumps(call(1, "anything")).encode())
    judgement = await g.judge(ALICE, parsed, "stateless")
    assert [(v.forward, v.outcome, v.reason) for v in judgement.verdicts] == [
        (True, "ok", "no policy configured")
    ]
    listing = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "echo"}, {"name": "rm"}]}}
    raw = json.dumps(listing).encode()
    assert g.filter_payload(ALICE, raw) is raw
    assert g.ready() == (True, "no policy (every authenticated caller may call every tool)")


def test_list_answers_are_filtered_and_counted() -> None:
    g = gate(cedar=CEDAR)
    listing = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "echo"}, {"name": "rm"}]}}
    filtered = json.loads(g.filter_payload(ALICE, json.dumps(listing).encode()))
    assert filtered["result"]["tools"] == [{"name": "echo"}]
    batch, removed = g.filter_objects(ALICE, [listing, {"jsonrpc": "2.0", "id": 2, "result": {}}])
    assert removed == 1 and batch[0]["result"]["tools"] == [{"name": "echo"}] and len(batch) == 2
    assert g.stats.filtered_items == 2
    untouched = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "echo"}]}}).encode()
    assert g.filter_payload(ALICE, untouched) is untouched
    assert g.filter_payload(ALICE, b'{"tools": [') == b'{"tools": ['
    assert "outrider_policy_list_items_filtered_total 2\n" in g.metrics_text().decode()


async def test_crafted_issuers_subjects_and_tool_names_never_share_a_budget() -> None:
    """The user's budget key joined kind, issuer and subject with ':' and `limits` joins the parts
    of a key with '/', so ("https://a:1", "x") and ("https://a", "1:x") drew from one budget, as did
    subject "x/y" calling tool "z" and subject "x" calling tool "y/z"."""

    async def first_call(g: Gate, who: Principal, tool: str) -> str:
        judgement = await g.judge(who, parse_body(json.dumps(call(1, tool)).encode()), "s")
        return judgement.verdicts[0].outcome

    g = gate(rate_limits={"per_user": "1/minute"})
    for who in (Principal("oidc", "x", "https://a:1"), Principal("oidc", "1:x", "https://a")):
        assert await first_call(g, who, "echo") == "ok", who
    assert await first_call(g, Principal("oidc", "x", "https://a:1"), "echo") == "limited"
    g = gate(rate_limits={"per_user_tool": "1/minute"})
    for who, tool in (
        (Principal("oidc", "x/y", "https://a"), "z"),
        (Principal("oidc", "x", "https://a"), "y/z"),
    ):
        assert await first_call(g, who, tool) == "ok", (who, tool)


async def test_budgets_are_per_user_and_every_refusal_is_counted() -> None:
    g = gate(cedar=CEDAR, rate_limits={"per_user": "1/minute"})
    other_issuer = Principal("oidc", "alice", "https://other-idp")
    bob = Principal("oidc", "bob", "https://idp")
    for who in (ALICE, other_issuer, bob):  # one budget each: same subject, other issuer is someone else
        first = await g.judge(who, parse_body(json.dumps(call(1, "echo")).encode()), "s")
        assert first.verdicts[0].outcome == "ok", who
    body = json.dumps([call(2, "echo"), call(3, "echo"), call(4, "rm"), call(5, "rm"), {"x": 1}, 7]).encode()
    parsed = parse_body(body)
    judgement = await g.judge(ALICE, parsed, "s")
    assert [v.outcome for v in judgement.verdicts] == [
        "limited",
        "limited",
        "denied",
        "denied",
        "invalid",
        "invalid",
    ]
    invalid = {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": "not a JSON-RPC 2.0 message"},
    }
    assert refused_errors(parsed, judgement)[4:] == [invalid, invalid]
    assert (
        json.loads(refusal_body(parse_body(b'{"x": 1}'), await g.judge(ALICE, parse_body(b'{"x": 1}'), "s")))
        == invalid
    )
    metrics = g.metrics_text().decode()
    for line in (
        'outrider_policy_decisions_total{outcome="allowed"} 3',
        'outrider_policy_decisions_total{outcome="denied"} 2',
        'outrider_policy_decisions_total{outcome="rate_limited"} 2',
        'outrider_policy_decisions_total{outcome="invalid"} 3',
    ):
        assert line + "\n" in metrics, line


async def test_a_single_allowed_call_is_forwarded_as_it_came() -> None:
    g = gate(cedar=CEDAR)
    single = parse_body(json.dumps(call(1, "echo")).encode())
    assert forwarded_document(single, await g.judge(ALICE, single, "s")) == call(1, "echo")


async def test_an_unreachable_store_follows_on_store_error(caplog: pytest.LogCaptureFixture) -> None:
    """A Redis URI nobody listens on (a closed local port): `allow` lets the call through and counts it,
    `deny` refuses it; both say so in /metrics."""
    port = free_port()
    limits = {"rate_limits": {"per_user": "5/minute"}, "storage": f"redis://127.0.0.1:{port}"}
    allowing = gate(**limits)
    judgement = await allowing.judge(ALICE, parse_body(json.dumps(call(1, "echo")).encode()), "s")
    (verdict,) = judgement.verdicts
    assert (verdict.forward, verdict.outcome, verdict.store_error) == (True, "ok", True)
    assert allowing.stats.allowed_store_down == 1
    await allowing.judge(ALICE, parse_body(json.dumps(call(2, "echo")).encode()), "s")
    assert "outrider_ratelimit_allowed_store_down_total 2\n" in allowing.metrics_text().decode()
    denying = gate(**limits, on_store_error="deny")
    (refused,) = (await denying.judge(ALICE, parse_body(json.dumps(call(3, "echo")).encode()), "s")).verdicts
    assert (refused.forward, refused.outcome, refused.store_error) == (False, "limited", True)
    assert denying.limiter.shared and not gate(cedar=CEDAR).limiter.shared


async def test_evaluation_errors_are_logged_with_the_method(caplog: pytest.LogCaptureFixture) -> None:
    broken = "permit(principal, action, resource) when { context.arguments.n > 1 };"
    g = gate(cedar=broken)
    with caplog.at_level(logging.INFO, logger="outrider.policy"):
        await g.judge(ALICE, parse_body(json.dumps(call(1, "echo")).encode()), "s")
    (line,) = [r.getMessage() for r in caplog.records if "evaluation errors" in r.getMessage()]
    assert line.startswith("policy evaluation errors for tools/call: error while evaluating policy")


METRICS = """\
# HELP outrider_policy_decisions_total MCP requests judged by the policy gate, by outcome.
# TYPE outrider_policy_decisions_total counter
outrider_policy_decisions_total{outcome="allowed"} 0
outrider_policy_decisions_total{outcome="denied"} 0
outrider_policy_decisions_total{outcome="rate_limited"} 0
outrider_policy_decisions_total{outcome="invalid"} 0
# HELP outrider_policy_list_items_filtered_total List items hidden from callers by policy.
# TYPE outrider_policy_list_items_filtered_total counter
outrider_policy_list_items_filtered_total 0
# HELP outrider_policy_count Cedar policies in force.
# TYPE outrider_policy_count gauge
outrider_policy_count 1
# HELP outrider_policy_reloads_total Policy file loads that took effect.
# TYPE outrider_policy_reloads_total counter
outrider_policy_reloads_total 0
# HELP outrider_policy_reload_errors_total Policy file loads rejected (last good kept).
# TYPE outrider_policy_reload_errors_total counter
outrider_policy_reload_errors_total 0
# HELP outrider_policy_schema_mismatches Policies naming tools or arguments the server lacks.
# TYPE outrider_policy_schema_mismatches gauge
outrider_policy_schema_mismatches 0
# HELP outrider_ratelimit_store_up 1 while the rate-limit store answers.
# TYPE outrider_ratelimit_store_up gauge
outrider_ratelimit_store_up 1
# HELP outrider_ratelimit_store_errors_total Rate-limit checks the store could not answer.
# TYPE outrider_ratelimit_store_errors_total counter
outrider_ratelimit_store_errors_total 0
# HELP outrider_ratelimit_allowed_store_down_total Calls allowed because the store was down.
# TYPE outrider_ratelimit_allowed_store_down_total counter
outrider_ratelimit_allowed_store_down_total 0
"""


def test_metrics_in_full_and_valid_exposition() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = gate(cedar="permit(principal, action, resource);").metrics_text().decode()
    assert text == METRICS
    assert len(list(text_string_to_metric_families(text))) == 9


async def test_readiness_says_what_is_wrong_and_stays_ready(caplog: pytest.LogCaptureFixture) -> None:
    one = "1 Cedar policies (sidecar config policy.cedar: 1)"
    assert gate(
        cedar="permit(principal, action, resource);", rate_limits={"per_user": "5/minute"}
    ).ready() == (
        True,
        f"{one}; rate-limit store ok",
    )
    assert gate(cedar="permit(principal action, resource);").ready() == (
        True,
        "1 Cedar policies (deny-all (a policy layer did not compile): 1); pod-spec policy did not compile "
        "(deny-all in its place): sidecar config policy.cedar: line 1, column 18: unexpected token `action`",
    )
    nothing = "no policy (every authenticated caller may call every tool)"
    for mode, verb in (("allow", "allowing"), ("deny", "refusing")):
        g = gate(
            rate_limits={"per_user": "5/minute"},
            storage=f"redis://127.0.0.1:{free_port()}",
            on_store_error=mode,
        )
        await g.judge(ALICE, parse_body(json.dumps(call(1, "echo")).encode()), "s")
        assert g.ready() == (
            True,
            f"{nothing}; rate-limit store unreachable (StorageError): {verb} metered calls",
        )
        assert "outrider_ratelimit_store_up 0\n" in g.metrics_text().decode()
    listing = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]},
    }
    g = gate(cedar='permit(principal, action == Action::"call_tool", resource == Tool::"nope");')
    with caplog.at_level(logging.WARNING, logger="outrider.policy"):
        g.filter_objects(ALICE, listing)
    problem = (
        "sidecar config policy.cedar: policy 'policy0' names tool 'nope', which the server does not offer"
    )
    assert g.schema_problems == (problem,)
    assert g.ready() == (True, f"{one}; 1 schema mismatch(es): {problem}")
    assert "outrider_policy_schema_mismatches 1\n" in g.metrics_text().decode()
    with caplog.at_level(logging.WARNING, logger="outrider.policy"):
        g.filter_objects(ALICE, listing)  # the same tools again: nothing new to check, nothing logged
    assert g.schema_problems == (problem,)
    warned = [r.getMessage() for r in caplog.records if "server's tools" in r.getMessage()]
    assert warned == [f"policy does not match the server's tools: {problem}"]


async def test_the_reload_loop_applies_a_changed_narrowing_file(tmp_path: Path) -> None:
    """The app team's ConfigMap file, re-read by the loop the sidecar runs: a new forbid takes effect."""
    narrowing = tmp_path / "policy.yaml"
    narrowing.write_text("cedar: ''\n")
    g = gate(cedar="permit(principal, action, resource);", file=str(narrowing), reload_interval_s=0.05)
    body = json.dumps(call(1, "echo")).encode()
    assert (await g.judge(ALICE, parse_body(body), "s")).verdicts[0].forward
    loop = asyncio.create_task(reload_loop(g))
    try:
        narrowing.write_text("cedar: 'forbid(principal, action, resource == Tool::\"echo\");'\n")
        for _ in range(400):  # the loop polls every 0.05 s; give a loaded machine plenty of time
            if g.holder.reloads >= 2:
                break
            await asyncio.sleep(0.05)
        assert g.holder.reloads >= 2
        assert not (await g.judge(ALICE, parse_body(body), "s")).verdicts[0].forward
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


class _Counted:
    """Counts the calls of a gate's real method (the method still runs)."""

    def __init__(self, owner: object, name: str) -> None:
        self.calls = 0
        self._real = getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args: object) -> object:
        self.calls += 1
        return self._real(*args)


async def _run_loop(g: Gate, until: Callable[[], bool]) -> None:
    """Runs the reload loop until `until()` holds (at most 20 s); the loop must still be running then."""
    task = asyncio.create_task(reload_loop(g))
    try:
        for _ in range(400):
            if until() or task.done():
                break
            await asyncio.sleep(0.05)
        assert not task.done(), task  # a loop that died (an exception) reloads nothing any more
        assert until()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)  # a loop that ignores its cancellation fails here


async def test_the_reload_loop_stops_when_cancelled_mid_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that accepts the connection and never answers: the loop is cancelled (sidecar shutdown)
    while its probe waits. `limits`' `check()` swallows every exception, the cancellation included, so
    the loop went on probing and the shutdown hung until the probe learnt to re-raise it."""
    monkeypatch.setattr(gate_module, "STORE_PROBE_INTERVAL_S", 0.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        g = gate(
            rate_limits={"per_user": "5/minute"},
            storage=f"redis://127.0.0.1:{port}",
            store_timeout_s=5,
            reload_interval_s=0.05,
        )
        probes = _Counted(g.limiter, "check_store")
        task = asyncio.create_task(reload_loop(g))
        for _ in range(400):
            if probes.calls:
                break
            await asyncio.sleep(0.05)
        assert probes.calls == 1
        await asyncio.sleep(0.2)  # inside the probe's PING, which the silent store never answers
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        assert probes.calls == 1


async def test_the_reload_loop_probes_a_shared_store_that_went_away(monkeypatch: pytest.MonkeyPatch) -> None:
    """With limits on a shared store, the loop probes it every STORE_PROBE_INTERVAL_S: a store that went
    away shows in /readyz and /metrics without waiting for a metered call, and the loop keeps probing."""
    monkeypatch.setattr(gate_module, "STORE_PROBE_INTERVAL_S", 0.0)
    g = gate(
        rate_limits={"per_user": "5/minute"},
        storage=f"redis://127.0.0.1:{free_port()}",
        reload_interval_s=0.05,
    )
    assert g.limiter.store_healthy
    probes = _Counted(g.limiter, "check_store")
    await _run_loop(g, lambda: probes.calls >= 3)
    assert not g.limiter.store_healthy
    assert "outrider_ratelimit_store_up 0\n" in g.metrics_text().decode()
    detail = g.ready()[1]
    assert "; rate-limit store unreachable (" in detail and detail.endswith("): allowing metered calls")


async def test_the_reload_loop_probes_no_sooner_than_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a minute between probes, far longer than the test runs: many reload checks, no probe yet
    (the store is not hammered). Not an hour: the loop's clock counts from boot, and a machine up for
    less than that would not tell an elapsed time from a sum of clock readings."""
    monkeypatch.setattr(gate_module, "STORE_PROBE_INTERVAL_S", 30.0)
    g = gate(
        rate_limits={"per_user": "5/minute"},
        storage=f"redis://127.0.0.1:{free_port()}",
        reload_interval_s=0.05,
    )
    probes = _Counted(g.limiter, "check_store")
    checks = _Counted(g.holder, "check")
    await _run_loop(g, lambda: checks.calls >= 5)
    assert probes.calls == 0
    assert g.limiter.store_healthy


@pytest.mark.parametrize(
    ("policy", "why"),
    [
        ({"rate_limits": {"per_user": "5/minute"}}, "the in-memory store is never probed"),
        ({"storage": "redis://127.0.0.1:1"}, "a shared store without limits is never probed"),
    ],
)
async def test_the_reload_loop_probes_only_a_shared_store_with_limits(
    monkeypatch: pytest.MonkeyPatch, policy: dict[str, object], why: str
) -> None:
    monkeypatch.setattr(gate_module, "STORE_PROBE_INTERVAL_S", 0.0)
    g = gate(cedar=CEDAR, reload_interval_s=0.05, **policy)
    probes = _Counted(g.limiter, "check_store")
    checks = _Counted(g.holder, "check")
    await _run_loop(g, lambda: checks.calls >= 5)
    assert probes.calls == 0, why


# -- found by the fifth mutation session ---------------------------------------------------------


def test_a_storage_uri_the_store_cannot_read_fails_start_up() -> None:
    # never deferred to the first metered call, where the store-error fallback (allow, by default)
    # would silently let every call through
    for uri in ("redis://127.0.0.1:notaport", "bogus://x"):
        with pytest.raises(Exception) as refused:
            gate(rate_limits={"per_user": "1/minute"}, storage=uri)
        assert not isinstance(refused.value, AssertionError)


async def test_budgets_are_per_server_in_a_shared_store() -> None:
    # one store (Redis in production) holds the budgets of every MCP server: a per_pod budget is the
    # server's own (its replicas share it, another server does not)
    current = [SERVER]
    g = Gate.from_config(
        PolicyConfig.from_mapping({"file": None, "rate_limits": {"per_pod": "1/minute"}}), lambda: current[0]
    )
    body = parse_body(json.dumps(call(1, "echo")).encode())
    assert (await g.judge(ALICE, body, "s")).verdicts[0].forward
    assert not (await g.judge(ALICE, body, "s")).verdicts[0].forward
    current[0] = Server.from_facts("spiffe://example.org/ns/tools/sa/other", None, "pod-9")
    assert (await g.judge(ALICE, body, "s")).verdicts[0].forward


async def test_a_limited_call_keeps_its_decision_and_names_the_budget() -> None:
    g = gate(cedar=CEDAR, rate_limits={"per_user": "1/minute"})
    body = parse_body(json.dumps(call(1, "echo")).encode())
    await g.judge(ALICE, body, "s")
    (limited,) = (await g.judge(ALICE, body, "s")).verdicts
    assert limited.outcome == "limited" and limited.limit_scope == "per_user"
    assert limited.decision is not None and limited.decision.policies == ("echo",)


async def test_an_invalid_message_with_an_id_is_answered_with_that_id() -> None:
    g = gate(cedar=CEDAR)
    (invalid,) = (await g.judge(ALICE, parse_body(b'{"jsonrpc": "2.0", "id": 7, "method": 5}'), "s")).verdicts
    assert invalid.outcome == "invalid" and invalid.error is not None and invalid.error["id"] == 7


async def test_every_evaluation_error_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    broken = "permit(principal, action, resource) when { context.arguments.n > 1 };"
    g = gate(cedar=f"{broken}\n{broken}")
    with caplog.at_level(logging.INFO, logger="outrider.policy"):
        await g.judge(ALICE, parse_body(json.dumps(call(1, "echo")).encode()), "s")
    (line,) = [r.getMessage() for r in caplog.records if "evaluation errors" in r.getMessage()]
    assert line.count("error while evaluating policy") == 2 and "; error while evaluating policy" in line


def test_the_schema_is_learned_from_any_answer_of_a_batch() -> None:
    g = gate(cedar='permit(principal, action == Action::"call_tool", resource == Tool::"nope");')
    listing = {
        "jsonrpc": "2.0",
        "id": 3,
        "result": {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]},
    }
    g.filter_objects(ALICE, [1, {"jsonrpc": "2.0", "id": 2, "result": {}}, listing])
    assert g.schema_problems == (
        "sidecar config policy.cedar: policy 'policy0' names tool 'nope', which the server does not offer",
    )


def test_readiness_says_a_reload_was_rejected(tmp_path: Path) -> None:
    narrowing = tmp_path / "policy.yaml"
    narrowing.write_text("cedar: ''\n")
    g = gate(cedar="permit(principal, action, resource);", file=str(narrowing))
    narrowing.write_text("cedar: 'forbid(principal action, resource);'\n")
    g.holder.check()
    ready, detail = g.ready()
    assert ready and g.holder.last_error
    assert f"; last reload rejected, keeping the last good policy: {g.holder.last_error}" in detail


async def test_arguments_over_max_argument_values_are_denied_before_cedar_sees_them() -> None:
    g = gate(cedar=CEDAR, max_argument_values=3)
    small = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"a": [1]}},
    }
    large = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"a": [1, 2]}},
    }
    judgement = await g.judge(ALICE, parse_body(json.dumps([small, large]).encode()), "streamable-http")
    assert [(v.forward, v.outcome) for v in judgement.verdicts] == [(True, "ok"), (False, "denied")]
    assert judgement.verdicts[1].reason == "the arguments hold more than 3 values: too many to judge"
    assert judgement.verdicts[1].error == denied_error(2)
    assert PolicyConfig.from_mapping({"file": None}).max_argument_values == 10_000


@pytest.mark.parametrize("value", [0, -1, 10_000_001, True, "100", 1.5, float("inf"), float("nan"), None])
def test_max_argument_values_must_be_a_whole_number_in_range(value: object) -> None:
    with pytest.raises(ConfigError, match=r"policy\.max_argument_values"):
        PolicyConfig.from_mapping({"file": None, "max_argument_values": value})


async def test_a_named_call_whose_name_is_not_a_string_is_refused_before_policy_and_budgets() -> None:
    """Judged as the empty name, `{"name": ["rm"]}` passed a policy forbidding `rm` (and skipped its
    per-tool budget); a server that coerces the value (JavaScript reads `["rm"]` as the key "rm") ran it."""
    g = gate(
        cedar='permit(principal, action, resource);\nforbid(principal, action, resource == Tool::"rm");',
        rate_limits={"per_tool": {"*": "1000/minute"}},
    )

    def message(msg_id: int | None, method: str, params: object) -> dict[str, object]:
        found: dict[str, object] = {"jsonrpc": "2.0", "method": method, "params": params}
        return found if msg_id is None else {**found, "id": msg_id}

    body = [
        message(1, "tools/call", {"name": ["rm"]}),
        message(2, "tools/call", ["rm", {}]),
        message(3, "prompts/get", {"name": 7}),
        message(4, "resources/read", {"name": "file:///x"}),
        message(5, "resources/subscribe", {"uri": {"href": "file:///x"}}),
        message(6, "resources/unsubscribe", {}),
        message(None, "tools/call", {"name": None}),
        message(8, "tools/call", {"name": "echo"}),
        message(9, "tools/call", {"name": ""}),
        message(10, "prompts/get", {"name": "p"}),
        message(11, "resources/read", {"uri": "file:///x"}),
        message(12, "tools/list", []),
    ]
    parsed = parse_body(json.dumps(body).encode())
    judgement = await g.judge(ALICE, parsed, "streamable-http")
    assert [v.forward for v in judgement.verdicts] == [False] * 7 + [True] * 5
    needs = [
        "tools/call needs params.name as a string",
        "tools/call needs params.name as a string",
        "prompts/get needs params.name as a string",
        "resources/read needs params.uri as a string",
        "resources/subscribe needs params.uri as a string",
        "resources/unsubscribe needs params.uri as a string",
        "tools/call needs params.name as a string",
    ]
    refused = judgement.verdicts[:7]
    assert [v.reason for v in refused] == needs and {v.outcome for v in refused} == {"invalid"}
    assert [v.error for v in refused] == [
        {"jsonrpc": "2.0", "id": i, "error": {"code": -32602, "message": why}}
        for i, why in zip([1, 2, 3, 4, 5, 6, None], needs, strict=True)
    ]
    assert g.stats.invalid == 7 and g.stats.allowed == 5 and g.stats.denied == 0
    # The notification gets no answer; the six requests do.
    assert len(refused_errors(parsed, judgement)) == 6


def call_with_values(msg_id: int, values: int) -> dict[str, object]:
    """A tools/call whose arguments hold `values` values (one record of that many numbers)."""
    arguments = {f"k{i}": i for i in range(values)}
    return {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": arguments},
    }


class Evaluations:
    """The real `decide`, recording which thread ran each body and how many ran at once; a body holding
    a call with id `hold` waits (on its thread) until `release` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: int | None = None) -> None:
        self.threads: dict[object, str] = {}
        self.release = threading.Event()
        self.held: list[bool] = []
        self.hold = hold
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()
        self._real = gate_module.decide
        monkeypatch.setattr(gate_module, "decide", self)

    def __call__(self, *args: Any) -> Any:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            messages = args[3]
            for m in messages:
                self.threads[m.id] = threading.current_thread().name
            if self.hold in [m.id for m in messages]:
                # Not a time limit: the wait ends at once when the loop answers the small call; the
                # timeout only keeps a regression (the loop blocked in here) from hanging the suite.
                self.held.append(self.release.wait(timeout=10))
            return self._real(*args)
        finally:
            with self._lock:
                self.running -= 1


async def test_a_small_call_is_answered_while_a_large_evaluation_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = gate(cedar=CEDAR)
    evaluations = Evaluations(monkeypatch, hold=2)
    large = asyncio.create_task(
        g.judge(ALICE, parse_body(json.dumps(call_with_values(2, 500)).encode()), "http")
    )
    await asyncio.sleep(0)  # the large body reaches its evaluation first
    small = await g.judge(ALICE, parse_body(json.dumps(call(1, "echo")).encode()), "http")
    evaluations.release.set()
    judged_large = await large
    # The large evaluation was still held (on its thread) when the small call was answered.
    assert evaluations.held == [True]
    assert evaluations.threads[1] == threading.current_thread().name
    assert evaluations.threads[2].startswith("outrider-policy")
    # Same decisions as inline.
    for judgement in (small, judged_large):
        (verdict,) = judgement.verdicts
        assert verdict.forward and verdict.decision is not None and verdict.decision.policies == ("echo",)


async def test_only_bodies_over_the_inline_size_leave_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    evaluations = Evaluations(monkeypatch)
    g = gate(cedar=CEDAR)
    here = threading.current_thread().name
    # The count: the list of calls (1), one per call, then the arguments' values.
    assert gate_module.INLINE_VALUES == 100
    await g.judge(ALICE, parse_body(json.dumps(call_with_values(1, 98)).encode()), "http")
    await g.judge(ALICE, parse_body(json.dumps(call_with_values(2, 99)).encode()), "http")
    # A batch counts as a whole: 49 calls of one value each are 1 + 49 + 49 = 99, 50 are 101.
    batch = [call_with_values(i, 1) for i in range(10, 59)]
    await g.judge(ALICE, parse_body(json.dumps(batch).encode()), "http")
    batch = [call_with_values(i, 1) for i in range(100, 150)]
    await g.judge(ALICE, parse_body(json.dumps(batch).encode()), "http")
    assert evaluations.threads[1] == here and evaluations.threads[2].startswith("outrider-policy")
    assert evaluations.threads[10] == here and evaluations.threads[100].startswith("outrider-policy")
    # Without policies nothing is evaluated, so nothing leaves the loop whatever its size.
    limits_only = gate(rate_limits={"per_user": "100/minute"})
    await limits_only.judge(ALICE, parse_body(json.dumps(call_with_values(3, 500)).encode()), "http")
    assert evaluations.threads[3] == here


async def test_large_evaluations_take_one_worker_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    evaluations = Evaluations(monkeypatch, hold=0)
    g = gate(cedar=CEDAR)
    bodies = [parse_body(json.dumps(call_with_values(i, 300)).encode()) for i in range(4)]
    tasks = [asyncio.create_task(g.judge(ALICE, b, "http")) for b in bodies]
    await asyncio.sleep(0)  # all four submitted while the first is held: a second worker would start
    evaluations.release.set()
    judgements = await asyncio.gather(*tasks)
    assert all(j.verdicts[0].forward for j in judgements)
    assert evaluations.held == [True]
    assert evaluations.most == 1
    assert len({evaluations.threads[i] for i in range(4)}) == 1


async def test_a_large_body_is_judged_with_its_transport_and_the_configured_limit() -> None:
    # The worker thread gets every input the inline evaluation does: the transport (in the context)
    # and `max_argument_values` (not the default).
    cedar = CEDAR + '@id("no-sse") forbid(principal, action, resource) when { context.transport == "sse" };'
    g = gate(cedar=cedar, max_argument_values=300)
    fits, too_many = (parse_body(json.dumps(call_with_values(1, n)).encode()) for n in (250, 301))
    assert (await g.judge(ALICE, fits, "streamable-http")).verdicts[0].forward
    refused = (await g.judge(ALICE, fits, "sse")).verdicts[0]
    assert not refused.forward and refused.decision is not None and refused.decision.policies == ("no-sse",)
    large = (await g.judge(ALICE, too_many, "streamable-http")).verdicts[0]
    assert large.reason == "the arguments hold more than 300 values: too many to judge"


async def test_completion_is_judged_as_the_prompt_or_resource_its_ref_names() -> None:
    """Judged as `Action::"other"` on the server, `completion/complete` told a caller forbidden the
    prompt `secret` (or the template `file:///private/{path}`) the values of its arguments."""
    g = gate(
        cedar="permit(principal, action, resource);\n"
        'forbid(principal, action == Action::"get_prompt", resource == Prompt::"secret");\n'
        'forbid(principal, action == Action::"read_resource", resource == Resource::"file:///private/{path}");'
    )

    def complete(msg_id: int, ref: object) -> dict[str, object]:
        params = {"ref": ref, "argument": {"name": "a", "value": ""}}
        return {"jsonrpc": "2.0", "id": msg_id, "method": "completion/complete", "params": params}

    body = [
        complete(1, {"type": "ref/prompt", "name": "secret"}),
        complete(2, {"type": "ref/resource", "uri": "file:///private/{path}"}),
        {"jsonrpc": "2.0", "id": 3, "method": "prompts/get", "params": {"name": "secret"}},
        complete(4, {"type": "ref/prompt", "name": "greet"}),
        complete(5, {"type": "ref/resource", "uri": "file:///public/{path}"}),
    ]
    judgement = await g.judge(ALICE, parse_body(json.dumps(body).encode()), "streamable-http")
    outcomes = [(v.forward, v.outcome) for v in judgement.verdicts]
    assert outcomes == [(False, "denied")] * 3 + [(True, "ok")] * 2
    # The same answer a forbidden prompts/get gets, and the same reason.
    assert [v.error for v in judgement.verdicts[:3]] == [denied_error(1), denied_error(2), denied_error(3)]
    assert {v.reason for v in judgement.verdicts[:3]} == {"forbidden by policy"}


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"ref": "ref/prompt"},
        {"ref": ["ref/prompt", "secret"]},
        {"ref": {"type": "ref/prompt", "name": ["secret"]}},
        {"ref": {"type": "ref/prompt"}},
        {"ref": {"type": "ref/resource", "uri": {"href": "file:///x"}}},
        {"ref": {"type": "ref/resource", "name": "secret"}},
        # Both keys: a lenient server may complete for the one the policy did not see.
        {"ref": {"type": "ref/prompt", "name": "greet", "uri": "file:///private/{path}"}},
        {"ref": {"type": "ref/resource", "uri": "file:///x", "name": "secret"}},
        {"ref": {"type": "ref/tool", "name": "secret"}},
        {"ref": {"name": "secret"}},
        [],
    ],
)
async def test_a_completion_whose_ref_names_nothing_judgeable_is_invalid_params(params: object) -> None:
    g = gate(cedar="permit(principal, action, resource);")
    body = {"jsonrpc": "2.0", "id": 7, "method": "completion/complete", "params": params}
    judgement = await g.judge(ALICE, parse_body(json.dumps(body).encode()), "streamable-http")
    (verdict,) = judgement.verdicts
    why = (
        'completion/complete needs params.ref as {"type": "ref/prompt", "name": <string>} '
        'or {"type": "ref/resource", "uri": <string>}'
    )
    assert verdict.outcome == "invalid" and verdict.reason == why
    assert verdict.error == {"jsonrpc": "2.0", "id": 7, "error": {"code": -32602, "message": why}}
    assert g.stats.invalid == 1 and g.stats.allowed == 0


async def test_a_completion_spends_the_budget_of_the_prompt_or_resource_it_completes() -> None:
    """`completion/complete` spent no budget: a caller out of budget for prompts (its `per_user`
    budget used up on `prompts/get`) went on asking for completions of the same prompt unmetered,
    learning its argument values as fast as it could send. A completion now draws from the budgets
    the `prompts/get` (or `resources/read`) of what its ref names draws from, under the same keys."""
    g = gate(rate_limits={"per_user": "2/minute"})

    def complete(msg_id: int, ref: dict[str, str]) -> dict[str, object]:
        params = {"ref": ref, "argument": {"name": "a", "value": ""}}
        return {"jsonrpc": "2.0", "id": msg_id, "method": "completion/complete", "params": params}

    async def outcome(body: object, who: Principal = ALICE) -> str:
        (verdict,) = (await g.judge(who, parse_body(json.dumps(body).encode()), "streamable-http")).verdicts
        return verdict.outcome

    prompt = {"type": "ref/prompt", "name": "x"}
    get = {"jsonrpc": "2.0", "id": 1, "method": "prompts/get", "params": {"name": "x"}}
    assert [await outcome(get), await outcome(get)] == ["ok", "ok"]
    # Out of budget for the prompt: its completions are refused too, and so is a template's.
    assert await outcome(complete(2, prompt)) == "limited"
    assert await outcome(complete(3, {"type": "ref/resource", "uri": "file:///{p}"})) == "limited"
    # Completions draw from the same budget the other way round: bob's two completions leave him
    # no prompts/get; carol's own budget is untouched by theirs.
    bob = Principal("oidc", "bob", "https://idp")
    assert [await outcome(complete(4, prompt), bob), await outcome(complete(5, prompt), bob)] == ["ok"] * 2
    assert await outcome(get, bob) == "limited"
    carol = Principal("oidc", "carol", "https://idp")
    assert await outcome(get, carol) == "ok"
    assert g.stats.limited == 3 and g.stats.allowed == 5


def tools_answer(*names: str, msg_id: int = 1, pad: int = 0) -> dict[str, object]:
    tools = [{"name": n, "description": "d" * pad} for n in names]
    return {"jsonrpc": "2.0", "id": msg_id, "result": {"tools": tools}}


async def test_only_lists_over_the_inline_size_are_filtered_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`filter_answer` (what the proxy awaits) filters as `filter_payload` does, on the loop for a short
    list and on the worker for a long one (items counted over a whole batch) or a large answer."""
    threads: list[tuple[int, str]] = []
    real = gate_module.may_use

    def recording(policies: Any, principal: Any, server: Any, kind: str, names: Any) -> list[bool]:
        threads.append((len(names), threading.current_thread().name))
        return real(policies, principal, server, kind, names)

    monkeypatch.setattr(gate_module, "may_use", recording)
    g = gate(cedar=CEDAR)
    here = threading.current_thread().name
    assert gate_module.INLINE_LIST_ITEMS == 8 and gate_module.INLINE_LIST_BYTES == 65536
    eight = tools_answer("echo", *(f"t{i}" for i in range(7)))
    nine = tools_answer("echo", *(f"t{i}" for i in range(8)))
    batch = [tools_answer("echo", "rm", msg_id=1), tools_answer(*(f"u{i}" for i in range(7)), msg_id=2)]
    large = tools_answer("echo", "rm", pad=70000)
    where: list[list[tuple[int, str]]] = []
    for case in (eight, nine, batch, large):
        raw = json.dumps(case).encode()
        threads.clear()
        answered = await g.filter_answer(ALICE, raw)
        where.append(list(threads))
        # The same bytes as the inline filter gives.
        assert answered == g.filter_payload(ALICE, raw)
    worker = [[(n, t.startswith("outrider-policy")) for n, t in calls] for calls in where]
    assert where[0] == [(8, here)]
    assert worker[1:] == [[(9, True)], [(2, True), (7, True)], [(2, True)]]
    # Unchanged answers come back as the very same bytes; undecodable ones are left alone.
    kept = json.dumps(tools_answer("echo")).encode()
    assert await g.filter_answer(ALICE, kept) is kept
    assert await g.filter_answer(ALICE, b'{"tools": [') == b'{"tools": ['
    # Both paths count what they hide: 7 + 8 + 8 + 1 by each of the two filters.
    assert g.stats.filtered_items == 2 * (7 + 8 + (1 + 7) + 1)
    # Without policies nothing is filtered, so nothing leaves the loop whatever its size.
    threads.clear()
    raw = json.dumps(nine).encode()
    assert await gate(rate_limits={"per_user": "1/second"}).filter_answer(ALICE, raw) is raw
    assert threads == []


async def test_the_list_size_limits_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer of exactly INLINE_LIST_BYTES is filtered inline, one byte more on the worker; an
    unchanged large answer comes back as the very same bytes from there too."""
    threads: list[str] = []
    real = gate_module.may_use

    def recording(policies: Any, principal: Any, server: Any, kind: str, names: Any) -> list[bool]:
        threads.append(threading.current_thread().name)
        return real(policies, principal, server, kind, names)

    monkeypatch.setattr(gate_module, "may_use", recording)
    g = gate(cedar=CEDAR)

    def answer(pad: int) -> bytes:
        tools = [{"name": "echo", "description": "d" * pad}, {"name": "rm"}]
        return json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": tools}}).encode()

    base = len(answer(0))
    for extra, off_loop in ((0, False), (1, True)):
        raw = answer(gate_module.INLINE_LIST_BYTES - base + extra)
        assert len(raw) == gate_module.INLINE_LIST_BYTES + extra
        threads.clear()
        filtered = json.loads(await g.filter_answer(ALICE, raw))
        assert [t["name"] for t in filtered["result"]["tools"]] == ["echo"]
        assert threads[0].startswith("outrider-policy") is off_loop
    kept = json.dumps(tools_answer("echo", pad=gate_module.INLINE_LIST_BYTES)).encode()
    assert await g.filter_answer(ALICE, kept) is kept


def test_a_long_list_is_judged_once_per_caller_and_policy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each tools/list of a long list cost a Cedar partial evaluation per item on the one worker, so a
    caller asking again and again kept it busy (every large evaluation of other callers queued
    behind). The visibility of a long list is kept per caller until the policies change."""
    calls: list[tuple[str, int]] = []
    real = gate_module.may_use

    def counting(policies: Any, principal: Any, server: Any, kind: str, names: Any) -> list[bool]:
        calls.append((principal.subject, len(names)))
        return real(policies, principal, server, kind, names)

    monkeypatch.setattr(gate_module, "may_use", counting)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("cedar: ''\n")
    g = gate(cedar=CEDAR, file=str(policy_file))
    long = json.dumps(tools_answer("echo", *(f"t{i}" for i in range(20)))).encode()
    short = json.dumps(tools_answer("echo", *(f"t{i}" for i in range(7)))).encode()  # INLINE_LIST_ITEMS
    first = g.filter_payload(ALICE, long)
    assert g.filter_payload(ALICE, long) == first and calls == [("alice", 21)]
    bob = Principal("oidc", "bob", "https://idp")
    g.filter_payload(bob, long)
    g.filter_payload(ALICE, short)
    g.filter_payload(ALICE, short)
    assert calls == [("alice", 21), ("bob", 21), ("alice", 8), ("alice", 8)]  # short lists: not kept
    # A reload that changes the policies judges again, and its answer counts.
    policy_file.write_text("cedar: 'forbid(principal, action, resource == Tool::\"echo\");'\n")
    assert g.holder.check()
    assert json.loads(g.filter_payload(ALICE, long))["result"]["tools"] == []
    assert calls[-1] == ("alice", 21) and len(calls) == 5
    # Nothing kept under the replaced policies stays (it would keep them alive).
    assert [held[0] for held in g._listed.values()] == [g.holder.policies]


def test_kept_visibility_belongs_to_exactly_one_list() -> None:
    g = gate(cedar=CEDAR)
    others = [f"t{i}" for i in range(9)]
    for names in (["echo", *others], [*others, "echo"], ["ec", "ho", *others[1:]], ["ec\x00ho", *others]):
        raw = json.dumps(tools_answer(*names)).encode()
        shown = [t["name"] for t in json.loads(g.filter_payload(ALICE, raw))["result"]["tools"]]
        assert shown == (["echo"] if "echo" in names else []), names


@pytest.mark.parametrize("who", ["alice", "josé", "o'brien", "tab\there", "ec\0ho"])
def test_lists_are_filtered_whatever_the_names_and_the_caller_are_spelt_with(who: str) -> None:
    """A caller whose subject held a non-ASCII letter, an apostrophe or a control character saw every
    tool in lists (the textual principal did not parse, so nothing was denied); so did every caller
    for a tool named that way. Only `echo` is permitted here."""
    g = gate(cedar=CEDAR)
    names = ["echo", "résumé-export", "o'clock", "tab\there", "ec\0ho", "😀", "\u0301x", "rm"]
    raw = json.dumps(tools_answer(*names)).encode()
    caller = Principal("oidc", who, "https://idp")
    shown = [t["name"] for t in json.loads(g.filter_payload(caller, raw))["result"]["tools"]]
    assert shown == ["echo"]


def test_an_item_partial_evaluation_cannot_read_is_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever else makes Cedar refuse a list item's request (a UID it cannot parse), the item is
    hidden: no decision is not a permission."""
    from outrider.sidecar.policy import model

    g = gate(cedar="permit(principal, action, resource);")
    monkeypatch.setattr(model, "_PLAIN", re.compile(r"[ -~]*"))  # writes `a"b` unescaped: unparsable
    monkeypatch.setattr(engine_module, "cedar_string", model.cedar_string)
    raw = json.dumps(tools_answer("echo", 'a"b', "rm")).encode()
    shown = [t["name"] for t in json.loads(g.filter_payload(ALICE, raw))["result"]["tools"]]
    assert shown == ["echo", "rm"]


def test_a_caller_cedar_cannot_name_is_shown_nothing() -> None:
    """A token whose subject holds a lone surrogate (JSON `\\ud800`): its calls are all refused, and
    its list answers used to raise out of the filter (Cedar refused the textual UID) or, before
    that, show everything."""
    g = gate(cedar=CEDAR)
    raw = json.dumps(tools_answer("echo", "rm")).encode()
    caller = Principal("oidc", "x\ud800", "https://idp")
    assert json.loads(g.filter_payload(caller, raw))["result"]["tools"] == []


def test_kept_lists_are_bounded_and_hold_any_name(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = gate_module.may_use

    def counting(policies: Any, principal: Any, server: Any, kind: str, names: Any) -> list[bool]:
        calls.append(principal.subject)
        return real(policies, principal, server, kind, names)

    monkeypatch.setattr(gate_module, "may_use", counting)
    g = gate(cedar=CEDAR)
    # A lone surrogate among the names (JSON can spell one): kept like any other list, and hidden.
    raw = json.dumps(tools_answer("echo", "x\ud800", *(f"t{i}" for i in range(9)))).encode()
    for subject in [f"u{i}" for i in range(gate_module._MAX_LISTED)] + ["u0"]:
        shown = json.loads(g.filter_payload(Principal("oidc", subject, "https://idp"), raw))["result"][
            "tools"
        ]
        assert [t["name"] for t in shown] == ["echo"]
    assert len(calls) == gate_module._MAX_LISTED and len(g._listed) == gate_module._MAX_LISTED  # u0 kept
    g.filter_payload(Principal("oidc", "one-more", "https://idp"), raw)
    assert len(g._listed) == 1  # full: cleared whole, then the new one kept
    g.filter_payload(Principal("oidc", "u0", "https://idp"), raw)
    assert calls[-2:] == ["one-more", "u0"]


async def test_a_caller_out_of_budget_for_a_prompt_cannot_complete_its_arguments() -> None:
    """`per_user_prompt` (and `per_prompt`): a prompt's own budget, which `prompts/get` and the
    completions of its arguments both spend; other prompts and other callers keep theirs."""
    g = gate(rate_limits={"per_user_prompt": "2/minute"})

    async def outcome(body: object, who: Principal = ALICE) -> str:
        (verdict,) = (await g.judge(who, parse_body(json.dumps(body).encode()), "streamable-http")).verdicts
        return verdict.outcome

    def complete(name: str) -> dict[str, object]:
        params = {"ref": {"type": "ref/prompt", "name": name}, "argument": {"name": "a", "value": ""}}
        return {"jsonrpc": "2.0", "id": 1, "method": "completion/complete", "params": params}

    get = {"jsonrpc": "2.0", "id": 2, "method": "prompts/get", "params": {"name": "x"}}
    assert [await outcome(get), await outcome(complete("x"))] == ["ok", "ok"]
    assert [await outcome(complete("x")), await outcome(get)] == ["limited", "limited"]
    assert await outcome(complete("y")) == "ok"
    assert await outcome(complete("x"), Principal("oidc", "bob", "https://idp")) == "ok"
    limited = (await g.judge(ALICE, parse_body(json.dumps(get).encode()), "http")).verdicts[0]
    assert limited.limit_scope == "per_user_prompt"
