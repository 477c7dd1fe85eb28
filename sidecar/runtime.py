"""What the sidecar's components share at run time, and the shape of a component.

A component is an async context manager over the `Runtime`: it starts its servers and background
tasks on enter, publishes what others need on the runtime, and stops cleanly on exit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from outrider.sidecar.config import SidecarConfig
from outrider.sidecar.identity import WorkloadIdentity
from outrider.sidecar.telemetry.observer import NullObserver, Observer

# name -> () -> (ok, one-line detail); /readyz is ready when all are ok.
ReadinessCheck = Callable[[], tuple[bool, str]]


@dataclass
class Runtime:
    config: SidecarConfig
    observer: Observer = field(default_factory=NullObserver)
    identity: WorkloadIdentity | None = None
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    # Prometheus text exposition contributors, concatenated by /metrics on the admin port.
    metrics: list[Callable[[], bytes]] = field(default_factory=list)
    # set on SIGTERM: /readyz answers 503 from then on, so no new traffic is routed here
    draining: bool = False


Component = Callable[[Runtime], AbstractAsyncContextManager[None]]
