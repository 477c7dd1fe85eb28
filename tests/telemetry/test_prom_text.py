"""`prom_text` writes exactly what prometheus_client writes for the same families (the sidecar no longer
loads prometheus_client; the webhook still does, and scrapers must see no difference)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from outrider.sidecar.telemetry.prom_text import Family, number, render

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**20), 10**20).map(float)


def _reference(spec: list[tuple[str, str, str, list[Any]]]) -> bytes:
    class Collector:
        def collect(self) -> Iterator[Any]:
            for name, doc, kind, samples in spec:
                if kind == "histogram":
                    family: Any = HistogramMetricFamily(name, doc, labels=["a", "b"])
                    for values, buckets, total in samples:
                        family.add_metric(values, buckets, total)
                else:
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    family = cls(name, doc, labels=["a", "b"])
                    for values, value in samples:
                        family.add_metric(values, value)
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    return generate_latest(registry)


def _ours(spec: list[tuple[str, str, str, list[Any]]]) -> bytes:
    families = []
    for name, doc, kind, samples in spec:
        family = Family(name, doc, kind, ("a", "b"))  # type: ignore[arg-type]
        for sample in samples:
            if kind == "histogram":
                family.add_histogram(*sample)
            else:
                family.add(*sample)
        families.append(family)
    return render(families)


LABELS = st.lists(TEXT, min_size=2, max_size=2)
SIMPLE = st.lists(st.tuples(LABELS, FLOATS), max_size=3)
BUCKETS = st.lists(st.floats(0, 1e9), min_size=1, max_size=4).map(
    lambda bounds: [(repr(b), float(i)) for i, b in enumerate(sorted(bounds))] + [("+Inf", 9.0)]
)
HISTOGRAM = st.lists(st.tuples(LABELS, BUCKETS, st.floats(0, 1e12)), max_size=2)


@given(
    doc=TEXT,
    counters=SIMPLE,
    gauges=SIMPLE,
    histograms=HISTOGRAM,
    suffix=st.sampled_from(["", "_total"]),
)
def test_same_bytes_as_prometheus_client(
    doc: str, counters: list[Any], gauges: list[Any], histograms: list[Any], suffix: str
) -> None:
    spec = [
        ("outrider_calls" + suffix, doc, "counter", counters),
        ("outrider_level", doc, "gauge", gauges),
        ("outrider_duration_seconds", doc, "histogram", histograms),
    ]
    assert _ours(spec) == _reference(spec)


def test_numbers_as_go_writes_them() -> None:
    assert [number(v) for v in (1.0, 0.5, 1e22, 12345678.0, float("inf"), -float("inf"))] == [
        "1.0",
        "0.5",
        "1e+22",
        "1.2345678e+07",
        "+Inf",
        "-Inf",
    ]
    assert number(float("nan")) == "NaN"
    text = render([Family("x", 'a "doc"\n', "gauge", ("k",))])
    assert text == b'# HELP x a "doc"\\n\n# TYPE x gauge\n'
