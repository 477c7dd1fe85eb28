"""Fixtures for the identity-provider tests (issue 13): the leak guard every test here runs under.

`leaks` collects every credential a test or stand-in handles (client secrets, assertions, tokens,
DPoP proofs) and every output the test produced (log records at DEBUG, the process's stdout/stderr,
and what tests register: the sidecar's log, audit file, OTLP payloads, /metrics). At teardown no
credential may appear in any output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest


class LeakGuard:
    def __init__(self) -> None:
        self.values: set[str] = set()
        self.outputs: list[tuple[str, Callable[[], str | bytes]]] = []

    def secret(self, value: str | None) -> None:
        if not value or len(value) < 12:
            return
        self.values.add(value)
        parts = value.split(".")
        if len(parts) == 3 and len(parts[2]) >= 16:
            self.values.add(parts[2])  # a JWT's signature alone is enough to show it leaked

    def output(self, name: str, read: Callable[[], str | bytes]) -> None:
        self.outputs.append((name, read))

    def check(self, texts: list[tuple[str, str | bytes]]) -> None:
        for name, text in texts:
            data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
            for value in self.values:
                assert value.encode() not in data, f"a credential ({value[:6]}...) appears in {name}"


@pytest.fixture(autouse=True)
def leaks(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Iterator[LeakGuard]:
    caplog.set_level(logging.DEBUG)
    guard = LeakGuard()
    yield guard
    out, err = capfd.readouterr()
    texts: list[tuple[str, str | bytes]] = [("log records", caplog.text), ("stdout", out), ("stderr", err)]
    texts += [(name, read()) for name, read in guard.outputs]
    guard.check(texts)
    # Print again what was captured, so a failing test still shows its output.
    print(out, end="")
