"""aiohttp's low-level HTTP server, hardened for untrusted callers: bare error answers, quiet logs.

Used by the inbound proxy (15006) and the admin server (15020); both dispatch in one handler.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class MalformedHttpFilter(logging.Filter):
    """aiohttp logs an unparseable request at ERROR with a traceback quoting the raw bytes (which may
    hold a caller's token): keep one token-free INFO line instead, and count it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        self.count += 1
        record.msg = "refused a malformed HTTP request from %s (%s, HTTP %s)"
        record.args = (
            record.args[0] if isinstance(record.args, tuple) and record.args else "?",
            type(exc).__name__,
            exc.code,
        )
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class PlainErrorHandler(RequestHandler):
    """aiohttp answers a request it cannot parse with a 400 whose text quotes the offending line,
    which may hold the caller's token: answer with the bare status instead."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        return super().handle_error(request, status, exc, f"{status} {HTTPStatus(status).phrase}")


class PlainErrorServer(web.Server):
    __slots__ = ()

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        # Same layout (no new slots): only `handle_error` changes.
        handler.__class__ = PlainErrorHandler
        return handler


@contextmanager
def hardened_server(
    handler: Handler, logger_name: str, **kwargs: Any
) -> Iterator[tuple[PlainErrorServer, Callable[[], int]]]:
    """A low-level server for `handler`, and a counter of the requests that were not valid HTTP.

    A refused request's unread body is drained for at most 2 s (so the client reads its 401/413
    rather than a reset), then the connection is closed.
    """
    log = logging.getLogger(logger_name)
    malformed = MalformedHttpFilter()
    log.addFilter(malformed)
    try:
        server = PlainErrorServer(handler, access_log=None, lingering_time=2.0, logger=log, **kwargs)
        yield server, lambda: malformed.count
    finally:
        log.removeFilter(malformed)
