"""Starts and stops the pod's workload identity inside `outrider sidecar`.

Publishes `runtime.identity`, the `identity` readiness check and the identity metrics on /metrics.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from outrider.sidecar.identity import svid as core
from outrider.sidecar.identity.workload import IdentityStats, WorkloadApiIdentity
from outrider.sidecar.runtime import Runtime


class _IdentityCollector(Collector):
    def __init__(self, stats: Callable[[], IdentityStats], clock: Callable[[], float]) -> None:
        self._stats = stats
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        ready = GaugeMetricFamily("outrider_identity_ready", "1 while the pod holds a usable SVID")
        ready.add_metric([], 1.0 if s.ready else 0.0)
        yield ready
        state = GaugeMetricFamily(
            "outrider_identity_state", "Workload API health (1 for the current state)", labels=["state"]
        )
        for name in core.STATES:
            state.add_metric([name], 1.0 if name == s.state else 0.0)
        yield state
        yield CounterMetricFamily(
            "outrider_identity_svid_rotations", "X.509-SVIDs received (first one included)", value=s.rotations
        )
        yield CounterMetricFamily(
            "outrider_identity_bundle_updates",
            "trust bundle updates without a new SVID",
            value=s.bundle_updates,
        )
        yield CounterMetricFamily(
            "outrider_identity_stream_failures", "Workload API X.509 stream failures", value=s.stream_failures
        )
        expiry = GaugeMetricFamily(
            "outrider_identity_svid_expiry_seconds", "seconds until the held X.509-SVID expires"
        )
        if s.not_after is not None:
            expiry.add_metric([], max(0.0, s.not_after - self._clock()))
        yield expiry
        jwt = CounterMetricFamily(
            "outrider_identity_jwt_svid_requests", "JWT-SVID requests by result", labels=["result"]
        )
        for result, count in sorted(s.jwt_fetches.items()):
            jwt.add_metric([result], count)
        yield jwt


def metrics_producer(
    identity: WorkloadApiIdentity, clock: Callable[[], float] = time.time
) -> Callable[[], bytes]:
    """A Prometheus text exposition producer for `runtime.metrics`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_IdentityCollector(identity.stats, clock))
    return lambda: generate_latest(registry)


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
