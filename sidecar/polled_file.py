"""Re-reading a mounted file on a poll: its bytes when they changed since the last read.

Shared by the policy files of the inbound gate (`outrider.sidecar.policy.reload`) and of egress
(`outrider.sidecar.egress.reload`); what the bytes mean stays with each of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path


def read_if_changed(
    path: Path, last_digest: bytes | None, fail: Callable[[str], None]
) -> tuple[bytes, bytes] | None:
    """(bytes, digest) of `path` when its SHA-256 differs from `last_digest`, else None.

    A missing file reads as empty (the policy was removed). Any other read error is passed to `fail`
    (the path and the OS reason, never the content) and gives None, so the last good state is kept.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = b""
    except OSError as exc:
        fail(f"{path}: cannot read: {exc.strerror}")
        return None
    digest = hashlib.sha256(raw).digest()
    if digest == last_digest:
        return None
    return raw, digest
