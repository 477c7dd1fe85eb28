"""The OpenTelemetry SDK's own `OTEL_*` settings, read as the SDK reads them, for the lean paths.

The resource (`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SERVICE_NAME`), the sampler (`OTEL_TRACES_SAMPLER`),
the batch settings (`OTEL_BSP_*`) and the metric exporter's preferences, without importing the SDK.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote

from outrider.sidecar.telemetry.spans import SamplerPlan

log = logging.getLogger("outrider.telemetry")

# --- the resource (opentelemetry.sdk.resources.Resource.create) ---

_BUILT_IN_DETECTORS = frozenset({"service_instance", "otel"})
_instance_lock = threading.Lock()
_instance: tuple[int, str] | None = None  # (pid, service.instance.id): one per process, as the SDK's


def _service_instance_id() -> str:
    global _instance
    with _instance_lock:
        if _instance is None or _instance[0] != os.getpid():
            _instance = (os.getpid(), str(uuid.uuid4()))
        return _instance[1]


_VERSION = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def sdk_version() -> str:
    """`telemetry.sdk.version`: the installed SDK's `opentelemetry/sdk/version/__init__.py`, read as text.

    Importing it would import `opentelemetry.sdk`; `importlib.metadata` costs ~0.5 MB of RSS.
    """
    import opentelemetry

    for base in getattr(opentelemetry, "__path__", []):
        try:
            found = _VERSION.search((Path(base) / "sdk" / "version" / "__init__.py").read_text("utf-8"))
        except OSError:
            continue
        if found:
            return found.group(1)
    from importlib.metadata import version  # an SDK installed without its sources

    return version("opentelemetry-sdk")


def detector_order(env: Mapping[str, str]) -> list[str]:
    """The SDK's resource detectors for `OTEL_EXPERIMENTAL_RESOURCE_DETECTORS`, in merge order."""
    configured = [
        name.strip()
        for name in env.get("OTEL_EXPERIMENTAL_RESOURCE_DETECTORS", "").split(",")
        if name.strip()
    ]
    default = [] if "service_instance" in configured else ["service_instance"]
    return list(dict.fromkeys(default + configured + ["otel"]))


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    """The SDK's `OTELResourceDetector`: `OTEL_RESOURCE_ATTRIBUTES` (URL-decoded), `OTEL_SERVICE_NAME`."""
    found: dict[str, str] = {}
    raw = env.get("OTEL_RESOURCE_ATTRIBUTES")
    for item in raw.split(",") if raw else ():
        key, sep, value = item.partition("=")
        if not sep:
            log.warning("telemetry: OTEL_RESOURCE_ATTRIBUTES: %r is not key=value; ignored", item)
            continue
        found[key.strip()] = unquote(value.strip())
    service_name = env.get("OTEL_SERVICE_NAME")
    if service_name:
        found["service.name"] = service_name
    return found


def resource_attributes(attributes: Mapping[str, str], env: Mapping[str, str]) -> dict[str, str] | None:
    """Pure apart from the process's instance id: what `Resource.create(attributes)` holds for `env`.

    The SDK's defaults (`telemetry.sdk.*`), then its detectors (`service.instance.id`, then the
    environment's attributes), then `attributes`, then `unknown_service:<python>` if no service name
    is left. None when `OTEL_EXPERIMENTAL_RESOURCE_DETECTORS` names a detector only the SDK has.
    """
    order = detector_order(env)
    if not set(order) <= _BUILT_IN_DETECTORS:
        return None
    merged: dict[str, str] = {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": sdk_version(),
    }
    for name in order:
        merged.update(
            {"service.instance.id": _service_instance_id()} if name == "service_instance" else _from_env(env)
        )
    merged.update(attributes)
    if "" in merged:  # the SDK drops an empty key, with a warning
        log.warning("telemetry: a resource attribute with an empty key was dropped")
        del merged[""]
    if not merged.get("service.name"):
        merged["service.name"] = "unknown_service" + (
            f":{Path(sys.executable).name}" if sys.executable else ""
        )
    return merged


def sdk_resource_attributes(attributes: Mapping[str, str]) -> dict[str, object]:
    """`Resource.create` itself, for detectors only the SDK has (reads `os.environ`)."""
    from opentelemetry.sdk.resources import Resource

    return dict(Resource.create(dict(attributes)).attributes)


# --- the sampler (opentelemetry.sdk.trace.sampling._get_from_env_or_default) ---

_SAMPLERS = (
    "always_on",
    "always_off",
    "parentbased_always_on",
    "parentbased_always_off",
    "traceidratio",
    "parentbased_traceidratio",
)


def sampler_from_env(env: Mapping[str, str]) -> SamplerPlan:
    """The plan of the sampler a default `TracerProvider` builds from `OTEL_TRACES_SAMPLER(_ARG)`.

    An unknown name means `parentbased_always_on`, a bad ratio 1.0, each with a warning, as in the SDK.
    """
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
    if name not in _SAMPLERS:
        log.warning(
            "telemetry: OTEL_TRACES_SAMPLER=%r is not a known sampler; using parentbased_always_on", name
        )
        name = "parentbased_always_on"
    parent_based = name.startswith("parentbased_")
    if name.endswith("always_on"):
        return SamplerPlan(parent_based, 1 << 64)
    if name.endswith("always_off"):
        return SamplerPlan(parent_based, 0)
    raw = env.get("OTEL_TRACES_SAMPLER_ARG", "")
    try:
        rate = float(raw)
        if rate < 0.0 or rate > 1.0:
            raise ValueError(rate)
        bound = round(rate * (1 << 64))  # TraceIdRatioBased.get_bound_for_rate (NaN raises here too)
    except (ValueError, TypeError):
        log.warning("telemetry: OTEL_TRACES_SAMPLER_ARG=%r is not a ratio from 0 to 1; using 1.0", raw)
        bound = 1 << 64
    return SamplerPlan(parent_based, bound)


# --- the batch span processor (opentelemetry.sdk.trace.export.BatchSpanProcessor) ---


def int_setting(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        log.warning("telemetry: unable to parse %s as an integer; defaulting to %s", name, default)
        return default


# --- the OTLP metric exporter's preferences (opentelemetry.exporter.otlp.common._aggregation) ---


def metric_preferences_blocker(env: Mapping[str, str]) -> str | None:
    """Pure apart from warnings: why the exporter's preferences need the SDK's metrics, or None.

    The lean metrics are cumulative with explicit buckets: the exporter's defaults, and what it
    falls back to (with a warning) for a value it does not know.
    """
    temporality = env.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "CUMULATIVE").upper().strip()
    if temporality in ("DELTA", "LOWMEMORY"):
        return "metrics are exported with delta temporality or exponential histograms"
    if temporality != "CUMULATIVE":
        log.warning(
            "telemetry: OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=%r is not known; using cumulative",
            temporality,
        )
    histograms = (
        env.get("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION", "explicit_bucket_histogram")
        .upper()
        .strip()
    )
    if histograms == "BASE2_EXPONENTIAL_BUCKET_HISTOGRAM":
        return "metrics are exported with delta temporality or exponential histograms"
    if histograms != "EXPLICIT_BUCKET_HISTOGRAM":
        log.warning(
            "telemetry: OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=%r is not known; "
            "using explicit buckets",
            histograms,
        )
    return None
