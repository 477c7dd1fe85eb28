"""The telemetry worker thread: order, drain, back-pressure, failure isolation, close."""

from __future__ import annotations

import logging
import threading

import pytest

from outrider.sidecar.telemetry.worker import Worker


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
