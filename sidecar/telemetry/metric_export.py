"""Exports the lean metrics over OTLP/HTTP on one thread every `OTEL_METRIC_EXPORT_INTERVAL`, as the SDK does.

Collects the `LeanMeter`, writes the request with `otlp_wire` and posts it through
`otlp_http.OtlpHttpClient` (endpoint, headers, TLS files, compression, timeout and retries from
`OTEL_EXPORTER_OTLP_*`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Mapping

from outrider.sidecar.telemetry.metric_points import LeanMeter, MetricData

log = logging.getLogger("outrider.telemetry")

Encode = Callable[[list[MetricData]], bytes]
Send = Callable[[bytes], bool]


def export_interval_s(env: Mapping[str, str]) -> float:
    """`OTEL_METRIC_EXPORT_INTERVAL` (milliseconds, default 60,000), read as the SDK's reader reads it.

    `inf` exports only on flush and shutdown; zero or less is refused, as the SDK refuses it.
    """
    raw = env.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")
    try:
        millis = float(raw)
    except ValueError:
        log.warning("telemetry: OTEL_METRIC_EXPORT_INTERVAL=%r is not a number; using 60000", raw)
        millis = 60_000.0
    if millis <= 0:
        raise ValueError(f"OTEL_METRIC_EXPORT_INTERVAL must be positive milliseconds (or inf), got {raw!r}")
    return millis / 1000.0


class MetricExport:
    """The periodic exporter thread of a `LeanMeter`; `shutdown()` exports once more, then stops."""

    def __init__(
        self,
        meter: LeanMeter,
        encode: Encode,
        send: Send,
        close: Callable[[], None],
        interval_s: float | None = None,
    ) -> None:
        self._meter = meter
        self._encode = encode
        self._send = send
        self._close = close
        self.interval_s = export_interval_s(os.environ) if interval_s is None else interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one export at a time (the thread, a flush, the shutdown)
        self._shutdown = False
        self.exported = 0  # requests the receiver accepted
        self.failed = 0
        self._thread: threading.Thread | None = None
        if math.isfinite(self.interval_s):
            self._thread = threading.Thread(target=self._loop, name="outrider-metric-export", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.export()

    def export(self) -> None:
        with self._lock:
            data = self._meter.collect()
            if not data:
                return
            try:
                ok = self._send(self._encode(data))
            except Exception as exc:  # never let the exporter thread die
                log.error("telemetry: metric export failed: %s", type(exc).__qualname__)
                ok = False
            if ok:
                self.exported += 1
            else:
                self.failed += 1

    def force_flush(self) -> None:
        if not self._shutdown:
            self.export()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.export()
        self._close()
