"""The admin server on 15020: /healthz, /readyz, /metrics and kubelet probe forwarding.

(Placeholder until its owner fills it in.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sidecar.runtime import Runtime


@asynccontextmanager
async def component(runtime: Runtime) -> AsyncIterator[None]:
    yield
