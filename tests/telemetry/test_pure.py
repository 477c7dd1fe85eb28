"""Pure parts: config parsing, span names/attributes, scrubbing, export planning, audit schema."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from outrider.sidecar.config import ConfigError
from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry import semconv
from outrider.sidecar.telemetry.audit import (
    AuditLog,
    EventStamp,
    Workload,
    egress_event,
    exchange_event,
    mcp_call_event,
    redact_arguments,
)
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.observer import EgressDecision, ExchangeOutcome, Principal, RequestInfo
from outrider.sidecar.telemetry.setup import (
    EXPORT_SWITCH_INTERVAL_S,
    ExportPlan,
    plan_export,
    tune_switch_interval,
)

from .harness import validate_event

STAMP = EventStamp(
    event_id="6f1c2f0e-8a51-4a59-9d1e-3b0d2b7c9a10",
    time=datetime(2026, 11, 25, 15, 0, 0, 123456, tzinfo=UTC),
    trace_id="0af7651916cd43dd8448eb211c80319c",
    span_id="b7ad6b7169203331",
)
BOB = Principal(kind="oidc", subject="bob", issuer="https://idp.test", client_id="cli", delegation=("a", "b"))
REQ = RequestInfo(http_method="POST", transport="streamable-http", protocol_version="2025-03-26")


# --- config -------------------------------------------------------------------------------------


def test_config_defaults_and_parse() -> None:
    assert TelemetryConfig.from_mapping({}) == TelemetryConfig()
    cfg = TelemetryConfig.from_mapping(
        {
            "audit": "/var/log/audit.jsonl",
            "hash_user": "true",
            "hash_salt": "s",
            "record_arguments": True,
            "redact_keys": ["pin"],
            "record_resource_uri": False,
            "service_name": "weather",
        }
    )
    assert cfg.audit == "/var/log/audit.jsonl"
    assert cfg.hash_user and cfg.record_arguments
    assert cfg.redact_keys == ("pin",)
    assert "s'" not in repr(cfg) and "<set>" in repr(cfg)


def test_hash_salt_file(tmp_path: Path) -> None:
    salt = tmp_path / "salt"
    salt.write_text("pepper\n")
    cfg = TelemetryConfig.from_mapping({"hash_user": True, "hash_salt_file": str(salt)})
    assert cfg.with_salt_from_file().hash_salt == "pepper"
    assert "pepper" not in repr(cfg.with_salt_from_file())
    with pytest.raises(ConfigError, match="hash_salt_file"):
        TelemetryConfig(hash_salt_file=str(tmp_path / "missing")).with_salt_from_file()


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"hash_user": "yes"}, "telemetry.hash_user"),
        ({"audit": ""}, "telemetry.audit"),
        ({"redact_keys": "password"}, "telemetry.redact_keys"),
        ({"bogus": 1}, "bogus"),
        ({"service_name": 3}, "telemetry.service_name"),
    ],
)
def test_config_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        TelemetryConfig.from_mapping(data)


# --- semantic conventions -----------------------------------------------------------------------


def test_span_names() -> None:
    cfg = TelemetryConfig()
    assert semconv.mcp_span_name(McpMessage(kind="request", method="tools/call", tool_name="x"), cfg) == (
        "tools/call x"
    )
    assert semconv.mcp_span_name(McpMessage(kind="request", method="prompts/get", prompt_name="p"), cfg) == (
        "prompts/get p"
    )
    uri = McpMessage(kind="request", method="resources/read", resource_uri="file:///a")
    assert semconv.mcp_span_name(uri, cfg) == "resources/read"
    assert semconv.mcp_span_name(uri, TelemetryConfig(record_resource_uri=True)) == "resources/read file:///a"
    assert semconv.mcp_span_name(McpMessage(kind="response", id=1), cfg) == "response"
    assert semconv.mcp_span_name(McpMessage(kind="invalid"), cfg) == "invalid"


@pytest.mark.parametrize(
    ("version", "recorded"),
    [("2024-11-05", True), ("2025-03-26", True), ("2025-11-25", True), ("2026-07-28", False), (None, True)],
)
def test_session_id_only_for_session_revisions(version: str | None, recorded: bool) -> None:
    request = RequestInfo(http_method="POST", transport="x", protocol_version=version, session_id="sid")
    assert (semconv.session_id(request) == "sid") is recorded


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [("10.0.0.1:80", "10.0.0.1", 80), ("[::1]:8080", "::1", 8080), ("::1", "::1", None), ("h", "h", None)],
)
def test_split_address(address: str, host: str, port: int | None) -> None:
    assert semconv.split_address(address) == (host, port)


def test_error_type_precedence() -> None:
    err = McpMessage(kind="response", id=1, is_error=True, error_code=-32601)
    assert semconv.error_type("ok", "x", err, 200) is None
    assert semconv.error_type("tool_error", None, None, 200) == "tool_error"
    assert semconv.error_type("error", "upstream_timeout", err, 504) == "upstream_timeout"
    assert semconv.error_type("error", None, err, 200) == "-32601"
    assert semconv.error_type("denied", None, None, 403) == "403"
    assert semconv.error_type("error", None, None, 200) == "_OTHER"


JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"IdP rejected {JWT}", JWT),
        ("header was Bearer abc123.def-456", "abc123.def-456"),
        ("body: access_token=s3cr3t&x=1", "s3cr3t"),
        ('{"client_secret": "topsecret"}', "topsecret"),
        ("-----BEGIN PRIVATE KEY-----\nMIIEv\n-----END PRIVATE KEY-----", "MIIEv"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ],
)
def test_scrub_masks_credentials(text: str, secret: str) -> None:
    out = semconv.scrub(text)
    assert out is not None and secret not in out and "REDACTED" in out


def test_scrub_keeps_plain_text_and_bounds_length() -> None:
    assert semconv.scrub("connection refused by 127.0.0.1:8080") == "connection refused by 127.0.0.1:8080"
    assert len(semconv.scrub("x" * 1000) or "") == 300


def test_user_hash_is_keyed_and_stable() -> None:
    a = semconv.user_id(BOB, TelemetryConfig(hash_user=True, hash_salt="k1"))
    assert a == semconv.user_id(BOB, TelemetryConfig(hash_user=True, hash_salt="k1"))
    assert a != semconv.user_id(BOB, TelemetryConfig(hash_user=True, hash_salt="k2"))
    assert semconv.user_id(BOB, TelemetryConfig()) == "bob"


# --- export planning from OTEL_* ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "plan"),
    [
        ({}, ExportPlan()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ExportPlan("http/protobuf", "http/protobuf")),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            ExportPlan("grpc", "grpc"),
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"},
            ExportPlan("http/protobuf", None),
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            },
            ExportPlan("grpc", None),
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
                "OTEL_TRACES_EXPORTER": "none",
                "OTEL_METRICS_EXPORTER": "none",
            },
            ExportPlan(),
        ),
    ],
)
def test_plan_export(env: dict[str, str], plan: ExportPlan) -> None:
    assert plan_export(env) == plan


def test_switch_interval_shortened_only_when_an_sdk_exporter_runs() -> None:
    original = sys.getswitchinterval()
    try:
        assert tune_switch_interval(ExportPlan()) is None
        assert sys.getswitchinterval() == original
        # The lean paths' threads hand the GIL back themselves: the interpreter's interval stays.
        assert tune_switch_interval(ExportPlan(traces="http/protobuf"), sdk_export=False) is None
        assert sys.getswitchinterval() == original
        assert tune_switch_interval(ExportPlan(traces="grpc")) == original
        assert sys.getswitchinterval() == pytest.approx(min(original, EXPORT_SWITCH_INTERVAL_S))
    finally:
        sys.setswitchinterval(original)


def test_plan_export_notes_unsupported_protocol() -> None:
    plan = plan_export(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    )
    assert plan.traces == "http/protobuf"
    assert any("http/json" in note for note in plan.notes)


# --- audit events -------------------------------------------------------------------------------


def _call_event(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "message": McpMessage(
            kind="request",
            method="tools/call",
            id="r-1",
            tool_name="fetch",
            arguments={"url": "https://x", "token": "t0k"},
        ),
        "request": REQ,
        "principal": BOB,
        "workload": Workload("spiffe://td/ns/a/sa/b", "pod-1", "a"),
        "outcome": "ok",
        "reason": None,
        "http_status": 200,
        "error_type": None,
        "duration_s": 0.0123,
        "config": TelemetryConfig(),
    }
    args.update(overrides)
    return mcp_call_event(STAMP, **args)


def test_mcp_call_event_golden() -> None:
    event = _call_event()
    validate_event(event)
    assert event == {
        "schema": "outrider.audit/v1",
        "event_id": "6f1c2f0e-8a51-4a59-9d1e-3b0d2b7c9a10",
        "time": "2026-11-25T15:00:00.123Z",
        "type": "mcp.call",
        "outcome": "ok",
        "reason": None,
        "user": {"kind": "oidc", "sub": "bob", "iss": "https://idp.test"},
        "client_id": "cli",
        "act": ["a", "b"],
        "workload": {"spiffe_id": "spiffe://td/ns/a/sa/b", "pod": "pod-1", "namespace": "a"},
        "duration_ms": 12.3,
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
        "mcp": {
            "method": "tools/call",
            "kind": "request",
            "tool": "fetch",
            "prompt": None,
            "resource": None,
            "jsonrpc_id": "r-1",
            "protocol_version": "2025-03-26",
            "session_id": None,
            "transport": "streamable-http",
            "client_address": None,
            "http_status": 200,
            "error_type": None,
            "token_exchange": None,
        },
    }


def test_arguments_recorded_only_when_configured_and_redacted() -> None:
    event = _call_event(config=TelemetryConfig(record_arguments=True))
    validate_event(event)
    assert event["mcp"]["arguments"] == {"url": "https://x", "token": "[REDACTED]"}


def test_exchange_and_egress_events_validate() -> None:
    validate_event(
        exchange_event(
            STAMP,
            outcome=ExchangeOutcome("issued", "api", None, 200, 0.2),
            principal=BOB,
            message=None,
            request=None,
            workload=Workload(),
        )
    )
    validate_event(
        egress_event(
            STAMP,
            decision=EgressDecision(False, "capture", "tls", "1.2.3.4", 443, "x.test", None, "default deny"),
            workload=Workload(),
        )
    )


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.pop("trace_id"),
        lambda e: e.update(outcome="allowed"),  # mcp.call outcomes only
        lambda e: e.update(type="other"),
        lambda e: e.update(extra=1),
        lambda e: e["mcp"].pop("http_status"),
        lambda e: e.update(time="yesterday"),
        lambda e: e.update(
            exchange={"outcome": "x", "audience": None, "cache_hit": False, "idp_status": None}
        ),
    ],
)
def test_schema_rejects_malformed_events(mutate: Any) -> None:
    event = copy.deepcopy(_call_event())
    mutate(event)
    with pytest.raises(jsonschema.ValidationError):
        validate_event(event)


def test_redaction_any_depth_and_case() -> None:
    args = {"a": [{"Client-Secret": "x"}, {"ok": "Bearer abcdef"}], "API_KEY": "k"}
    out = redact_arguments(args, ("client_secret", "api-key"))
    assert out == {
        "a": [{"Client-Secret": "[REDACTED]"}, {"ok": "Bearer [REDACTED]"}],
        "API_KEY": "[REDACTED]",
    }


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=8), lambda c: st.lists(c, max_size=3), max_leaves=8
        ),
    )
)
def test_redaction_output_is_json_and_hides_redacted_keys(args: dict[str, Any]) -> None:
    args = {**args, "password": "hunter2-xyz"}
    out = redact_arguments(args, ("password",))
    text = json.dumps(out)
    assert "hunter2-xyz" not in text


def test_audit_log_file_appends_lines(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.jsonl"
    log = AuditLog.open(str(path))
    log.write(_call_event())
    log.write(_call_event(outcome="denied", http_status=401, principal=None))
    log.close()
    log2 = AuditLog.open(str(path))
    log2.write(_call_event())
    log2.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        validate_event(json.loads(line))
    assert not AuditLog.open("off").enabled


def test_audit_log_unwritable_path_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"telemetry\.audit"):
        AuditLog.open(str(blocker / "audit.jsonl"))


def test_event_ids_are_the_version_4_uuids_the_uuid_module_makes_of_the_same_bits() -> None:
    import random
    import uuid

    from outrider.sidecar.telemetry.audit import random_uuid4

    for seed in range(300):
        random.seed(seed)
        bits = random.getrandbits(128)
        random.seed(seed)
        made = random_uuid4()
        assert made == str(uuid.UUID(int=bits, version=4))
        assert uuid.UUID(made).version == 4 and uuid.UUID(made).variant == uuid.RFC_4122


@pytest.mark.parametrize("outcome", ["cache_hit", "issued"])
@pytest.mark.parametrize("audience", [None, "https://api"])
def test_a_succeeded_exchange_outcome_is_the_dataclass_the_constructor_makes(
    outcome: str, audience: str | None
) -> None:
    made = ExchangeOutcome.succeeded(outcome, audience, 0.25)
    expected = ExchangeOutcome(outcome, audience, duration_s=0.25)
    assert made == expected and hash(made) == hash(expected) and repr(made) == repr(expected)
    assert type(made) is ExchangeOutcome
    # Every field set (a field added later must be added to `succeeded` too), and still frozen.
    assert vars(made).keys() == {f.name for f in dataclasses.fields(ExchangeOutcome)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.outcome = "issued"  # type: ignore[misc]
