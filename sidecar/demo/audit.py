"""Audit events as an operator reads them: one compact line per event with the key fields.

Pure: parses JSON lines from the sidecar's audit output and formats them; unknown keys are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any


def parse_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON objects among `lines` that look like audit events (have an event kind and a time)."""
    events: list[dict[str, Any]] = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and _kind(obj) and ("time" in obj or "timestamp" in obj or "ts" in obj):
            events.append(obj)
    return events


def _get(event: Mapping[str, Any], *paths: str) -> Any:
    for path in paths:
        value: Any = event
        for part in path.split("."):
            if not isinstance(value, Mapping) or part not in value:
                value = None
                break
            value = value[part]
        if value not in (None, "", [], {}):
            return value
    return None


def workload_of(event: Mapping[str, Any]) -> str | None:
    value = _get(event, "workload.spiffe_id", "spiffe_id")
    pod = _get(event, "workload.pod")
    if value is None:
        return None
    return f"{value} (pod {_get(event, 'workload.namespace')}/{pod})" if pod else str(value)


def _kind(event: Mapping[str, Any]) -> str | None:
    kind = _get(event, "event", "kind", "type", "event_type", "category")
    return str(kind) if kind is not None else None


def _time(event: Mapping[str, Any]) -> str:
    t = str(_get(event, "time", "timestamp", "ts") or "")
    # 2026-11-25T15:01:02.123456+00:00 -> 15:01:02.123
    if "T" in t:
        t = t.split("T", 1)[1]
    return t[:12]


def format_event(event: Mapping[str, Any]) -> str:
    """`15:01:02.123 mcp.call ok  user=alice tool=whoami ...` with the key fields of the event."""
    if event.get("schema") == "outrider.audit/v1":
        return _format_v1(event)
    return _format_generic(event)


def _format_v1(event: Mapping[str, Any]) -> str:
    """The sidecar's own schema (sidecar/telemetry/audit-event.schema.json)."""
    kind = str(event.get("type"))
    parts: list[str] = []
    user = _get(event, "user.sub")
    if user:
        parts.append(f"user={user}")
    act = event.get("act") or []
    if act:
        parts.append(f"act={_compact(act)}")
    mcp = event.get("mcp") or {}
    target = " ".join(str(x) for x in (mcp.get("method"), mcp.get("tool") or mcp.get("prompt")) if x)
    if kind == "token.exchange":
        exchange = event.get("exchange") or {}
        parts.append(f"for={target}")
        parts.append(f"exchange={exchange.get('outcome')} aud={exchange.get('audience')}")
    elif kind == "egress.decision":
        egress = event.get("egress") or {}
        parts.append(
            f"dest={egress.get('name') or egress.get('destination_ip')}:{egress.get('destination_port')}"
        )
        parts.append(f"rule={egress.get('rule') or 'default deny'}")
    elif target:
        parts.append(target)
        if mcp.get("http_status") is not None:
            parts.append(f"http={mcp.get('http_status')}")
        policy = event.get("policy") or {}
        if policy:
            parts.append(f"policy={policy.get('decision')}")
            if policy.get("policies"):
                parts.append(f"by={_compact(policy.get('policies'))}")
    if event.get("reason") and kind != "egress.decision":
        parts.append(f"reason={_compact(event.get('reason'))}")
    if event.get("duration_ms") is not None:
        parts.append(f"{float(event['duration_ms']):.1f}ms")
    if event.get("trace_id"):
        parts.append(f"trace={_compact(event['trace_id'])}")
    return f"{_time(event):12} {kind:15} {event.get('outcome')!s:8} " + " ".join(parts)


def _format_generic(event: Mapping[str, Any]) -> str:
    fields: list[tuple[str, Any]] = [
        ("user", _get(event, "user.sub", "user.subject", "principal.subject", "user", "sub", "subject")),
        ("act", _get(event, "delegation", "act", "user.act", "principal.delegation")),
        ("workload", _get(event, "workload.spiffe_id", "spiffe_id", "workload_spiffe_id", "workload")),
        ("method", _get(event, "mcp.method", "mcp.method.name", "method", "mcp_method")),
        ("tool", _get(event, "mcp.tool", "tool", "gen_ai.tool.name", "mcp.name", "target")),
        ("audience", _get(event, "exchange.audience", "audience")),
        ("dest", _get(event, "destination.name", "name", "destination.host", "host", "sni")),
        ("rule", _get(event, "rule", "destination.rule", "decision.rule")),
        ("status", _get(event, "http_status", "status", "http.status")),
        ("reason", _get(event, "reason", "outcome_reason", "error")),
        ("trace", _get(event, "trace_id", "trace.id")),
    ]
    outcome = _get(event, "outcome", "decision", "result") or ""
    parts = [f"{k}={_compact(v)}" for k, v in fields if v is not None]
    return f"{_time(event):12} {_kind(event) or '?':14} {outcome!s:8} " + " ".join(parts)


def _compact(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ">".join(_compact(v) for v in value)
    if isinstance(value, Mapping):
        inner = value.get("sub") or value.get("subject") or json.dumps(value, sort_keys=True)
        return str(inner)
    text = str(value)
    if key_is_trace(text):
        return text[:8] + "…"
    return text if len(text) <= 60 else text[:57] + "..."


def key_is_trace(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)
