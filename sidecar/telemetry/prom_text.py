"""The Prometheus text exposition format (0.0.4), written directly: what /metrics on the admin port serves.

Pure. The output is byte for byte what `prometheus_client.generate_latest` writes for the same
families (a test holds the two side by side), without loading prometheus_client and the parts of
the standard library it pulls in (wsgiref, http.server, gzip: ~2 MB of RSS in every sidecar).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]

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


def labels_of(attributes: Mapping[str, Any] | None) -> dict[str, str]:
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


def number(value: float) -> str:
    """A sample value as Prometheus (Go) writes it: +Inf, -Inf, NaN, exponents from 1e+07 up."""
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _sample(name: str, labels: Labels, value: float) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(labels))
        return f"{name}{{{inner}}} {number(value)}\n"
    return f"{name} {number(value)}\n"


@dataclass
class Family:
    """One metric family: its samples in the order added (labels are sorted when written)."""

    name: str
    documentation: str
    kind: Kind
    label_names: Sequence[str] = ()
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind == "counter" and self.name.endswith("_total"):
            self.name = self.name[: -len("_total")]

    def add(self, label_values: Sequence[str], value: float) -> None:
        """A counter's or gauge's value for one label set."""
        labels = tuple(zip(self.label_names, label_values, strict=True))
        suffix = "_total" if self.kind == "counter" else ""
        self.samples.append((self.name + suffix, labels, float(value)))

    def add_histogram(
        self, label_values: Sequence[str], buckets: Sequence[tuple[str, float]], total: float
    ) -> None:
        """Cumulative `(le, count)` buckets ending with `+Inf`, and the sum of the observations."""
        labels = tuple(zip(self.label_names, label_values, strict=True))
        for bound, count in buckets:
            self.samples.append((f"{self.name}_bucket", (*labels, ("le", bound)), float(count)))
        self.samples.append((f"{self.name}_count", labels, float(buckets[-1][1])))
        self.samples.append((f"{self.name}_sum", labels, float(total)))


def render(families: Iterable[Family]) -> bytes:
    out: list[str] = []
    for family in families:
        name = family.name + ("_total" if family.kind == "counter" else "")
        out.append(f"# HELP {name} {_escape_help(family.documentation)}\n")
        out.append(f"# TYPE {name} {family.kind}\n")
        out.extend(_sample(n, labels, value) for n, labels, value in family.samples)
    # "replace": a label value with a lone surrogate (a caller's tool name) must not fail every scrape.
    return "".join(out).encode("utf-8", "replace")
