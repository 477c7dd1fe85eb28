"""Which principal owns which MCP session: the binding table and the pure decisions over it.

An unchanged MCP server hands a session to whoever presents its id; the sidecar binds each id to
the principal whose `initialize` created it and refuses everyone else as if the id were unknown.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from outrider.sidecar.inbound.config import SessionsConfig
from outrider.sidecar.inbound.holders import HolderCounts
from outrider.sidecar.telemetry.observer import Principal

# MCP: a session id is visible ASCII (0x21-0x7E). Longer ids are never bound, so never accepted.
MAX_SESSION_ID_LENGTH = 512
LEGACY_SESSION_PARAM = "session_id"

Decision = Literal["owner", "foreign", "unbound"]


def owner_key(principal: Principal) -> str:
    """Who a session belongs to: issuer + subject for tokens, the SPIFFE ID for mTLS peers.

    The client id is deliberately not part of it: one person's session stays theirs when their
    client refreshes its token (same `iss`/`sub`), and two people never share an `iss`/`sub`.
    """
    if principal.kind == "oidc":
        return f"oidc\x00{principal.issuer or ''}\x00{principal.subject}"
    return f"{principal.kind}\x00{principal.subject}"


def valid_session_id(session_id: str) -> bool:
    return 0 < len(session_id) <= MAX_SESSION_ID_LENGTH and all(0x21 <= ord(c) <= 0x7E for c in session_id)


def fingerprint(session_id: str) -> str:
    """A log-safe name for a session id (the id itself lets its holder into the session)."""
    return hashlib.sha256(session_id.encode("utf-8", "replace")).hexdigest()[:12]


def decide(bound_owner: str | None, caller: str) -> Decision:
    if bound_owner is None:
        return "unbound"
    return "owner" if bound_owner == caller else "foreign"


def request_session_ids(headers: Iterable[str], query: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """Every session id a request names: each `Mcp-Session-Id` header and each legacy `session_id`.

    Every header counts, not the first: the proxy forwards them all, and an app (or the framework
    under it) that reads the last one must not be handed a session its caller does not own.
    """
    ids = [header.strip() for header in headers]
    ids.extend(value for name, value in query if name == LEGACY_SESSION_PARAM)
    return tuple(dict.fromkeys(ids))


def legacy_endpoint_session(data: str) -> str | None:
    """The `session_id` a 2024-11-05 `endpoint` event announces (`/messages/?session_id=…`)."""
    values = [
        v
        for k, v in parse_qsl(urlsplit(data.strip()).query, keep_blank_values=True)
        if k == LEGACY_SESSION_PARAM
    ]
    return values[0] if len(values) == 1 and valid_session_id(values[0]) else None


class SessionTable:
    """In-memory bindings, least recently used first; bounded in count and idle time. At the count
    bound the owner holding the most bindings loses one, so no caller can evict everyone else's.

    A binding that is evicted or expires is gone: its session then gets 404 from the sidecar, and an
    MCP client answers a 404 by starting a new session (fail closed, never fail open).
    """

    def __init__(self, policy: SessionsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()
        # The same bindings per owner, least recently used first: a full table takes from the owner
        # holding the most, so one caller opening sessions without end only evicts their own.
        self._by_owner: dict[str, OrderedDict[str, None]] = {}
        self._holders = HolderCounts()
        self.evicted_total = 0
        self.expired_total = 0

    def __len__(self) -> int:
        return len(self._owners)

    def owner(self, session_id: str) -> str | None:
        """The owner of a live binding (and mark it used), or None."""
        entry = self._owners.get(session_id)
        if entry is None:
            return None
        owner, last = entry
        now = self._clock()
        if now - last > self._policy.idle_timeout_s:
            self._drop(session_id)
            self.expired_total += 1
            return None
        self._owners[session_id] = (owner, now)
        self._owners.move_to_end(session_id)
        self._by_owner[owner].move_to_end(session_id)
        return owner

    def bind(self, session_id: str, owner: str) -> bool:
        """Bind a new session; False (and no change) when the id is unusable or owned by someone else."""
        if not valid_session_id(session_id):
            return False
        current = self.owner(session_id)
        if current is not None and current != owner:
            return False
        now = self._clock()
        self._owners[session_id] = (owner, now)
        self._owners.move_to_end(session_id)
        held = self._by_owner.setdefault(owner, OrderedDict())
        if session_id not in held:
            held[session_id] = None
            self._holders.moved(owner, len(held) - 1, len(held))
        held.move_to_end(session_id)
        self._prune(now)
        return True

    def forget(self, session_id: str) -> None:
        if session_id in self._owners:
            self._drop(session_id)

    def _drop(self, session_id: str) -> None:
        owner, _ = self._owners.pop(session_id)
        held = self._by_owner[owner]
        del held[session_id]
        self._holders.moved(owner, len(held) + 1, len(held))
        if not held:
            del self._by_owner[owner]

    def _victim(self) -> str:
        """The least recently used binding of the owner holding the most (ties: least recently used)."""
        most = self._holders.holding_most()
        if len(most) <= 8:
            return min((next(iter(self._by_owner[o])) for o in most), key=lambda sid: self._owners[sid][1])
        # Many owners hold as many (e.g. one each): the globally oldest binding of one of them is near
        # the front of the table, so looking from there is quicker than looking at each of them.
        return next(sid for sid, (owner, _) in self._owners.items() if owner in most)

    def _prune(self, now: float) -> None:
        while self._owners:
            oldest, (_, last) = next(iter(self._owners.items()))
            if now - last <= self._policy.idle_timeout_s:
                break
            self._drop(oldest)
            self.expired_total += 1
        while len(self._owners) > self._policy.max_sessions:
            self._drop(self._victim())
            self.evicted_total += 1
