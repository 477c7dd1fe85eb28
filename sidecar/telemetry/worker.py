"""Runs telemetry bookkeeping (span end, metric points, audit lines) on one background thread, in order.

The request path only captures plain facts and enqueues; `drain()` waits until everything queued ran.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("outrider.telemetry")

Job = Callable[[], None]

# Past this many waiting jobs the caller runs its job itself: slower requests instead of unbounded
# memory or lost audit lines when the worker cannot keep up.
MAX_BACKLOG = 10_000


# The thread wakes this often (and on drain/close) rather than once per job: at a few hundred calls per
# second a wake-up per job costs more in thread switches than the batching delay costs anyone.
WAKE_INTERVAL_S = 0.01

# After this many wake-ups in a row found nothing to do, the thread sleeps until the next job (an idle
# sidecar should not wake 100 times a second).
IDLE_AFTER_EMPTY_WAKES = 100


# Jobs between voluntary hand-overs of the GIL (~35 us each, ~2 ms of work): the event loop waits less
# than the interpreter's 5 ms switch interval, which is left alone (see `setup`). Each hand-over is two
# context switches: every 8 jobs cost ~5 % more CPU per request than 64 (docs/telemetry.md).
YIELD_EVERY = 64


# `time.sleep(0)` releases the GIL but usually takes it straight back before a waiting thread wakes
# up; a sleep this short lets the event loop in, for a few microseconds of CPU.
_YIELD_S = 0.0001


def yield_gil() -> None:
    """Release the GIL long enough for a thread waiting for it (the event loop) to take it."""
    time.sleep(_YIELD_S)


class Signal:
    """`threading.Event` for one waiting thread, on a bare lock: `wait` clears it as it returns.

    An Event's `wait` runs a Condition's Python code and allocates a lock per call; here a wait is
    one C call (`Lock.acquire` with a timeout), which the worker makes on every wake-up.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held: not set

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # already set
            self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """True once set (and cleared again), False when `timeout` seconds passed first."""
        return self._lock.acquire(timeout=-1 if timeout is None else timeout)


class Worker:
    """A single daemon thread that runs submitted jobs in submission order, in batches.

    With `enabled=False` every job runs at once on the caller's thread (tests, the simple mode).
    """

    def __init__(
        self, *, enabled: bool = True, max_backlog: int = MAX_BACKLOG, interval_s: float = WAKE_INTERVAL_S
    ) -> None:
        self.enabled = enabled
        self._jobs: collections.deque[Job] = collections.deque()  # append/popleft are thread-safe
        self._wake = Signal()
        self._interval = interval_s
        self._max_backlog = max_backlog
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._idle = False  # the thread waits for a job with no timeout
        self._after_batch: list[Job] = []

    def after_batch(self, hook: Job) -> None:
        """Run `hook` after each batch of jobs (and after a job run on the caller's thread)."""
        self._after_batch.append(hook)

    def _batch_done(self) -> None:
        for hook in self._after_batch:
            _run(hook)

    def submit(self, job: Job) -> None:
        if not self.enabled or self._closed or len(self._jobs) >= self._max_backlog:
            _run(job)
            self._batch_done()
            return
        self._jobs.append(job)
        if self._thread is None:
            self._start()
        elif self._idle:
            self._idle = False
            self._wake.set()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="outrider-telemetry", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        empty = 0
        while True:
            self._wake.wait(None if self._idle else self._interval)  # (and cleared)
            if self._jobs:
                empty, self._idle = 0, False
            else:
                empty += 1
            self._run_queued()
            if self._closed:
                self._run_queued()
                return
            if empty >= IDLE_AFTER_EMPTY_WAKES:
                self._idle = True
                if self._jobs:  # a job that came in before `submit` could see the flag
                    self._idle = False

    def _run_queued(self) -> None:
        ran = 0
        jobs = self._jobs
        # `while jobs` first: an empty deque's `popleft` raises (an exception per batch); the
        # IndexError is still caught for a second consumer (a `close` whose join timed out).
        while jobs:
            try:
                job = jobs.popleft()
            except IndexError:
                break
            _run(job)
            ran += 1
            if ran % YIELD_EVERY == 0:
                yield_gil()
        if ran:
            self._batch_done()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every job submitted before this call has run; False on timeout."""
        if self._thread is None or not self._thread.is_alive():
            self._run_queued()
            return True
        done = threading.Event()

        def barrier() -> None:
            self._batch_done()  # what the jobs before it held is written before `drain` returns
            done.set()

        self._jobs.append(barrier)
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop the thread; later jobs run on the caller's thread."""
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            self._wake.set()
            self._thread.join(timeout)
        self._run_queued()


def _run(job: Job) -> None:
    try:
        job()
    except Exception as exc:
        # A telemetry bug must never take the data path (or the worker) down. Only the type is
        # logged: a message could quote request data.
        log.error("telemetry: a recording job failed: %s", type(exc).__qualname__)
