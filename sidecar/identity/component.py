"""Starts and stops the pod's workload identity inside `outrider sidecar`.

Publishes `runtime.identity`, the `identity` readiness check and the identity metrics on /metrics.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

from outrider.sidecar.identity import svid as core
from outrider.sidecar.identity.workload import IdentityStats, WorkloadApiIdentity
from outrider.sidecar.runtime import Runtime
from outrider.sidecar.telemetry.prom_text import Family, render


def _counter(name: str, doc: str, value: float) -> Family:
    family = Family(name, doc, "counter")
    family.add((), value)
    return family


def families(s: IdentityStats, now: float) -> Iterator[Family]:
    """The identity metrics for one consistent read of the stats."""
    ready = Family("outrider_identity_ready", "1 while the pod holds a usable SVID", "gauge")
    ready.add((), 1.0 if s.ready else 0.0)
    yield ready
    state = Family(
        "outrider_identity_state", "Workload API health (1 for the current state)", "gauge", ("state",)
    )
    for name in core.STATES:
        state.add((name,), 1.0 if name == s.state else 0.0)
    yield state
    yield _counter(
        "outrider_identity_svid_rotations", "X.509-SVIDs received (first one included)", s.rotations
    )
    yield _counter(
        "outrider_identity_bundle_updates", "trust bundle updates without a new SVID", s.bundle_updates
    )
    yield _counter(
        "outrider_identity_stream_failures", "Workload API X.509 stream failures", s.stream_failures
    )
    expiry = Family(
        "outrider_identity_svid_expiry_seconds", "seconds until the held X.509-SVID expires", "gauge"
    )
    if s.not_after is not None:
        expiry.add((), max(0.0, s.not_after - now))
    yield expiry
    jwt = Family("outrider_identity_jwt_svid_requests", "JWT-SVID requests by result", "counter", ("result",))
    for result, count in sorted(s.jwt_fetches.items()):
        jwt.add((result,), count)
    yield jwt


def metrics_producer(
    identity: WorkloadApiIdentity, clock: Callable[[], float] = time.time
) -> Callable[[], bytes]:
    """A Prometheus text exposition producer for `runtime.metrics`."""
    return lambda: render(families(identity.stats(), clock()))


@asynccontextmanager
async def component(runtime: Runtime) -> AsyncIterator[None]:
    identity = WorkloadApiIdentity(runtime.config.identity, observer=runtime.observer)
    async with identity:
        runtime.identity = identity
        runtime.readiness["identity"] = lambda: (identity.ready, identity.status)
        runtime.metrics.append(metrics_producer(identity))
        try:
            yield
        finally:
            runtime.readiness.pop("identity", None)
            runtime.identity = None
