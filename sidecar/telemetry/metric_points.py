"""Lean metrics: the sidecar's histograms, counters and gauge aggregated in plain Python, cumulative.

Stands in for the OpenTelemetry SDK's `MeterProvider` where the SDK's output is reproducible (cumulative
temporality, explicit buckets, no exemplars: `setup.lean_metrics_blocker`): the same data points, in
the same order, at a tenth of the SDK's cost per measurement. `otlp_wire` and `prom_text` write them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from outrider.sidecar.telemetry.prom_text import Family, labels_of, metric_name
from outrider.sidecar.telemetry.prom_text import render as render_text

log = logging.getLogger("outrider.telemetry")

# As the SDK: past this many attribute sets per instrument, new ones go to one overflow point.
CARDINALITY_LIMIT = 2000
_OVERFLOW: dict[str, Any] = {"otel.metric.overflow": True}
_OVERFLOW_KEY = frozenset(_OVERFLOW.items())

MetricKind = Literal["histogram", "sum", "gauge"]


@dataclass(frozen=True, slots=True)
class NumberPoint:
    attributes: Mapping[str, Any]
    start_ns: int  # 0: none (gauges)
    time_ns: int
    value: int | float


@dataclass(frozen=True, slots=True)
class HistogramPoint:
    attributes: Mapping[str, Any]
    start_ns: int
    time_ns: int
    count: int
    sum: float
    bucket_counts: tuple[int, ...]
    bounds: tuple[float, ...]
    min: float
    max: float


@dataclass(frozen=True, slots=True)
class MetricData:
    """One instrument's points at one collection; sums are monotonic and cumulative."""

    name: str
    unit: str
    description: str
    kind: MetricKind
    points: tuple[NumberPoint, ...] | tuple[HistogramPoint, ...]


class _Series:
    """One attribute set of a histogram."""

    __slots__ = ("attributes", "counts", "max", "min", "start_ns", "sum")

    def __init__(self, attributes: dict[str, Any], buckets: int, start_ns: int) -> None:
        self.attributes = attributes
        self.counts = [0] * buckets
        self.sum: float = 0
        self.min = math.inf
        self.max = -math.inf
        self.start_ns = start_ns


class LeanHistogram:
    """`Histogram.record` with explicit buckets; `record` is the only call on the hot path."""

    def __init__(
        self, meter: LeanMeter, name: str, unit: str, description: str, bounds: Sequence[float]
    ) -> None:
        for i, bound in enumerate(bounds):
            if not math.isfinite(bound) or (i and bounds[i - 1] >= bound):
                raise ValueError(f"histogram {name}: bucket boundaries must be finite and increasing")
        self._meter = meter
        self.name, self.unit, self.description = name, unit, description
        self.bounds = tuple(float(b) for b in bounds)
        self._series: dict[frozenset[tuple[str, Any]], _Series] = {}
        self._lock = threading.Lock()
        self._seen = False

    def record(self, amount: float, attributes: Mapping[str, Any] | None = None) -> None:
        attrs = attributes or {}
        self.record_series(amount, frozenset(attrs.items()), attrs)

    def record_series(self, amount: float, key: frozenset[tuple[str, Any]], attrs: Mapping[str, Any]) -> None:
        """`record(amount, attrs)` with `key` already `frozenset(attrs.items())` (a caller's cached key)."""
        if amount < 0:  # as the SDK: a histogram takes non-negative values only
            log.warning("telemetry: negative value dropped from histogram %s", self.name)
            return
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._new_series(key, attrs)
            series.counts[bisect_left(self.bounds, amount)] += 1
            series.sum += amount
            if amount < series.min:
                series.min = amount
            if amount > series.max:
                series.max = amount

    def _new_series(self, key: frozenset[tuple[str, Any]], attrs: Mapping[str, Any]) -> _Series:
        if not self._seen:
            self._seen = True
            self._meter._register(self)
        if len(self._series) >= CARDINALITY_LIMIT:
            key, attrs = _OVERFLOW_KEY, _OVERFLOW
            found = self._series.get(key)
            if found is not None:
                return found
        series = self._series[key] = _Series(dict(attrs), len(self.bounds) + 1, time.time_ns())
        return series

    def collect(self, now_ns: int) -> MetricData | None:
        with self._lock:
            points = tuple(
                HistogramPoint(
                    s.attributes,
                    s.start_ns,
                    now_ns,
                    sum(s.counts),
                    s.sum,
                    tuple(s.counts),
                    self.bounds,
                    s.min,
                    s.max,
                )
                for s in self._series.values()
            )
        if not points:
            return None
        return MetricData(self.name, self.unit, self.description, "histogram", points)


Callback = Callable[[Any], Iterable[Any]]


class LeanObservable:
    """An observable counter (monotonic cumulative sum) or gauge: read from callbacks at collection."""

    def __init__(
        self,
        meter: LeanMeter,
        kind: MetricKind,
        name: str,
        unit: str,
        description: str,
        callbacks: Sequence[Callback],
    ) -> None:
        self._meter = meter
        self.kind, self.name, self.unit, self.description = kind, name, unit, description
        self._callbacks = tuple(callbacks)
        self._starts: dict[frozenset[tuple[str, Any]], int] = {}  # sums: when each series first appeared
        self._seen = False

    def collect(self, now_ns: int) -> MetricData | None:
        from opentelemetry.metrics import CallbackOptions

        points: dict[frozenset[tuple[str, Any]], NumberPoint] = {}
        for callback in self._callbacks:
            try:
                observations = list(callback(CallbackOptions()))
            except Exception as exc:  # as the SDK: a failing callback loses its points, not the collection
                log.error("telemetry: metric callback for %s failed: %s", self.name, type(exc).__qualname__)
                continue
            for observation in observations:
                attrs = dict(observation.attributes or {})
                key = frozenset(attrs.items())
                start = 0
                if self.kind == "sum":
                    start = self._starts.get(key, 0)
                    if not start:
                        if len(self._starts) >= CARDINALITY_LIMIT:
                            key, attrs = _OVERFLOW_KEY, dict(_OVERFLOW)
                        start = self._starts.setdefault(key, time.time_ns())
                points[key] = NumberPoint(attrs, start, now_ns, observation.value)
        if not points:
            return None
        if not self._seen:
            self._seen = True
            self._meter._register(self)
        return MetricData(self.name, self.unit, self.description, self.kind, tuple(points.values()))


class LeanMeter:
    """The three `Meter` calls the observer makes, and `collect` for the exporter and /metrics."""

    def __init__(self) -> None:
        self._instruments: list[LeanHistogram | LeanObservable] = []
        # Metrics are reported in the order of their first measurement, as the SDK reports them.
        self._order: list[LeanHistogram | LeanObservable] = []
        self._lock = threading.RLock()

    def get_meter(self, name: str, *args: Any, **kwargs: Any) -> LeanMeter:
        return self  # one instrumentation scope: `outrider.sidecar`

    def create_histogram(
        self,
        name: str,
        unit: str = "",
        description: str = "",
        *,
        explicit_bucket_boundaries_advisory: Sequence[float],
    ) -> LeanHistogram:
        histogram = LeanHistogram(self, name, unit, description, explicit_bucket_boundaries_advisory)
        self._instruments.append(histogram)
        return histogram

    def create_observable_counter(
        self, name: str, callbacks: Sequence[Callback], unit: str = "", description: str = ""
    ) -> LeanObservable:
        counter = LeanObservable(self, "sum", name, unit, description, callbacks)
        self._instruments.append(counter)
        return counter

    def create_observable_gauge(
        self, name: str, callbacks: Sequence[Callback], unit: str = "", description: str = ""
    ) -> LeanObservable:
        gauge = LeanObservable(self, "gauge", name, unit, description, callbacks)
        self._instruments.append(gauge)
        return gauge

    def _register(self, instrument: LeanHistogram | LeanObservable) -> None:
        # No lock: a histogram registers while holding its own lock, and `collect` takes the
        # histograms' locks under the meter's; list.append is atomic, `collect` reads a copy.
        self._order.append(instrument)

    def collect(self) -> list[MetricData]:
        """Every instrument's current points (one collection at a time; measurements go on meanwhile)."""
        with self._lock:
            now = time.time_ns()
            # Callbacks first, in creation order, as the SDK runs them; an observable's first points
            # place it after what was measured before.
            observed = {
                id(instrument): instrument.collect(now)
                for instrument in self._instruments
                if isinstance(instrument, LeanObservable)
            }
            out = []
            for instrument in list(self._order):
                data = (
                    observed.get(id(instrument))
                    if isinstance(instrument, LeanObservable)
                    else instrument.collect(now)
                )
                if data is not None:
                    out.append(data)
            return out

    def prometheus(self) -> bytes:
        """`/metrics`: the text `prometheus.render` writes for the SDK's data."""
        return render_text(families(self.collect()))


def families(data: Iterable[MetricData]) -> Iterator[Family]:
    """Prometheus families, as `prometheus.families` writes them for the SDK's metrics."""
    for metric in data:
        name = metric_name(metric.name, metric.unit)
        doc = metric.description or metric.name
        labelled = [(labels_of(p.attributes), p) for p in metric.points]
        label_keys = sorted({k for labels, _ in labelled for k in labels})
        if metric.kind == "histogram":
            hist = Family(name, doc, "histogram", label_keys)
            for labels, point in labelled:
                assert isinstance(point, HistogramPoint)
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for bound, count in zip(point.bounds, point.bucket_counts, strict=False):
                    cumulative += count
                    buckets.append((repr(float(bound)), float(cumulative)))
                buckets.append(("+Inf", float(point.count)))
                hist.add_histogram([labels.get(k, "") for k in label_keys], buckets, float(point.sum))
            yield hist
        else:
            family = Family(name, doc, "counter" if metric.kind == "sum" else "gauge", label_keys)
            for labels, point in labelled:
                assert isinstance(point, NumberPoint)
                family.add([labels.get(k, "") for k in label_keys], float(point.value))
            yield family
