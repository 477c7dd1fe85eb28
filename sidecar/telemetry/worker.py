"""Runs telemetry bookkeeping (span end, metric points, audit lines) on one background thread, in order.

The request path only captures plain facts and enqueues; `drain()` waits until everything queued ran.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("outrider.telemetry")

Job = Callable[[], None]

# Past this many waiting jobs the caller runs its job itself: slower requests instead of unbounded
# memory or lost audit lines when the worker cannot keep up.
MAX_BACKLOG = 10_000


class Worker:
    """A single daemon thread that runs submitted jobs in submission order.

    With `enabled=False` every job runs at once on the caller's thread (tests, the simple mode).
    """

    def __init__(self, *, enabled: bool = True, max_backlog: int = MAX_BACKLOG) -> None:
        self.enabled = enabled
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._max_backlog = max_backlog
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def submit(self, job: Job) -> None:
        if not self.enabled or self._closed or self._queue.qsize() >= self._max_backlog:
            _run(job)
            return
        if self._thread is None:
            self._start()
        self._queue.put(job)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="outrider-telemetry", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            _run(job)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every job submitted before this call has run; False on timeout."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._queue.put(done.set)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop the thread; later jobs run on the caller's thread."""
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)


def _run(job: Job) -> None:
    try:
        job()
    except Exception as exc:
        # A telemetry bug must never take the data path (or the worker) down. Only the type is
        # logged: a message could quote request data.
        log.error("telemetry: a recording job failed: %s", type(exc).__qualname__)
