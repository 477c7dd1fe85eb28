"""Folds repeated identical denials into one audit event per interval, with a count.

A client retrying a refused call in a loop, or an app hammering a blocked host, must not flood the
audit log: the first denial is written at once, identical ones within the interval are counted, and
one summary event (the last of them plus `aggregate.count`) is written when the interval ends.
Pure apart from the clock the caller passes in.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

Event = dict[str, Any]


def _get(event: Event, *path: str) -> Any:
    value: Any = event
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def denial_key(event: Event) -> tuple[Any, ...] | None:
    """What makes two denials "identical" (never the ids, times or trace of one occurrence)."""
    if event.get("outcome") != "denied":
        return None
    policies = _get(event, "policy", "policies")
    return (
        event.get("type"),
        event.get("reason"),
        _get(event, "user", "sub"),
        _get(event, "user", "iss"),
        _get(event, "mcp", "method"),
        _get(event, "mcp", "tool"),
        _get(event, "mcp", "prompt"),
        _get(event, "mcp", "resource"),
        _get(event, "mcp", "error_type"),
        _get(event, "mcp", "http_status"),
        _get(event, "policy", "decision"),
        tuple(policies) if isinstance(policies, list) else None,
        _get(event, "egress", "name"),
        _get(event, "egress", "destination_ip"),
        _get(event, "egress", "destination_port"),
        _get(event, "egress", "protocol"),
        _get(event, "egress", "rule"),
    )


@dataclass
class _Window:
    started: float
    count: int = 0  # identical denials folded (not written) since the window opened
    first_time: str | None = None
    last: Event | None = None


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DenialAggregator:
    def __init__(self, window_s: float, max_keys: int = 10_000) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._open: dict[tuple[Any, ...], _Window] = {}
        self.folded_total = 0

    def passes(self, event: Event) -> bool:
        """True when `offer(event, now)` gives `[event]` whatever `now`: no window is open and
        `event` is no denial to fold (the common case, decided without the clock)."""
        return not self._open and (self.window_s <= 0 or event.get("outcome") != "denied")

    def passes_outcome(self, outcome: str) -> bool:
        """`passes` for an event whose `outcome` is `outcome`."""
        return not self._open and (self.window_s <= 0 or outcome != "denied")

    def offer(self, event: Event, now: float) -> list[Event]:
        """The events to write now for `event` (none when it was folded into a window)."""
        out = self.due(now) if self._open else []  # no window open (most calls): nothing is due
        key = denial_key(event) if self.window_s > 0 else None
        if key is None:
            out.append(event)
            return out
        window = self._open.get(key)
        if window is None:
            if len(self._open) >= self.max_keys:
                out.extend(self.flush())  # many distinct denials: keep memory bounded
            self._open[key] = _Window(now)
            out.append(event)
            return out
        window.count += 1
        self.folded_total += 1
        window.last = event
        window.first_time = window.first_time or str(event.get("time") or _now_text())
        return out

    def due(self, now: float) -> list[Event]:
        """Summaries of the windows that ended; those windows close."""
        out: list[Event] = []
        for key, window in list(self._open.items()):
            if now - window.started >= self.window_s:
                del self._open[key]
                summary = self._summary(window)
                if summary is not None:
                    out.append(summary)
        return out

    def flush(self) -> list[Event]:
        out = [s for w in self._open.values() if (s := self._summary(w)) is not None]
        self._open.clear()
        return out

    def _summary(self, window: _Window) -> Event | None:
        if not window.count or window.last is None:
            return None
        summary = dict(window.last)
        summary["event_id"] = str(uuid.uuid4())
        summary["aggregate"] = {
            "count": window.count,
            "first_time": window.first_time,
            "last_time": str(window.last.get("time") or _now_text()),
            "window_s": self.window_s,
        }
        return summary
