"""The open 2024-11-05 HTTP+SSE sessions: where the proxy's own answers to a session's POSTs go.

In that transport a POST is only acknowledged (202); its answer travels on the session's GET stream.
A request the policy gate refuses is answered there too, and only for the principal who opened it.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs, urlsplit

from outrider.sidecar.inbound import jsonrpc
from outrider.sidecar.telemetry.observer import Principal

MAX_QUEUED = 256


def _owner(principal: Principal) -> str:
    return f"{principal.kind}\x00{principal.issuer or ''}\x00{principal.subject}"


def session_of_endpoint(raw: bytes) -> str | None:
    """The `session_id` in a legacy `endpoint` event's URL, if `raw` is that event."""
    for event in jsonrpc.SseParser().feed(
        raw if raw.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")) else raw + b"\n\n"
    ):
        if event.event == "endpoint":
            values = parse_qs(urlsplit(event.data.strip()).query).get("session_id")
            return values[0] if values else None
    return None


class LegacySessions:
    def __init__(self) -> None:
        self._open: dict[str, tuple[str, asyncio.Queue[bytes]]] = {}

    def open(self, session: str, principal: Principal) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(MAX_QUEUED)
        self._open[session] = (_owner(principal), queue)
        return queue

    def close(self, session: str, queue: asyncio.Queue[bytes] | None) -> None:
        entry = self._open.get(session)
        if entry is not None and entry[1] is queue:
            del self._open[session]

    def deliver(self, session: str, principal: Principal, messages: list[dict[str, Any]]) -> bool:
        """Queue `messages` on the session's stream; False when there is no such stream of this caller."""
        entry = self._open.get(session)
        if entry is None or entry[0] != _owner(principal):
            return False
        queue = entry[1]
        for message in messages:
            try:
                queue.put_nowait(jsonrpc.sse_message(message))
            except asyncio.QueueFull:
                return True  # a client that never reads its stream loses our answers, not our memory
        return True
