"""`outrider sidecar`: one asyncio process that runs every component of `outrider-proxy`.

Order matters: telemetry first (others report to it), identity next (others use the SVID), then
the admin server, the inbound MCP proxy and the egress enforcer. Exit is the reverse order, after
the drain of `outrider.sidecar.shutdown` (SIGTERM: unready, grace, in-flight calls finish, exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import signal
import sys
from contextlib import AsyncExitStack, suppress

from outrider.sidecar import admin, mounted_files
from outrider.sidecar.config import ConfigError, SidecarConfig, load
from outrider.sidecar.egress import component as egress
from outrider.sidecar.identity import component as identity
from outrider.sidecar.inbound import component as inbound
from outrider.sidecar.runtime import Component, Runtime
from outrider.sidecar.telemetry import component as telemetry

log = logging.getLogger("outrider.sidecar")

COMPONENTS: tuple[Component, ...] = (
    telemetry.component,
    mounted_files.component,
    identity.component,
    admin.component,
    inbound.component,
    egress.component,
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON config file (also OUTRIDER_SIDECAR_CONFIG)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")


async def serve(config: SidecarConfig, stop: asyncio.Event | None = None) -> None:
    """Run every component until `stop` is set (or SIGTERM/SIGINT when `stop` is None)."""
    runtime = Runtime(config=config)
    stop = stop or _signal_event()
    async with AsyncExitStack() as stack:
        for component in COMPONENTS:
            try:
                await stack.enter_async_context(component(runtime))
            except Exception as exc:  # start-up only: one line naming the part, never a traceback
                raise StartupError(f"{_area(component)}: {_one_line(exc)}") from exc
        _release_startup_memory()
        stack.callback(gc.set_threshold, *gc.get_threshold())  # (an in-process caller gets its own back)
        _settle_heap()
        log.info("outrider-proxy running (pod %s/%s)", config.pod.namespace, config.pod.name)
        await stop.wait()
        await _drain_grace(runtime)
        log.info(
            "outrider-proxy closing its listeners; in-flight calls get up to %gs",
            config.shutdown.drain_timeout_s,
        )
    log.info("outrider-proxy stopped")


async def _drain_grace(runtime: Runtime) -> None:
    """Report unready at once, and keep accepting for the grace period: the pod's endpoint removal
    may still be on its way to some node's kube-proxy, whose traffic would otherwise be refused."""
    runtime.draining = True
    grace = runtime.config.shutdown.grace_s
    log.info("outrider-proxy draining: /readyz reports unready; accepting new connections for %gs", grace)
    if grace > 0:
        await asyncio.sleep(grace)


class StartupError(RuntimeError):
    """A component could not start; the message names the component and the cause in one line."""


def _area(component: Component) -> str:
    # outrider.sidecar.inbound.component -> inbound; outrider.sidecar.admin -> admin
    parts = component.__module__.removeprefix("outrider.").split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not str(exc).startswith("[Errno"):
        return str(exc).splitlines()[0]
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text or type(exc).__name__


# Objects allocated (net of those freed) between young-generation collections once started.
YOUNG_THRESHOLD = 10_000


def _release_startup_memory() -> None:
    """Hand the heap that imports and start-up left free back to the kernel (~0.7 MB of idle RSS).

    glibc keeps freed memory at the top of its heaps for reuse; `malloc_trim` returns it. Other C
    libraries (musl) have no such call: nothing to do there.
    """
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _settle_heap() -> None:
    """Start-up is over: keep what it made out of the cyclic garbage collector's full scans.

    Modules, the configuration, the components and their clients live as long as the process;
    `gc.freeze` moves them to the permanent generation, so the full collections that requests'
    surviving objects trigger scan only what was made since. Measured in the capacity harness
    (docs/capacity.md): full collections fell from ~6-12 us of CPU per request to under 1 us.

    The young generation's threshold is raised too: a request's objects die by reference counting,
    so the allocation count only wanders up and down with the requests in flight, and at the default
    700 it crossed the threshold every ~10-40 requests, each time scanning (and promoting) the live
    objects of every request in flight for nothing (~6 us of CPU per request; docs/capacity.md). Real
    cyclic garbage is still collected, after `YOUNG_THRESHOLD` more objects than before at most. With
    telemetry on, the jobs waiting for the telemetry thread are live too: fewer collections scan
    about as much each, and fewer of those objects survive into the older generations.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=str(args.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"outrider sidecar: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        print(f"outrider sidecar: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
