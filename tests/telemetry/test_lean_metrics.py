"""The lean metrics path against the OpenTelemetry SDK's: the same OTLP data points and the same /metrics.

Both export over real OTLP/HTTP to a local receiver that decodes the payloads with the official
`opentelemetry-proto` messages; the same calls are driven through each with the same clock, so the
durations, and with them every bucket count, sum, min and max, are equal too.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import math
import time
import types
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict

from outrider.sidecar.telemetry import observer_otel, semconv
from outrider.sidecar.telemetry.audit import AuditLog
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.metric_export import export_interval_s
from outrider.sidecar.telemetry.metric_points import CARDINALITY_LIMIT, LeanMeter
from outrider.sidecar.telemetry.setup import ExportPlan, build_providers, lean_metrics_blocker
from outrider.sidecar.telemetry.worker import Worker

from .harness import WORKLOAD
from .otlp_receiver import Received, otlp_http_receiver
from .test_lean_spans import _drive


def _points(received: Received) -> list[dict[str, Any]]:
    """Every export request as a dict; times checked, then dropped (they are wall-clock readings)."""
    requests = []
    for request in received.metrics:
        d = MessageToDict(request)
        for rm in d["resourceMetrics"]:
            for sm in rm["scopeMetrics"]:
                assert sm["scope"] == {"name": "outrider.sidecar"}
                for metric in sm["metrics"]:
                    kind = next(k for k in ("sum", "gauge", "histogram") if k in metric)
                    for point in metric[kind]["dataPoints"]:
                        assert int(point.pop("timeUnixNano")) > 1_600_000_000 * 10**9
                        start = point.pop("startTimeUnixNano", None)
                        # Gauges have no start; sums and histograms start when their series appeared.
                        assert (start is None) == (kind == "gauge")
                        point["attributes"] = sorted(point.get("attributes", []), key=lambda a: a["key"])
        requests.append(d)
    return requests


async def _run(monkeypatch: pytest.MonkeyPatch, *, lean: bool) -> dict[str, Any]:
    # One clock for both runs: the call durations (and so the histograms) come out equal.
    ticks = itertools.count()
    monkeypatch.setattr(
        observer_otel,
        "time",
        types.SimpleNamespace(perf_counter=lambda: next(ticks) * 0.0037, time_ns=time.time_ns),
    )
    async with otlp_http_receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # only the flushes below export
        providers = build_providers(
            "outrider-proxy",
            resource_attributes={"k8s.pod.name": "weather-0", "k8s.namespace.name": "tools"},
            lean_metrics=lean,
        )
        assert (providers.meter is not None) == lean and (providers.meter_provider is None) == lean
        observer = providers.observer(
            TelemetryConfig(), AuditLog(io.StringIO()), lambda: WORKLOAD, Worker(enabled=False)
        )
        _drive(observer)
        scrapes = [providers.prometheus().decode()]
        await asyncio.to_thread(providers.force_flush)
        # The gauge and the identity counter appear only now: after the first export, as the SDK orders them.
        observer.identity_event("healthy", "spiffe://a/b", "ok")
        observer.identity_event("rotated", "spiffe://a/b", "ok")
        _drive(observer)
        # Past the cardinality limit every new attribute set goes to one overflow point.
        for i in range(CARDINALITY_LIMIT + 5):
            observer.operation_duration.record(0.001 * (i % 7), {"gen_ai.tool.name": f"tool-{i}"})
        observer.exchange_duration.record(-1.0, {"outcome": "issued"})  # refused: negative
        scrapes.append(providers.prometheus().decode())
        await asyncio.to_thread(providers.force_flush)
        observer.identity_event("unhealthy", None, "stream lost")
        await asyncio.wait_for(asyncio.to_thread(providers.shutdown), timeout=30)
        assert len(received.metrics) == 3  # two flushes and the shutdown; scrapes export nothing
        return {"points": _points(received), "scrapes": scrapes, "raw": b"".join(received.raw)}


async def test_lean_metrics_equal_the_sdk_metrics_point_for_point(monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = await _run(monkeypatch, lean=False)
    lean = await _run(monkeypatch, lean=True)
    assert lean["points"] == sdk["points"]
    assert lean["scrapes"] == sdk["scrapes"]  # /metrics byte for byte, sums and buckets included
    last = lean["points"][-1]["resourceMetrics"][0]
    names = [m["name"] for m in last["scopeMetrics"][0]["metrics"]]
    # In the order of their first measurement: the first call's exchange is recorded before its end.
    assert names[:2] == ["outrider.token_exchange.duration", "mcp.server.operation.duration"]
    assert {"outrider.mcp.requests", "outrider.identity.healthy", "outrider.egress.decisions"} <= set(names)
    metrics = {m["name"]: m for m in last["scopeMetrics"][0]["metrics"]}
    durations = metrics["mcp.server.operation.duration"]["histogram"]
    assert durations["aggregationTemporality"] == "AGGREGATION_TEMPORALITY_CUMULATIVE"
    assert durations["dataPoints"][0]["explicitBounds"] == list(semconv.MCP_DURATION_BUCKETS)
    overflow = [
        p
        for p in durations["dataPoints"]
        if p["attributes"] == [{"key": "otel.metric.overflow", "value": {"boolValue": True}}]
    ]
    assert len(overflow) == 1
    requests = metrics["outrider.mcp.requests"]["sum"]
    assert (
        requests["isMonotonic"] and requests["aggregationTemporality"] == "AGGREGATION_TEMPORALITY_CUMULATIVE"
    )
    assert metrics["outrider.identity.healthy"]["gauge"]["dataPoints"][0]["asInt"] == "0"
    assert b"eyJ" not in lean["raw"]


def test_the_lean_meter_keeps_the_sdk_for_what_it_does_not_reproduce() -> None:
    exported = ExportPlan(metrics="http/protobuf")
    assert lean_metrics_blocker(ExportPlan(metrics="grpc"), {}) == "metrics are exported over OTLP/gRPC"
    assert lean_metrics_blocker(ExportPlan(), {}) is None  # /metrics only
    assert lean_metrics_blocker(exported, {}) is None
    assert lean_metrics_blocker(ExportPlan(), {"OTEL_METRICS_EXEMPLAR_FILTER": "always_on"})
    assert lean_metrics_blocker(ExportPlan(), {"OTEL_METRICS_EXEMPLAR_FILTER": "trace_based"}) is None
    assert lean_metrics_blocker(ExportPlan(), {"OTEL_PYTHON_METER_PROVIDER": "x"})
    # The exporter's preferences, read as the exporter reads them (case and spaces ignored; an
    # unknown value means the default, as the exporter falls back to it).
    for preference in ("delta", " LowMemory "):
        env = {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": preference}
        assert lean_metrics_blocker(exported, env)
        assert lean_metrics_blocker(ExportPlan(), env) is None  # /metrics only: no exporter to prefer
    assert (
        lean_metrics_blocker(exported, {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "cumul"}) is None
    )
    histograms = "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION"
    assert lean_metrics_blocker(exported, {histograms: "Base2_Exponential_Bucket_Histogram"})
    assert lean_metrics_blocker(exported, {histograms: "explicit_bucket_histogram"}) is None
    # A credential provider hands the SDK exporter a requests session: the SDK keeps the signal.
    provider = {"OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER": "x"}
    assert (
        lean_metrics_blocker(exported, provider)
        == "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER is set"
    )
    assert lean_metrics_blocker(exported, {"OTEL_PYTHON_EXPORTER_OTLP_HTTP_METRICS_CREDENTIAL_PROVIDER": "x"})
    assert lean_metrics_blocker(ExportPlan(), provider) is None


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta"},
        {"OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION": "base2_exponential_bucket_histogram"},
        {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"},
    ],
)
def test_delta_exponential_or_grpc_metrics_go_through_the_sdk(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    providers = build_providers("outrider-proxy")
    assert providers.meter is None and providers.meter_provider is not None
    assert providers.lean is not None or "grpc" in env.values()
    providers.shutdown()


def test_export_interval_is_read_as_the_sdk_reads_it() -> None:
    assert export_interval_s({}) == 60.0
    assert export_interval_s({"OTEL_METRIC_EXPORT_INTERVAL": "250"}) == 0.25
    assert export_interval_s({"OTEL_METRIC_EXPORT_INTERVAL": "soon"}) == 60.0
    assert math.isinf(export_interval_s({"OTEL_METRIC_EXPORT_INTERVAL": "inf"}))
    with pytest.raises(ValueError, match="OTEL_METRIC_EXPORT_INTERVAL"):
        export_interval_s({"OTEL_METRIC_EXPORT_INTERVAL": "0"})


def test_a_failing_callback_loses_its_own_points_only() -> None:
    meter = LeanMeter()

    def broken(options: object) -> list[Any]:
        raise RuntimeError("boom")

    meter.create_observable_counter("broken", callbacks=[broken])
    histogram = meter.create_histogram("h", "s", "d", explicit_bucket_boundaries_advisory=[1.0])
    histogram.record(0.5, {"a": "b"})
    histogram.record(2.0, {"a": "b"})
    (data,) = meter.collect()
    assert data.name == "h" and data.points[0].bucket_counts == (1, 1)  # type: ignore[union-attr]


def test_lean_metrics_do_not_load_the_sdk_metrics_when_only_traces_are_exported() -> None:
    """A fresh interpreter: spans exported, metrics on /metrics only; the SDK's metrics never load."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = """
import io, json, sys
from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.telemetry.audit import AuditLog
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.observer import RequestInfo
from outrider.sidecar.telemetry.setup import build_providers
providers = build_providers("outrider-proxy")
assert providers.plan.traces and not providers.plan.metrics and providers.meter is not None
observer = providers.observer(TelemetryConfig(), AuditLog(io.StringIO()))
message = McpMessage(kind="request", method="tools/list", id=1)
with observer.mcp_call(message, RequestInfo("POST", "stateless")) as s:
    s.finish(http_status=200, outcome="ok")
text = providers.prometheus().decode()
providers.shutdown()
print(json.dumps({"sdk_metrics": "opentelemetry.sdk.metrics" in sys.modules, "text": text}))
"""
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces", "PATH": "/usr/bin:/bin"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sdk_metrics"] is False
    assert 'mcp_server_operation_duration_seconds_count{mcp_method_name="tools/list"' in result["text"]


def test_records_from_many_threads_during_collections_are_all_counted() -> None:
    import threading

    meter = LeanMeter()
    histogram = meter.create_histogram("h", "s", "d", explicit_bucket_boundaries_advisory=[0.5])
    stop = threading.Event()

    def collector() -> None:
        while not stop.is_set():
            meter.collect()
            meter.prometheus()

    def recorder(n: int) -> None:
        for i in range(2500):
            histogram.record(0.25 if i % 2 else 0.75, {"thread": n, "series": i % 300})

    watcher = threading.Thread(target=collector)
    watcher.start()
    threads = [threading.Thread(target=recorder, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stop.set()
    watcher.join(30)
    assert not watcher.is_alive() and not any(t.is_alive() for t in threads)
    (data,) = meter.collect()
    assert sum(p.count for p in data.points) == 10_000  # type: ignore[union-attr]
    assert len(data.points) == 1200
    assert sum(p.bucket_counts[0] for p in data.points) == 5_000  # type: ignore[union-attr]


async def test_a_lone_surrogate_in_a_tool_name_loses_no_span_line_or_metric(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A caller's `"name": "\\ud800"` must not fail an export request, a batch of audit lines or /metrics."""
    import json

    from outrider.sidecar.inbound.jsonrpc import parse_body
    from outrider.sidecar.telemetry.observer import RequestInfo

    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"evil\\ud800"}}'
    evil = parse_body(body).messages[0]
    assert evil.tool_name == "evil\ud800"
    async with otlp_http_receiver() as (endpoint, received):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
        providers = build_providers("outrider-proxy")
        audit = AuditLog.open(str(tmp_path / "audit.log"))  # a UTF-8 file, as in a pod
        worker = Worker(enabled=True)
        observer = providers.observer(TelemetryConfig(), audit, lambda: WORKLOAD, worker)
        for message in (evil, evil.__class__(kind="request", method="tools/call", id=2, tool_name="ok")):
            with observer.mcp_call(message, RequestInfo("POST", "stateless")) as scope:
                scope.finish(http_status=200, outcome="ok")
        worker.close()
        audit.close()
        text = providers.prometheus().decode()
        await asyncio.wait_for(asyncio.to_thread(providers.shutdown), timeout=30)
    names = sorted(
        s.name for r in received.traces for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans
    )
    assert names == ["tools/call evil?", "tools/call ok"]
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text("utf-8").splitlines()]
    assert [line["mcp"]["tool"] for line in lines] == ["evil\ud800", "ok"]  # escaped on the wire, kept
    assert 'gen_ai_tool_name="evil?"' in text and 'gen_ai_tool_name="ok"' in text
    tools = {
        kv.value.string_value
        for r in received.metrics
        for rm in r.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "outrider.mcp.requests"
        for p in m.sum.data_points
        for kv in p.attributes
        if kv.key == "gen_ai.tool.name"
    }
    assert tools == {"evil?", "ok"}
