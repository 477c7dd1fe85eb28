"""Starts and stops the egress part of the sidecar process: the 15001 listeners and the policy reloader.

The listeners serve captured connections and explicit-proxy clients alike; the reloader re-reads the
mounted policy file and swaps the effective policy (pod spec ∩ file) without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from outrider.sidecar.egress.config import EgressConfig
from outrider.sidecar.egress.enforcer import Enforcer, Resolver, listen_sockets, system_resolver
from outrider.sidecar.egress.reload import PolicyHolder, spec_policy
from outrider.sidecar.egress.resolver import DnsResolver, unresolvable
from outrider.sidecar.runtime import Runtime
from outrider.sidecar.telemetry.observer import EgressDecision

log = logging.getLogger("outrider.egress")


class _RuntimeObserver:
    """Looks up `runtime.observer` per decision, so a later-installed observer is honoured."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def egress(self, decision: EgressDecision) -> None:
        self._runtime.observer.egress(decision)


def build_holder(runtime: Runtime) -> PolicyHolder:
    config = runtime.config.egress
    spec, errors = spec_policy(config.policy)
    for error in errors:
        log.error("egress: %s (rule left out: deny by default)", error)
    holder = PolicyHolder(spec=spec, path=Path(config.policy_file) if config.policy_file else None)
    holder.check()
    return holder


async def _reload_loop(holder: PolicyHolder, interval: float, enforcer: Enforcer | None = None) -> None:
    # Polling the bytes is the reliable way to see ConfigMap volume updates: the kubelet swaps a
    # `..data` symlink, which inotify on the file itself does not report.
    while True:
        await asyncio.sleep(interval)
        if holder.check():
            log.info("egress: policy reloaded: %d layer(s)", len(holder.current.layers))
            if enforcer is not None:
                # A narrowing applies to open tunnels too, not only to new connections.
                closed = enforcer.revalidate()
                if closed:
                    log.info("egress: closed %d open tunnel(s) the new policy no longer allows", closed)


def build_resolver(config: EgressConfig) -> Resolver:
    if config.resolver == "system":
        return system_resolver
    try:
        resolver = DnsResolver(config.resolv_conf, config.connect_timeout_s)
    except OSError as exc:
        # Fail closed: the system resolver would read the pod's /etc/hosts, which the app can write.
        log.error("%s; allowed names will not resolve (set egress.resolver: system to use getaddrinfo)", exc)
        return unresolvable
    log.info("egress: resolving allowed names with %s", ", ".join(resolver.nameservers))
    return resolver


def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one: each tunnel holds two sockets and two pipes, and a
    1024 soft limit would run out long before `max_tunnels` (the accept loop survives that, but refuses)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


@asynccontextmanager
async def component(runtime: Runtime) -> AsyncIterator[None]:
    config = runtime.config.egress
    raise_fd_limit()
    holder = build_holder(runtime)
    enforcer = Enforcer(config, holder, _RuntimeObserver(runtime), resolver=build_resolver(config))  # type: ignore[arg-type]
    listeners = listen_sockets(config.listen, config.port)
    runtime.metrics.append(enforcer.stats.prometheus)
    runtime.metrics.append(lambda: _reload_metrics(holder))
    runtime.readiness["egress"] = lambda: (True, "ok" if holder.last_error is None else holder.last_error)
    serving = asyncio.create_task(enforcer.serve(listeners), name="egress-serve")
    reloading = asyncio.create_task(
        _reload_loop(holder, config.reload_interval_s, enforcer), name="egress-reload"
    )
    log.info(
        "egress: %s mode, listening on %s port %d",
        config.mode,
        ", ".join(s.getsockname()[0] for s in listeners),
        config.port,
    )
    try:
        yield
    finally:
        for task in (reloading, serving):
            task.cancel()
        for task in (reloading, serving):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in listeners:
            sock.close()


def _reload_metrics(holder: PolicyHolder) -> bytes:
    return (
        "# HELP outrider_egress_policy_reloads_total Policy file loads that took effect.\n"
        "# TYPE outrider_egress_policy_reloads_total counter\n"
        f"outrider_egress_policy_reloads_total {holder.reloads}\n"
        "# HELP outrider_egress_policy_reload_errors_total Policy file loads rejected (last good kept).\n"
        "# TYPE outrider_egress_policy_reload_errors_total counter\n"
        f"outrider_egress_policy_reload_errors_total {holder.reload_errors}\n"
    ).encode()
