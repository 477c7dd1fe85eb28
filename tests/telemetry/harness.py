"""Test harness: an OtelObserver wired to the SDK in-memory span exporter and metric reader."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import jsonschema
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from outrider.sidecar.telemetry.audit import AuditLog, Workload, load_schema
from outrider.sidecar.telemetry.config import TelemetryConfig
from outrider.sidecar.telemetry.observer_otel import OtelObserver
from outrider.sidecar.telemetry.worker import Worker

WORKLOAD = Workload(
    spiffe_id="spiffe://cluster.local/ns/tools/sa/weather", pod="weather-0", namespace="tools"
)

_VALIDATOR = jsonschema.Draft202012Validator(
    load_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)


def validate_event(event: dict[str, Any]) -> None:
    """Raise if an audit event does not match the shipped JSON Schema."""
    _VALIDATOR.validate(event)


@dataclass
class Harness:
    observer: OtelObserver
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    audit_stream: io.StringIO

    def spans(self) -> list[ReadableSpan]:
        self.observer.worker.drain()
        return list(self.exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, f"expected one span {name!r}, got {[s.name for s in self.spans()]}"
        return found[0]

    def audit(self) -> list[dict[str, Any]]:
        """Every audit line written so far, each validated against the schema."""
        self.observer.worker.drain()
        events = [json.loads(line) for line in self.audit_stream.getvalue().splitlines() if line]
        for event in events:
            validate_event(event)
        return events

    def points(self, name: str) -> list[NumberDataPoint | HistogramDataPoint]:
        self.observer.worker.drain()
        data = self.reader.get_metrics_data()
        if data is None:
            return []
        out: list[Any] = []
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        out.extend(metric.data.data_points)
        return out

    def counter(self, name: str, **attrs: Any) -> float:
        """Sum of a counter's points whose attributes include `attrs`."""
        total = 0.0
        for point in self.points(name):
            assert isinstance(point, NumberDataPoint)
            if all(point.attributes.get(k) == v for k, v in attrs.items()):
                total += point.value
        return total


def make_harness(
    config: TelemetryConfig | None = None, workload: Workload = WORKLOAD, *, background: bool = False
) -> Harness:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    stream = io.StringIO()
    observer = OtelObserver(
        config or TelemetryConfig(),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        audit=AuditLog(stream),
        workload=lambda: workload,
        worker=Worker(enabled=background),
    )
    return Harness(observer, exporter, reader, stream)
