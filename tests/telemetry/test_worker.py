"""The telemetry worker thread: order, drain, back-pressure, failure isolation, close."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import pytest

from outrider.sidecar.telemetry.audit import AuditLog
from outrider.sidecar.telemetry.worker import Signal, Worker


def test_jobs_run_in_order_off_the_caller_thread() -> None:
    worker = Worker()
    seen: list[tuple[int, str]] = []
    for i in range(100):
        worker.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert worker.drain()
    assert [i for i, _ in seen] == list(range(100))
    assert {name for _, name in seen} == {"outrider-telemetry"}
    worker.close()


def test_disabled_worker_runs_inline() -> None:
    worker = Worker(enabled=False)
    seen: list[str] = []
    worker.submit(lambda: seen.append(threading.current_thread().name))
    assert seen == [threading.current_thread().name]
    assert worker.drain()


def test_full_backlog_runs_on_the_caller() -> None:
    gate = threading.Event()
    worker = Worker(max_backlog=2)
    worker.submit(gate.wait)  # occupies the thread
    threads: list[str] = []
    for _ in range(5):
        worker.submit(lambda: threads.append(threading.current_thread().name))
    assert threading.current_thread().name in threads  # nothing dropped, the caller helped out
    gate.set()
    assert worker.drain()
    assert len(threads) == 5
    worker.close()


def test_failing_job_is_logged_by_type_and_does_not_stop_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    worker = Worker()
    seen: list[int] = []

    def boom() -> None:
        raise ValueError("Bearer secret-value")

    worker.submit(boom)
    worker.submit(lambda: seen.append(1))
    assert worker.drain()
    assert seen == [1]
    assert "ValueError" in caplog.text and "secret-value" not in caplog.text
    worker.close()


def test_close_runs_what_is_queued_then_runs_inline() -> None:
    worker = Worker()
    seen: list[int] = []
    for i in range(10):
        worker.submit(lambda i=i: seen.append(i))
    worker.close()
    assert seen == list(range(10))
    worker.submit(lambda: seen.append(99))
    assert seen[-1] == 99


def test_jobs_keep_logging_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    worker = Worker()
    worker.submit(lambda: None)
    assert worker.drain()
    worker.close()
    assert not caplog.records


def test_an_idle_worker_sleeps_until_the_next_job() -> None:
    """After many empty wake-ups the thread waits without a timeout; a new job still wakes it."""
    worker = Worker(interval_s=0.001)
    worker.submit(lambda: None)
    assert worker.drain()
    for _ in range(1000):  # up to 10 s on a loaded machine
        if worker._idle:
            break
        threading.Event().wait(0.01)
    assert worker._idle
    ran = threading.Event()
    worker.submit(ran.set)  # no drain(): the submit alone must wake the sleeping thread
    assert ran.wait(10)
    assert not worker._idle
    worker.close()


class _CountingStream(io.StringIO):
    """Counts `write` calls: one per flushed batch of audit lines, not one per line."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_audit_lines_held_on_the_worker_are_written_per_batch_and_before_drain_returns() -> None:
    stream = _CountingStream()
    audit = AuditLog(stream)
    worker = Worker(enabled=True)
    worker.after_batch(audit.flush_held)
    gate, after = threading.Event(), threading.Event()
    worker.submit(lambda: gate.wait(10) and None)  # the next 200 jobs queue up into one batch
    for i in range(200):
        worker.submit(lambda i=i: audit.write({"type": "mcp.call", "n": i}, hold=True))
    drained = threading.Event()
    drainer = threading.Thread(target=lambda: worker.drain() and drained.set())
    drainer.start()
    while len(worker._jobs) < 201:  # the drain's barrier is queued behind the writes
        time.sleep(0.001)
    worker.submit(lambda: after.wait(10) and None)  # the worker stops again right after the barrier
    gate.set()
    assert drained.wait(10)
    lines = stream.getvalue().splitlines()  # read while the worker waits: drain alone wrote them
    after.set()
    drainer.join()
    assert [json.loads(line)["n"] for line in lines] == list(range(200))  # all, in order
    assert stream.writes <= 4  # lines held up to MAX_HELD (64) at a time
    worker.close()
    worker.submit(lambda: audit.write({"type": "mcp.call", "n": 200}, hold=True))  # inline after close
    assert json.loads(stream.getvalue().splitlines()[-1])["n"] == 200
    audit.write({"type": "identity", "n": 201}, hold=True)
    audit.close()  # what is still held is written on close
    assert json.loads(stream.getvalue().splitlines()[-1])["n"] == 201


def test_a_long_batch_hands_the_gil_back_every_few_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from outrider.sidecar.telemetry import worker as worker_module

    handed: list[int] = []
    monkeypatch.setattr(worker_module, "yield_gil", lambda: handed.append(1))
    worker = Worker(enabled=True)
    gate = threading.Event()
    worker.submit(lambda: gate.wait(10) and None)
    for _ in range(10 * worker_module.YIELD_EVERY):
        worker.submit(lambda: None)
    gate.set()
    assert worker.drain()
    assert len(handed) >= 10  # once per YIELD_EVERY jobs of the batch
    worker.close()


def test_a_signal_wakes_its_waiter_once_per_set_and_times_out_otherwise() -> None:
    signal = Signal()
    assert not signal.wait(0.001)  # not set: the timeout passes
    signal.set()
    signal.set()  # setting a set signal is a no-op, as for an Event
    assert signal.wait(0.001)
    assert not signal.wait(0.001)  # the wait cleared it
    woken: list[bool] = []
    waiter = threading.Thread(target=lambda: woken.append(signal.wait(None)))
    waiter.start()
    signal.set()  # from another thread, as `submit` wakes the worker
    waiter.join(10)
    assert woken == [True]
