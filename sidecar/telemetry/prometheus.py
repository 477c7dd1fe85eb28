"""Prometheus text exposition of the sidecar's OpenTelemetry metrics, for /metrics on the admin port.

A pull-based SDK reader collects on each scrape; `prom_text` writes the text format.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    MetricExporter,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation

from outrider.sidecar.telemetry.prom_text import Family, Kind, label_name, metric_name
from outrider.sidecar.telemetry.prom_text import labels_of as _labels
from outrider.sidecar.telemetry.prom_text import render as render_text

__all__ = ["ExportingReader", "PrometheusText", "families", "label_name", "metric_name", "render"]


def families(metric: Metric) -> Iterator[Family]:
    """Prometheus metric families for one OTel metric (cumulative data expected)."""
    name = metric_name(metric.name, metric.unit)
    doc = metric.description or metric.name
    data = metric.data
    if isinstance(data, Sum | Gauge):
        points = [(_labels(p.attributes), p) for p in data.data_points]
        label_keys = sorted({k for labels, _ in points for k in labels})
        kind: Kind = "counter" if isinstance(data, Sum) and data.is_monotonic else "gauge"
        family = Family(name, doc, kind, label_keys)
        for labels, point in points:
            family.add([labels.get(k, "") for k in label_keys], float(point.value))
        yield family
    elif isinstance(data, Histogram):
        hpoints = [(_labels(p.attributes), p) for p in data.data_points]
        label_keys = sorted({k for labels, _ in hpoints for k in labels})
        hist = Family(name, doc, "histogram", label_keys)
        for labels, hpoint in hpoints:
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(hpoint.explicit_bounds, hpoint.bucket_counts, strict=False):
                cumulative += count
                buckets.append((repr(float(bound)), float(cumulative)))
            buckets.append(("+Inf", float(hpoint.count)))
            hist.add_histogram([labels.get(k, "") for k in label_keys], buckets, float(hpoint.sum))
        yield hist


def render(data: MetricsData | None) -> bytes:
    """Prometheus text format 0.0.4 for everything in `data`."""
    metrics: list[Metric] = []
    if data is not None:
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                metrics.extend(scope_metrics.metrics)
    return render_text(family for metric in metrics for family in families(metric))


class ExportingReader(PeriodicExportingMetricReader):
    """The OTLP reader that /metrics also reads: one aggregation of each instrument for both.

    Every reader on a MeterProvider keeps its own aggregation of every measurement, so a second
    (pull) reader for /metrics doubled the metric work of every call. A scrape collects this reader
    on the calling thread and keeps the data instead of exporting it; with cumulative temporality
    (see `shares_aggregation`) an extra collection changes nothing the exporter sends.
    """

    def __init__(self, exporter: MetricExporter) -> None:
        super().__init__(exporter)
        self._scrape = threading.local()

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        if getattr(self._scrape, "active", False):
            self._scrape.data = metrics_data
            return
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)

    def scrape(self) -> MetricsData | None:
        self._scrape.active, self._scrape.data = True, None
        try:
            self.collect()
            data: MetricsData | None = self._scrape.data
            return data
        finally:
            self._scrape.active, self._scrape.data = False, None


def shares_aggregation(exporter: MetricExporter) -> bool:
    """Whether /metrics can read the exporter's reader: cumulative and explicit-bucket, as Prometheus is.

    With delta temporality (OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE) a scrape would take
    the exporter's deltas; with exponential histograms /metrics has no text form for them.
    """
    temporality = (exporter._preferred_temporality or {}).values()
    aggregations = (exporter._preferred_aggregation or {}).values()
    return all(t == AggregationTemporality.CUMULATIVE for t in temporality) and not any(
        isinstance(a, ExponentialBucketHistogramAggregation) for a in aggregations
    )


class PrometheusText:
    """The `/metrics` producer: over its own pull reader, or over the OTLP reader it shares."""

    def __init__(self, shared: ExportingReader | None = None) -> None:
        self.reader: MetricReader
        self._read: Callable[[], MetricsData | None]
        if shared is not None:
            self.reader, self._read = shared, shared.scrape
        else:
            pull = InMemoryMetricReader()
            self.reader, self._read = pull, pull.get_metrics_data

    def __call__(self) -> bytes:
        return render(self._read())
