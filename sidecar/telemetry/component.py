"""Starts and stops the telemetry part of the sidecar process: SDK providers, audit log, observer.

Entered first so that every other component reports to it; on exit it flushes spans and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from outrider.sidecar.runtime import Runtime
from outrider.sidecar.telemetry.audit import AuditLog, Workload
from outrider.sidecar.telemetry.worker import Worker

log = logging.getLogger("outrider.telemetry")


@asynccontextmanager
async def _audit_only(runtime: Runtime) -> AsyncIterator[None]:
    """No SDK: the audit log alone (no-op tracer and meter), or nothing at all when it is off too."""
    config = runtime.config.telemetry.with_salt_from_file()
    audit = AuditLog.open(config.audit, aggregate_s=config.audit_aggregate_s)
    previous = runtime.observer
    worker = Worker(enabled=config.background)
    if audit.enabled:
        # Imported only here: with telemetry and audit both off, no OpenTelemetry module is loaded.
        from opentelemetry import metrics, trace

        from outrider.sidecar.telemetry.observer_otel import OtelObserver

        runtime.observer = OtelObserver(
            config,
            tracer_provider=trace.NoOpTracerProvider(),
            meter_provider=metrics.NoOpMeterProvider(),
            audit=audit,
            workload=_WorkloadFacts(runtime),
            worker=worker,
        )
    log.info("telemetry: OTEL_SDK_DISABLED=true: no spans or metrics; audit log %s", config.audit)
    try:
        yield
    finally:
        runtime.observer = previous
        await asyncio.to_thread(worker.close)
        audit.close()


class _WorkloadFacts:
    """The pod's facts for every span and audit line; rebuilt only when the SPIFFE ID changes."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._current = Workload(pod=runtime.config.pod.name, namespace=runtime.config.pod.namespace)

    def __call__(self) -> Workload:
        identity = self._runtime.identity
        spiffe_id = identity.spiffe_id if identity is not None else None
        if spiffe_id != self._current.spiffe_id:
            self._current = Workload(spiffe_id, self._current.pod, self._current.namespace)
        return self._current


def sdk_disabled(env: Mapping[str, str]) -> bool:
    """`OTEL_SDK_DISABLED=true` (the standard switch) turns spans and metrics off entirely."""
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


@asynccontextmanager
async def component(runtime: Runtime) -> AsyncIterator[None]:
    config = runtime.config.telemetry.with_salt_from_file()
    if config.hash_user and not config.hash_salt:
        log.warning(
            "telemetry.hash_user is on without telemetry.hash_salt: user pseudonyms can be reversed "
            "by hashing candidate user names; set a secret salt"
        )
    if sdk_disabled(os.environ):
        async with _audit_only(runtime):
            yield
        return
    # Imported here: the OTel SDK costs RSS that a process with OTEL_SDK_DISABLED never uses.
    from outrider.sidecar.telemetry.setup import build_providers, tune_switch_interval

    providers = build_providers(
        config.service_name,
        resource_attributes={
            "k8s.pod.name": runtime.config.pod.name,
            "k8s.namespace.name": runtime.config.pod.namespace,
        },
    )
    audit = AuditLog.open(config.audit, aggregate_s=config.audit_aggregate_s)
    switch_interval = tune_switch_interval(providers.plan, sdk_export=providers.sdk_export())
    worker = Worker(enabled=config.background)
    previous = runtime.observer
    runtime.observer = providers.observer(config, audit, _WorkloadFacts(runtime), worker)
    runtime.metrics.append(providers.prometheus)
    try:
        yield
    finally:
        runtime.observer = previous
        if providers.prometheus in runtime.metrics:
            runtime.metrics.remove(providers.prometheus)
        # Record what is queued, then flush: both block (the collector for up to its timeout), so
        # keep the event loop free meanwhile.
        await asyncio.to_thread(worker.close)
        await asyncio.to_thread(providers.shutdown)
        audit.close()
        if switch_interval is not None:
            sys.setswitchinterval(switch_interval)
        log.info("telemetry stopped: spans and metrics flushed")
