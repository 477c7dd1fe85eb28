"""Batches span records and exports them as OTLP/HTTP protobuf on one thread, as the SDK's batch processor.

Honours the same `OTEL_BSP_*` settings (queue size, batch size, schedule delay), drops the oldest
span when the queue is full and counts it, and sends through `otlp_http.OtlpHttpClient` (endpoint,
headers, TLS files, compression, timeout and retries as configured by `OTEL_EXPORTER_OTLP_*`).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger("outrider.telemetry")

# A queued span: on the lean path its `otlp_wire.span_field` bytes, written when the span ended.
Item = TypeVar("Item")
Send = Callable[[bytes], bool]


@dataclass(frozen=True)
class BatchSettings:
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_s: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BatchSettings:
        """`OTEL_BSP_*`, read and checked as the SDK's BatchSpanProcessor reads and checks them."""
        from outrider.sidecar.telemetry.otel_env import int_setting

        env = os.environ if env is None else env
        queue = int_setting(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        delay = int_setting(env, "OTEL_BSP_SCHEDULE_DELAY", 5000)
        batch = int_setting(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        # The SDK's errors for bad values, word for word.
        if queue <= 0:
            raise ValueError("max_queue_size must be a positive integer.")
        if delay <= 0:
            raise ValueError("schedule_delay_millis must be positive.")
        if batch <= 0:
            raise ValueError("max_export_batch_size must be a positive integer.")
        if batch > queue:
            raise ValueError("max_export_batch_size must be less than or equal to max_queue_size.")
        return cls(queue, batch, delay / 1000.0)


class SpanBatcher(Generic[Item]):
    """A bounded queue of spans and the thread that makes requests of them and posts them in batches.

    The spans are whatever `encode` takes: on the lean path each span's bytes, written as it ended.
    """

    def __init__(
        self,
        encode: Callable[[Sequence[Item]], bytes],
        send: Send,
        settings: BatchSettings,
        close: Callable[[], None],
    ) -> None:
        self._encode = encode
        self._send = send
        self._close_transport = close
        self.settings = settings
        self._queue: collections.deque[Item] = collections.deque(maxlen=settings.max_queue_size)
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._shutdown = False
        self.dropped = 0  # records pushed out of a full queue (oldest first, as the SDK does)
        self.exported = 0
        self.failed = 0  # records in batches the receiver did not accept
        self._last_drop_log = 0.0

    def add(self, record: Item) -> None:
        if self._shutdown:
            self.dropped += 1
            return
        queue = self._queue
        if len(queue) == self.settings.max_queue_size:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 10.0:
                self._last_drop_log = now
                log.warning(
                    "telemetry: span queue full (OTEL_BSP_MAX_QUEUE_SIZE=%d), %d spans dropped so far",
                    self.settings.max_queue_size,
                    self.dropped,
                )
        queue.append(record)
        if self._thread is None:
            self._start()
        # Once per batch: until the exporter thread runs, later adds find the event already set (a
        # `set` takes the event's lock and notifies each time).
        if len(queue) >= self.settings.max_export_batch_size and not self._wake.is_set():
            self._wake.set()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._shutdown:
                self._thread = threading.Thread(target=self._loop, name="outrider-span-export", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while not self._shutdown:
            woken = self._wake.wait(self.settings.schedule_delay_s)
            self._wake.clear()
            if self._shutdown:
                break
            self._export(everything=not woken)
        self._export(everything=True)

    def _export(self, *, everything: bool) -> None:
        """Full batches while there are any; with `everything` the rest too."""
        batch_size = self.settings.max_export_batch_size
        with self._export_lock:
            queue = self._queue
            while queue and (everything or len(queue) >= batch_size):
                count = min(batch_size, len(queue))
                batch = [queue.popleft() for _ in range(count)]
                try:
                    ok = self._send(self._encode(batch))
                except Exception as exc:  # never let the exporter thread die
                    log.error("telemetry: span export failed: %s", type(exc).__qualname__)
                    ok = False
                if ok:
                    self.exported += count
                else:
                    self.failed += count

    def force_flush(self) -> None:
        if not self._shutdown:
            self._export(everything=True)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._export(everything=True)
        self._close_transport()
