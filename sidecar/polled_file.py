"""Re-reading a mounted file on a poll: its bytes when they changed since the last read.

Shared by the policy files of the inbound gate (`outrider.sidecar.policy.reload`) and of egress
(`outrider.sidecar.egress.reload`); what the bytes mean stays with each of them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

# A changed file is read again this long after, and taken only when both reads agree: a file caught
# mid-write (truncated by an editor or `>` before it is rewritten) is never taken, not even for one
# poll. Empty would otherwise lift the file's narrowing for a poll interval. Paid once per edit.
SETTLE_S = 0.02


def read_if_changed(
    path: Path, last_digest: bytes | None, fail: Callable[[str], None]
) -> tuple[bytes, bytes] | None:
    """(bytes, digest) of `path` when its SHA-256 differs from `last_digest`, else None.

    A changed file counts only when a second read `SETTLE_S` later gives the same bytes (else None:
    the next poll judges it). A missing file reads as empty (the policy was removed). Any other read
    error is passed to `fail` (the path and the OS reason, never the content) and gives None, so the
    last good state is kept.
    """
    raw = _read(path, fail)
    if raw is None:
        return None
    digest = hashlib.sha256(raw).digest()
    if digest == last_digest:
        return None
    time.sleep(SETTLE_S)
    if _read(path, fail) != raw:
        return None  # still being written: judged again at the next poll
    return raw, digest


def _read(path: Path, fail: Callable[[str], None]) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        fail(f"{path}: cannot read: {exc.strerror}")
        return None
