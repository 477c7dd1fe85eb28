"""Prometheus text exposition of the sidecar's OpenTelemetry metrics, for /metrics on the admin port.

A pull-based SDK reader collects on each scrape; prometheus_client does the text formatting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    MetricsData,
    Sum,
)
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import (
    Metric as PromMetric,
)
from prometheus_client.registry import Collector, CollectorRegistry

_UNIT_SUFFIX = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")


def metric_name(name: str, unit: str | None) -> str:
    """OTel -> Prometheus name: dots to underscores and the unit as suffix (`..._seconds`)."""
    base = _INVALID.sub("_", name)
    suffix = _UNIT_SUFFIX.get(unit or "")
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    return base


def label_name(key: str) -> str:
    return _INVALID.sub("_", key)


def _labels(attributes: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (attributes or {}).items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        out[label_name(key)] = text
    return out


def families(metric: Metric) -> Iterator[PromMetric]:
    """Prometheus metric families for one OTel metric (cumulative data expected)."""
    name = metric_name(metric.name, metric.unit)
    doc = metric.description or metric.name
    data = metric.data
    if isinstance(data, Sum | Gauge):
        points = [(_labels(p.attributes), p) for p in data.data_points]
        label_keys = sorted({k for labels, _ in points for k in labels})
        family: PromMetric
        if isinstance(data, Sum) and data.is_monotonic:
            family = CounterMetricFamily(name, doc, labels=label_keys)
        else:
            family = GaugeMetricFamily(name, doc, labels=label_keys)
        for labels, point in points:
            family.add_metric([labels.get(k, "") for k in label_keys], float(point.value))
        yield family
    elif isinstance(data, Histogram):
        hpoints = [(_labels(p.attributes), p) for p in data.data_points]
        label_keys = sorted({k for labels, _ in hpoints for k in labels})
        hist = HistogramMetricFamily(name, doc, labels=label_keys)
        for labels, hpoint in hpoints:
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(hpoint.explicit_bounds, hpoint.bucket_counts, strict=False):
                cumulative += count
                buckets.append((repr(float(bound)), float(cumulative)))
            buckets.append(("+Inf", float(hpoint.count)))
            hist.add_metric([labels.get(k, "") for k in label_keys], buckets, float(hpoint.sum))
        yield hist


class _Snapshot(Collector):
    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def collect(self) -> Iterator[PromMetric]:
        for metric in self._metrics:
            yield from families(metric)


def render(data: MetricsData | None) -> bytes:
    """Prometheus text format 0.0.4 for everything in `data`."""
    metrics: list[Metric] = []
    if data is not None:
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                metrics.extend(scope_metrics.metrics)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(metrics))
    return generate_latest(registry)


class PrometheusText:
    """A metric reader to add to the MeterProvider, and the `/metrics` producer over it."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()

    def __call__(self) -> bytes:
        return render(self.reader.get_metrics_data())
