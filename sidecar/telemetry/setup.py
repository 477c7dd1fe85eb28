"""Sets up telemetry for an `outrider` process: the lean span and metric paths, or the OpenTelemetry SDK.

Exporters come from the standard `OTEL_*` variables only; with none set nothing leaves the process. On
the lean paths (OTLP over HTTP/protobuf, the default) neither the SDK nor its exporters nor protobuf
are imported: `otel_env` reads the SDK's settings and `otlp_http` posts the requests `otlp_wire` writes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from outrider.sidecar.telemetry import otel_env
from outrider.sidecar.telemetry.audit import AuditLog, Workload
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.metric_export import MetricExport
from outrider.sidecar.telemetry.metric_points import LeanMeter
from outrider.sidecar.telemetry.otlp_http import ExporterSettings, OtlpHttpClient
from outrider.sidecar.telemetry.span_export import BatchSettings, SpanBatcher
from outrider.sidecar.telemetry.spans import LeanTracer, SamplerPlan, SpanRecord
from outrider.sidecar.telemetry.worker import Worker

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from outrider.sidecar.telemetry.observer_otel import OtelObserver

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


# Settings the lean span path does not reproduce; with any of them set, spans go through the SDK.
_SDK_ONLY_SETTINGS = (
    "OTEL_PYTHON_ID_GENERATOR",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_ATTRIBUTE_COUNT_LIMIT",
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "OTEL_PYTHON_TRACER_PROVIDER",
)


def _credential_provider(plan: ExportPlan, env: Mapping[str, str], signal: Signal) -> str | None:
    """A credential provider hands the SDK exporter a `requests` session: only the SDK can use it."""
    if getattr(plan, signal) is None:
        return None
    for name in (
        f"OTEL_PYTHON_EXPORTER_OTLP_HTTP_{signal.upper()}_CREDENTIAL_PROVIDER",
        "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    ):
        if env.get(name):
            return f"{name} is set"
    return None


def lean_spans_blocker(plan: ExportPlan, env: Mapping[str, str]) -> str | None:
    """Pure: why spans must go through the SDK for this environment, or None for the lean path.

    The lean path (span records, OTLP written by `otlp_wire`) covers traces exported over OTLP/HTTP or
    not exported at all, with the standard samplers; gRPC and the SDK-only settings keep the SDK.
    """
    if plan.traces == "grpc":
        return "traces are exported over OTLP/gRPC"
    for name in _SDK_ONLY_SETTINGS:
        if env.get(name):
            return f"{name} is set"
    return _credential_provider(plan, env, "traces")


# With any of these set, metrics go through the SDK (views, exemplars or a provider the lean path lacks).
_SDK_ONLY_METRIC_SETTINGS = ("OTEL_PYTHON_METER_PROVIDER",)
_LEAN_EXEMPLAR_FILTERS = ("", "trace_based", "always_off")


def lean_metrics_blocker(plan: ExportPlan, env: Mapping[str, str]) -> str | None:
    """Pure apart from warnings: why metrics need the SDK, or None.

    The lean path (`metric_points.LeanMeter`, OTLP written by `otlp_wire`) covers metrics exported
    over OTLP/HTTP or on /metrics only, cumulative, with explicit buckets and no exemplars: what
    the sidecar's instruments produce by default. Exemplars never occur with the default
    `trace_based` filter: measurements are recorded outside any active span.
    """
    if plan.metrics == "grpc":
        return "metrics are exported over OTLP/gRPC"
    if plan.metrics is not None:
        preferences = otel_env.metric_preferences_blocker(env)
        if preferences is not None:
            return preferences
    exemplars = env.get("OTEL_METRICS_EXEMPLAR_FILTER", "").strip().lower()
    if exemplars not in _LEAN_EXEMPLAR_FILTERS:
        return f"OTEL_METRICS_EXEMPLAR_FILTER={exemplars}"
    for name in _SDK_ONLY_METRIC_SETTINGS:
        if env.get(name):
            return f"{name} is set"
    return _credential_provider(plan, env, "metrics")


def _lean_metric_export(
    meter: LeanMeter, resource: Mapping[str, Any], env: Mapping[str, str]
) -> MetricExport:
    """The periodic export of the lean metrics, posted by our own OTLP/HTTP client."""
    from outrider.sidecar.telemetry.observer_otel import INSTRUMENTATION
    from outrider.sidecar.telemetry.otlp_wire import MetricsRequestEncoder

    client = OtlpHttpClient(ExporterSettings.from_env("metrics", env))
    encoder = MetricsRequestEncoder(resource, INSTRUMENTATION)
    return MetricExport(meter, encoder.encode_metrics, client.export, client.shutdown)


def _lean_tracer(
    resource: Mapping[str, Any], exporting: bool, sampler: SamplerPlan, env: Mapping[str, str]
) -> tuple[LeanTracer, SpanBatcher[bytes] | None]:
    """The lean tracer and, when exporting, its batcher (posting with our own OTLP/HTTP client)."""
    from outrider.sidecar.telemetry.observer_otel import INSTRUMENTATION
    from outrider.sidecar.telemetry.otlp_wire import TraceRequestEncoder, span_field

    if not exporting:
        return LeanTracer(sampler, None), None
    settings = BatchSettings.from_env(env)
    client = OtlpHttpClient(ExporterSettings.from_env("traces", env))
    encoder = TraceRequestEncoder(resource, INSTRUMENTATION)
    # Each span is written as it ends (on the telemetry thread, where its record is still in cache);
    # the batcher queues the bytes, and its thread only joins a batch and posts it.
    batcher = SpanBatcher(encoder.encode_fields, client.export, settings, client.shutdown)
    add = batcher.add

    def sink(record: SpanRecord) -> None:
        add(span_field(record))

    return LeanTracer(sampler, sink, add), batcher


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


# While an SDK exporter thread encodes a batch in Python, the event loop waits for the GIL up to the
# interpreter's switch interval (5 ms by default) each time it wakes: a p99 spike on every request
# that lands during an export. 0.5 ms bounds that wait, at a cost: every thread waiting for the GIL
# wakes 2,000 times a second and the loop is made to drop it as often. The lean paths' threads hand
# the GIL over themselves every few hundred microseconds (`worker.yield_gil`), so they keep the
# default interval.
EXPORT_SWITCH_INTERVAL_S = 0.0005


def tune_switch_interval(plan: ExportPlan, *, sdk_export: bool = True) -> float | None:
    """Shorten the GIL switch interval when an SDK exporter runs; returns the old value to restore."""
    if (plan.traces is None and plan.metrics is None) or not sdk_export:
        return None
    previous = sys.getswitchinterval()
    if previous > EXPORT_SWITCH_INTERVAL_S:
        sys.setswitchinterval(EXPORT_SWITCH_INTERVAL_S)
    return previous


@dataclass
class TelemetryProviders:
    """The span and metric paths one process owns; `shutdown()` flushes spans and metrics before exit."""

    tracer_provider: TracerProvider | None  # None: spans on the lean path (`lean`)
    meter_provider: MeterProvider | None  # None: metrics on the lean path (`meter`)
    prometheus: Callable[[], bytes]  # the `/metrics` text of these metrics
    plan: ExportPlan
    # The lean span path (None: spans go through `tracer_provider`) and its exporter, if exporting.
    lean: LeanTracer | None = None
    batcher: SpanBatcher[bytes] | None = None
    # The lean metrics path (None: metrics go through `meter_provider`) and its exporter, if exporting.
    meter: LeanMeter | None = None
    metric_export: MetricExport | None = None

    def observer(
        self,
        config: TelemetryConfig,
        audit: AuditLog,
        workload: Callable[[], Workload] = Workload,
        worker: Worker | None = None,
    ) -> OtelObserver:
        """The observer over these providers: on lean span records when `build_providers` chose them."""
        from outrider.sidecar.telemetry.observer_lean import LeanObserver
        from outrider.sidecar.telemetry.observer_otel import OtelObserver

        meters: MeterProvider | LeanMeter | None = (
            self.meter if self.meter is not None else self.meter_provider
        )
        assert meters is not None
        if self.lean is not None:
            return LeanObserver(
                config,
                tracer=self.lean,
                meter_provider=meters,
                audit=audit,
                workload=workload,
                flush=self.force_flush,
                worker=worker,
            )
        assert self.tracer_provider is not None
        return OtelObserver(
            config,
            tracer_provider=self.tracer_provider,
            meter_provider=meters,
            audit=audit,
            workload=workload,
            flush=self.force_flush,
            worker=worker,
        )

    def sdk_export(self) -> bool:
        """Whether an SDK exporter thread (long GIL holds while encoding) exports anything."""
        return bool((self.plan.traces and self.lean is None) or (self.plan.metrics and self.meter is None))

    def force_flush(self) -> None:
        if self.batcher is not None:
            self.batcher.force_flush()
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(timeout_millis=5000)
        if self.metric_export is not None:
            self.metric_export.force_flush()
        if self.meter_provider is not None:
            self.meter_provider.force_flush(timeout_millis=5000)

    def shutdown(self) -> None:
        # Flush before shutting down: the batch processor drops queued spans otherwise.
        try:
            if self.batcher is not None:
                self.batcher.shutdown()
            if self.tracer_provider is not None:
                self.tracer_provider.force_flush(timeout_millis=5000)
        finally:
            if self.tracer_provider is not None:
                self.tracer_provider.shutdown()
            if self.metric_export is not None:
                self.metric_export.shutdown()
            if self.meter_provider is not None:
                self.meter_provider.shutdown(timeout_millis=5000)


def build_providers(
    service_name: str,
    *,
    env: Mapping[str, str] | None = None,
    resource_attributes: Mapping[str, str | None] | None = None,
    extra_metric_readers: tuple[MetricReader, ...] = (),
    lean_spans: bool = True,
    lean_metrics: bool | None = None,
) -> TelemetryProviders:
    """Span and metric paths for one process: OTLP per the plan and `/metrics`; tests add readers.

    Spans take the lean path (`lean` set) unless `lean_spans` is False or the environment needs the
    SDK (`lean_spans_blocker`); metrics likewise (`meter` set) unless `lean_metrics` (default: as
    `lean_spans`) is False, readers are added, or `lean_metrics_blocker` names a reason. The lean
    paths read `env` (default `os.environ`); the SDK, where it is used, reads `os.environ` itself.
    """
    env = os.environ if env is None else env
    plan = plan_export(env)
    for note in plan.notes:
        log.warning("telemetry: %s", note)
    attributes = {"service.name": service_name}
    attributes.update({k: v for k, v in (resource_attributes or {}).items() if v})
    # What Resource.create would hold: OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME merged in.
    resource: Mapping[str, Any] | None = otel_env.resource_attributes(attributes, env)
    if resource is None:  # resource detectors only the SDK has
        resource = otel_env.sdk_resource_attributes(attributes)

    tracer_provider: TracerProvider | None = None
    lean: LeanTracer | None = None
    batcher: SpanBatcher[bytes] | None = None
    blocker = lean_spans_blocker(plan, env) if lean_spans else "the SDK path was asked for"
    if blocker is None:
        lean, batcher = _lean_tracer(resource, plan.traces is not None, otel_env.sampler_from_env(env), env)
    else:
        log.info("telemetry: spans through the OpenTelemetry SDK: %s", blocker)
        tracer_provider = _sdk_tracer_provider(resource, plan.traces)

    wants_lean = lean_spans if lean_metrics is None else lean_metrics
    metrics_blocker = lean_metrics_blocker(plan, env) if wants_lean else "the SDK path was asked for"
    if metrics_blocker is None and extra_metric_readers:
        metrics_blocker = "extra metric readers were given"
    meter: LeanMeter | None = None
    metric_export: MetricExport | None = None
    meter_provider: MeterProvider | None = None
    if metrics_blocker is None:
        meter = LeanMeter()
        if plan.metrics is not None:
            metric_export = _lean_metric_export(meter, resource, env)
        prometheus: Callable[[], bytes] = meter.prometheus
    else:
        log.info("telemetry: metrics through the OpenTelemetry SDK: %s", metrics_blocker)
        exporter = _metric_exporter(plan.metrics) if plan.metrics else None
        prometheus, meter_provider = _sdk_meter_provider(
            _sdk_resource(resource), exporter, extra_metric_readers
        )
    log.info(
        "telemetry: traces %s, metrics %s",
        f"exported over OTLP {plan.traces}" if plan.traces else "not exported (no OTEL_* endpoint)",
        f"exported over OTLP {plan.metrics}" if plan.metrics else "on /metrics only",
    )
    return TelemetryProviders(
        tracer_provider, meter_provider, prometheus, plan, lean, batcher, meter, metric_export
    )


def _sdk_resource(attributes: Mapping[str, Any]) -> Resource:
    """The SDK's Resource with the attributes the lean paths send: one resource (and one
    `service.instance.id`) whichever path a signal takes."""
    from opentelemetry.sdk.resources import Resource

    return Resource(dict(attributes))


def _sdk_tracer_provider(resource: Mapping[str, Any], protocol: Protocol | None) -> TracerProvider:
    """The SDK's TracerProvider (sampler from `OTEL_TRACES_SAMPLER`), with a batch exporter if exporting."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=_sdk_resource(resource))
    if protocol:
        provider.add_span_processor(BatchSpanProcessor(_span_exporter(protocol)))
    return provider


def _sdk_meter_provider(
    resource: Resource, exporter: MetricExporter | None, extra_metric_readers: tuple[MetricReader, ...]
) -> tuple[Callable[[], bytes], MeterProvider]:
    """The SDK's MeterProvider with a Prometheus reader, sharing the OTLP reader when it can."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    from outrider.sidecar.telemetry.prometheus import ExportingReader, PrometheusText, shares_aggregation

    if exporter is not None and shares_aggregation(exporter):
        # One reader, one aggregation per instrument, for OTLP and /metrics alike.
        prometheus = PrometheusText(ExportingReader(exporter))
        readers: list[MetricReader] = [prometheus.reader, *extra_metric_readers]
    else:
        prometheus = PrometheusText()
        readers = [prometheus.reader, *extra_metric_readers]
        if exporter is not None:
            readers.append(PeriodicExportingMetricReader(exporter))
    return prometheus, MeterProvider(resource=resource, metric_readers=readers)
