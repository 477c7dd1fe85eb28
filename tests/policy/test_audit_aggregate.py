"""Repeated identical denials are folded into one audit event per interval with a count."""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime

import jsonschema

from outrider.sidecar.inbound.jsonrpc import parse_message
from outrider.sidecar.telemetry.aggregate import DenialAggregator
from outrider.sidecar.telemetry.audit import (
    AuditLog,
    EventStamp,
    Workload,
    egress_event,
    load_schema,
    mcp_call_event,
)
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.observer import EgressDecision, PolicyOutcome, Principal, RequestInfo

ALICE = Principal("oidc", "alice", "https://idp")
REQUEST = RequestInfo(http_method="POST", transport="streamable-http")


def denied_call(msg_id: int, tool: str = "delete") -> dict[str, object]:
    message = parse_message(
        {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": tool, "arguments": {}}}
    )
    return mcp_call_event(
        EventStamp.at(datetime.now(UTC)),
        message=message,
        request=REQUEST,
        principal=ALICE,
        workload=Workload(),
        outcome="denied",
        reason="no policy in cluster default permits this call",
        http_status=200,
        error_type="policy_denied",
        duration_s=0.001,
        config=TelemetryConfig(),
        policy=PolicyOutcome(decision="deny"),
    )


def egress_denied() -> dict[str, object]:
    decision = EgressDecision(False, "capture", "tls", "1.2.3.4", 443, "evil.example", None, "not allowed")
    return egress_event(EventStamp.now(), decision=decision, workload=Workload())


def test_identical_denials_fold_into_one_summary_per_window() -> None:
    agg = DenialAggregator(10.0)
    first = agg.offer(denied_call(1), now=100.0)
    assert [e["mcp"]["jsonrpc_id"] for e in first] == [1]  # the first one is written at once
    for i in range(2, 50):
        assert agg.offer(denied_call(i), now=100.0 + i / 10) == []
    # Another tool, an allowed call and an egress denial are not folded into it.
    assert len(agg.offer(denied_call(99, "rm"), now=105.0)) == 1
    ok = dict(denied_call(100), outcome="ok")
    assert agg.offer(ok, now=105.0) == [ok]
    assert len(agg.offer(egress_denied(), now=105.0)) == 1
    assert agg.offer(egress_denied(), now=105.5) == []
    summaries = agg.offer(denied_call(200), now=115.5)
    by_type = {(e["type"], e.get("aggregate", {}).get("count")) for e in summaries}
    assert ("mcp.call", 48) in by_type and ("egress.decision", 1) in by_type
    summary = next(e for e in summaries if e["type"] == "mcp.call" and "aggregate" in e)
    assert summary["mcp"]["jsonrpc_id"] == 49  # the last folded occurrence
    jsonschema.validate(summary, load_schema())
    assert agg.folded_total == 49


def test_audit_log_writes_the_summary_when_the_window_ends() -> None:
    stream = io.StringIO()
    log = AuditLog(stream, aggregate_s=0.2)
    try:
        for i in range(10):
            log.write(denied_call(i))
        log.write(egress_denied())
        log.write(egress_denied())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and stream.getvalue().count("\n") < 4:
            time.sleep(0.05)
    finally:
        log.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    schema = load_schema()
    for line in lines:
        jsonschema.validate(line, schema)
    counts = sorted((e["type"], e.get("aggregate", {}).get("count", 0)) for e in lines)
    assert counts == [("egress.decision", 0), ("egress.decision", 1), ("mcp.call", 0), ("mcp.call", 9)]
