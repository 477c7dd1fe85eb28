"""`Calls` exits every message's scope as an `ExitStack` of them would: last first, always."""

from __future__ import annotations

from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import pytest

from outrider.sidecar.inbound import jsonrpc
from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.inbound.proxy import Calls
from outrider.sidecar.telemetry.observer import NULL_SCOPE, CallScope, RequestInfo

INFO = RequestInfo("POST", "streamable-http")


class _Scope(AbstractContextManager[CallScope]):
    def __init__(self, observer: _Observer, message: McpMessage) -> None:
        self.observer, self.message = observer, message

    def __enter__(self) -> CallScope:
        return NULL_SCOPE

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.observer.exits.append((self.message.id, kind))
        if self.message.id in self.observer.raise_on_exit:
            raise RuntimeError(f"exit {self.message.id}")


class _Observer:
    def __init__(self, raise_on_exit: tuple[Any, ...] = (), fail_at: Any = None) -> None:
        self.exits: list[tuple[Any, type[BaseException] | None]] = []
        self.raise_on_exit = raise_on_exit
        self.fail_at = fail_at

    def mcp_call(self, message: McpMessage, request: RequestInfo) -> AbstractContextManager[CallScope]:
        if message.id == self.fail_at:
            raise RuntimeError("no scope")
        return _Scope(self, message)


def _batch(n: int) -> jsonrpc.ParsedBody:
    return jsonrpc.parse_body(
        b"[" + b",".join(b'{"jsonrpc":"2.0","id":%d,"method":"ping"}' % i for i in range(n)) + b"]"
    )


def test_every_scope_exits_last_first_with_the_exception() -> None:
    observer = _Observer()
    with Calls(observer, _batch(3), INFO):  # type: ignore[arg-type]
        pass
    assert observer.exits == [(2, None), (1, None), (0, None)]
    observer.exits.clear()
    with pytest.raises(KeyError), Calls(observer, _batch(2), INFO):  # type: ignore[arg-type]
        raise KeyError("x")
    assert observer.exits == [(1, KeyError), (0, KeyError)]


def test_a_scope_that_raises_on_exit_does_not_keep_the_others_open() -> None:
    observer = _Observer(raise_on_exit=(1,))
    with pytest.raises(RuntimeError, match="exit 1"), Calls(observer, _batch(3), INFO):  # type: ignore[arg-type]
        pass
    assert [i for i, _ in observer.exits] == [2, 1, 0]


def test_scopes_opened_before_a_failing_one_still_exit() -> None:
    observer = _Observer(fail_at=2)
    with pytest.raises(RuntimeError, match="no scope"):
        Calls(observer, _batch(3), INFO)  # type: ignore[arg-type]
    assert observer.exits == [(1, RuntimeError), (0, RuntimeError)]
