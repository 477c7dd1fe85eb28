"""The telemetry worker thread: order, drain, back-pressure, failure isolation, close."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time

import pytest

from outrider.sidecar.telemetry.audit import AuditLog
from outrider.sidecar.telemetry.worker import LoopWorker, Worker


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


# -- LoopWorker: the same recording on the event loop, no thread of its own -------------------------


def test_loop_worker_runs_jobs_on_the_loop_in_order_after_the_submitter_returns() -> None:
    async def main() -> None:
        worker = LoopWorker(asyncio.get_running_loop(), interval_s=0.001)
        seen: list[tuple[int, int]] = []
        for i in range(100):
            worker.submit(lambda i=i: seen.append((i, threading.get_ident())))
        assert seen == []  # nothing on the request path
        for _ in range(1000):
            if len(seen) == 100:
                break
            await asyncio.sleep(0.005)
        assert [i for i, _ in seen] == list(range(100))
        assert {ident for _, ident in seen} == {threading.get_ident()}
        assert threading.active_count() == before_threads
        worker.close()

    before_threads = threading.active_count()
    asyncio.run(main())


def test_loop_worker_lets_the_loop_run_between_turns() -> None:
    from outrider.sidecar.telemetry import worker as worker_module

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker = LoopWorker(loop, interval_s=0.001)
        order: list[str] = []

        # The first job readies a loop callback: it runs after a turn of LOOP_BATCH jobs, not after all.
        def first() -> None:
            order.append("job")
            loop.call_soon(lambda: order.append("loop"))

        worker.submit(first)
        for _ in range(3 * worker_module.LOOP_BATCH - 1):
            worker.submit(lambda: order.append("job"))
        await asyncio.to_thread(worker.drain)
        assert order.count("job") == 3 * worker_module.LOOP_BATCH
        # (24 or 48: the drain's own turn may be ready beside the timer's)
        assert order.index("loop") < 3 * worker_module.LOOP_BATCH - 1
        worker.close()

    asyncio.run(main())


def test_loop_worker_drain_from_another_thread_waits_for_the_loop_and_flushes_held_audit() -> None:
    async def main() -> None:
        stream = _CountingStream()
        audit = AuditLog(stream)
        worker = LoopWorker(asyncio.get_running_loop(), interval_s=10.0)  # only drain runs them
        worker.after_batch(audit.flush_held)
        for i in range(100):
            worker.submit(lambda i=i: audit.write({"type": "mcp.call", "n": i}, hold=True))
        assert stream.getvalue() == ""
        assert await asyncio.to_thread(worker.drain)
        assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == list(range(100))
        worker.close()

    asyncio.run(main())


def test_loop_worker_takes_jobs_from_other_threads() -> None:
    async def main() -> None:
        worker = LoopWorker(asyncio.get_running_loop(), interval_s=10.0)
        ran: list[int] = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        thread = threading.Thread(
            target=lambda: worker.submit(
                lambda: (ran.append(threading.get_ident()), loop.call_soon(done.set))
            )
        )
        thread.start()
        thread.join()
        await asyncio.wait_for(done.wait(), 10)  # handed to the loop at once, not after interval_s
        assert ran == [threading.get_ident()]
        worker.close()

    asyncio.run(main())


def test_loop_worker_close_runs_what_is_queued_then_runs_inline() -> None:
    async def main() -> list[int]:
        worker = LoopWorker(asyncio.get_running_loop(), interval_s=10.0)
        seen: list[int] = []
        for i in range(10):
            worker.submit(lambda i=i: seen.append(i))
        await asyncio.to_thread(worker.close)
        assert seen == list(range(10))
        worker.submit(lambda: seen.append(99))
        assert seen[-1] == 99
        worker.submit(lambda: seen.append(100))
        return seen

    assert asyncio.run(main())[-2:] == [99, 100]


def test_loop_worker_runs_the_queue_itself_once_its_loop_is_closed() -> None:
    loop = asyncio.new_event_loop()
    worker = LoopWorker(loop, interval_s=10.0)
    seen: list[int] = []
    worker.submit(lambda: seen.append(1))
    loop.close()
    assert worker.drain()
    assert seen == [1]
    worker.submit(lambda: seen.append(2))  # scheduling fails: the submitter runs it
    assert seen == [1, 2]
