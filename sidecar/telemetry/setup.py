"""Wires the OpenTelemetry SDK for an `outrider` process: providers, OTLP exporters, Prometheus reader.

Exporters come from the standard `OTEL_*` variables only; with none set nothing leaves the process.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from outrider.sidecar.telemetry.prometheus import ExportingReader, PrometheusText, shares_aggregation

log = logging.getLogger("outrider.telemetry")

Protocol = Literal["http/protobuf", "grpc"]
Signal = Literal["traces", "metrics"]

_PROTOCOLS: tuple[str, ...] = ("http/protobuf", "grpc", "http/json")


@dataclass(frozen=True)
class ExportPlan:
    """Which signals are exported over which OTLP protocol; decided from the environment alone."""

    traces: Protocol | None = None
    metrics: Protocol | None = None
    notes: tuple[str, ...] = field(default=())


def _enabled(env: Mapping[str, str], signal: Signal) -> bool:
    chosen = env.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").strip().lower()
    if chosen in ("none", ""):
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


def _protocol(env: Mapping[str, str], signal: Signal, notes: list[str]) -> Protocol:
    raw = (
        env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if raw == "grpc":
        return "grpc"
    if raw != "http/protobuf":
        notes.append(f"OTLP protocol {raw!r} for {signal} is not supported; using http/protobuf")
    return "http/protobuf"


def plan_export(env: Mapping[str, str]) -> ExportPlan:
    """Pure: the export plan for an environment (the OTEL_* variables are the only inputs)."""
    notes: list[str] = []
    traces = _protocol(env, "traces", notes) if _enabled(env, "traces") else None
    metrics = _protocol(env, "metrics", notes) if _enabled(env, "metrics") else None
    return ExportPlan(traces=traces, metrics=metrics, notes=tuple(notes))


def _span_exporter(protocol: Protocol) -> SpanExporter:
    # The exporters read endpoint, headers, TLS files, timeout and compression from OTEL_* themselves.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans

        return GrpcSpans()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

    transport = http_transport("traces", os.environ)
    return HttpSpans() if transport is None else HttpSpans(_transport=transport)


def _metric_exporter(protocol: Protocol) -> MetricExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics

        return GrpcMetrics()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics

    transport = http_transport("metrics", os.environ)
    return HttpMetrics() if transport is None else HttpMetrics(_transport=transport)


def tls_files(signal: Signal, env: Mapping[str, str]) -> tuple[bool | str, str | tuple[str, str] | None]:
    """(CA file or True, client certificate [and key]) from OTEL_*, as the SDK's own transport reads them."""
    prefix, generic = f"OTEL_EXPORTER_OTLP_{signal.upper()}_", "OTEL_EXPORTER_OTLP_"
    verify: bool | str = env.get(prefix + "CERTIFICATE") or env.get(generic + "CERTIFICATE") or True
    key = env.get(prefix + "CLIENT_KEY") or env.get(generic + "CLIENT_KEY")
    cert = env.get(prefix + "CLIENT_CERTIFICATE") or env.get(generic + "CLIENT_CERTIFICATE")
    return verify, ((cert, key) if cert and key else cert)


def http_transport(signal: Signal, env: Mapping[str, str]) -> Any:
    """The SDK's urllib3 transport for OTLP/HTTP, or None to keep its default (requests).

    The default transport loads `requests` (~2.5 MB of RSS on top of urllib3, which it uses
    underneath anyway). The SDK chooses the transport's TLS files; passing our own means reading
    them as it does (`tls_files`). An SDK without pluggable transports, or a credential provider
    (which hands the exporter a requests session), keeps the default.
    """
    if env.get(f"OTEL_PYTHON_EXPORTER_OTLP_HTTP_{signal.upper()}_CREDENTIAL_PROVIDER"):
        return None
    try:
        from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
    except ImportError:
        return None
    verify, cert = tls_files(signal, env)
    return Urllib3HTTPTransport(verify=verify, cert=cert)


# While an exporter thread encodes a batch in Python, the event loop waits for the GIL up to the
# interpreter's switch interval (5 ms by default) each time it wakes: a p99 spike on every request
# that lands during an export. 0.5 ms bounds that wait at a small cost in throughput.
EXPORT_SWITCH_INTERVAL_S = 0.0005


def tune_switch_interval(plan: ExportPlan) -> float | None:
    """Shorten the GIL switch interval when something is exported; returns the old value to restore."""
    if plan.traces is None and plan.metrics is None:
        return None
    previous = sys.getswitchinterval()
    if previous > EXPORT_SWITCH_INTERVAL_S:
        sys.setswitchinterval(EXPORT_SWITCH_INTERVAL_S)
    return previous


@dataclass
class TelemetryProviders:
    """The SDK objects one process owns; `shutdown()` flushes spans and metrics before exit."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    prometheus: PrometheusText
    plan: ExportPlan

    def force_flush(self) -> None:
        self.tracer_provider.force_flush(timeout_millis=5000)
        self.meter_provider.force_flush(timeout_millis=5000)

    def shutdown(self) -> None:
        # Flush before shutting down: the batch processor drops queued spans otherwise.
        try:
            self.tracer_provider.force_flush(timeout_millis=5000)
        finally:
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown(timeout_millis=5000)


def build_providers(
    service_name: str,
    *,
    env: Mapping[str, str] | None = None,
    resource_attributes: Mapping[str, str | None] | None = None,
    extra_metric_readers: tuple[MetricReader, ...] = (),
) -> TelemetryProviders:
    """Providers for one process: OTLP per the plan and a Prometheus reader; tests add readers."""
    env = os.environ if env is None else env
    plan = plan_export(env)
    for note in plan.notes:
        log.warning("telemetry: %s", note)
    attributes = {"service.name": service_name}
    attributes.update({k: v for k, v in (resource_attributes or {}).items() if v})
    # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME from the environment.
    resource = Resource.create(attributes)

    tracer_provider = TracerProvider(resource=resource)
    if plan.traces:
        tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter(plan.traces)))

    exporter = _metric_exporter(plan.metrics) if plan.metrics else None
    if exporter is not None and shares_aggregation(exporter):
        # One reader, one aggregation per instrument, for OTLP and /metrics alike.
        prometheus = PrometheusText(ExportingReader(exporter))
        readers: list[MetricReader] = [prometheus.reader, *extra_metric_readers]
    else:
        prometheus = PrometheusText()
        readers = [prometheus.reader, *extra_metric_readers]
        if exporter is not None:
            readers.append(PeriodicExportingMetricReader(exporter))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    log.info(
        "telemetry: traces %s, metrics %s",
        f"exported over OTLP {plan.traces}" if plan.traces else "not exported (no OTEL_* endpoint)",
        f"exported over OTLP {plan.metrics}" if plan.metrics else "on /metrics only",
    )
    return TelemetryProviders(tracer_provider, meter_provider, prometheus, plan)
