"""`outrider demo --spire`: the real SPIRE server and agent as the pod's Workload API.

(Filled in once `sidecar/dev/spire.py` lands.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.demo.run import Demo


async def start(demo: Demo, socket_path: str) -> str:
    raise RuntimeError("sidecar.dev.spire is not available yet")
