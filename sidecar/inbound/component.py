"""Starts and stops the inbound part of the sidecar: the 15006 listener, JWKS refresh, mTLS rotation.

`serve` takes an optional exchanger so tests can run the real listener with a stand-in exchanger.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import replace

import aiohttp
from aiohttp import web

from outrider.sidecar.exchange import TokenExchanger
from outrider.sidecar.exchange.config import ExchangeConfig
from outrider.sidecar.exchange.routing import IssuerExchangers
from outrider.sidecar.identity import IdentityUnavailable
from outrider.sidecar.identity.tls import RotatingServerContext
from outrider.sidecar.inbound.auth import JwksCache
from outrider.sidecar.inbound.callers import CallerVerifier, build_caller_verifier
from outrider.sidecar.inbound.proxy import InboundProxy
from outrider.sidecar.inbound.server import hardened_server
from outrider.sidecar.policy.gate import Gate, reload_loop
from outrider.sidecar.policy.model import Server
from outrider.sidecar.runtime import Runtime

log = logging.getLogger("outrider.inbound")


class _Build:
    """Marker: build the exchanger from `runtime.config.exchange` and the identity."""


BUILD = _Build()


def _build_exchanger(
    runtime: Runtime, session: aiohttp.ClientSession, config: ExchangeConfig | None = None
) -> TokenExchanger | None:
    config = config or runtime.config.exchange
    if not config.enabled:
        # A deliberate mode, not a failure: the app authenticates no one itself and gets the
        # caller's identity from nowhere but the sidecar's checks. The caller's token is still
        # stripped (MCP forbids passthrough), so the app receives no Authorization at all.
        log.warning(
            "token exchange is not configured (no exchange.token_endpoint): the MCP server will "
            "receive no Authorization header; callers are still authenticated by the sidecar"
        )
        return None
    if runtime.identity is None:
        log.warning("no workload identity: forwarding calls without a downstream token")
        return None
    try:
        from outrider.sidecar.exchange.client import build_exchanger
    except ImportError:
        log.warning(
            "token exchange is not available in this build: forwarding calls without a downstream token"
        )
        return None
    exchanger: TokenExchanger = build_exchanger(config, runtime.identity, session)
    return exchanger


def _build_exchangers(
    runtime: Runtime, session: aiohttp.ClientSession
) -> TokenExchanger | IssuerExchangers | None:
    """The exchanger of each trusted issuer (the top-level section serves `inbound.issuer`)."""
    issuers = runtime.config.inbound.trusted_issuers
    if len(issuers) <= 1:
        return _build_exchanger(runtime, session, issuers[0].exchange if issuers else None)
    return IssuerExchangers(
        {entry.issuer: _build_exchanger(runtime, session, entry.exchange) for entry in issuers}
    )


def build_gate(runtime: Runtime) -> Gate:
    """The policy gate (Cedar + rate limits); with nothing configured it is inactive (today's behaviour)."""
    pod = runtime.config.pod
    cache: dict[str | None, Server] = {}

    def server() -> Server:
        spiffe_id = runtime.identity.spiffe_id if runtime.identity is not None else None
        found = cache.get(spiffe_id)
        if found is None:
            found = cache[spiffe_id] = Server.from_facts(spiffe_id, pod.namespace, pod.name)
        return found

    gate = Gate.from_config(runtime.config.policy, server)
    log.info("policy: %s", gate.holder.policies.describe())
    if not gate.active:
        log.info(
            "policy: no policy and no rate limit configured: every authenticated caller may call every tool"
        )
    return gate


async def _refresh_jwks(jwks: JwksCache, interval_s: float) -> None:
    delay = 1.0
    while True:
        await jwks.refresh(force=True)
        # Retry quickly (with backoff) until the first keys arrive, then on the regular interval.
        delay = interval_s if jwks.loaded else min(delay * 2, 30.0)
        await asyncio.sleep(delay)


@asynccontextmanager
async def serve(
    runtime: Runtime, *, exchanger: TokenExchanger | _Build | None = BUILD
) -> AsyncIterator[InboundProxy]:
    config = runtime.config.inbound
    async with AsyncExitStack() as stack:
        # No cookie jar: exchanges for different users must not share IdP cookies.
        idp_session = await stack.enter_async_context(
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        )
        upstream = await stack.enter_async_context(
            aiohttp.ClientSession(
                # Idle upstream connections are dropped before common app servers close them
                # (uvicorn: 5 s), so a request is never written into a connection being closed.
                # The proxy's `UpstreamSlots` keeps within this; the connector's limit is a backstop.
                connector=aiohttp.TCPConnector(limit=config.upstream_max_connections, keepalive_timeout=2.0),
                auto_decompress=False,
                # A shared jar would replay one caller's app cookies on everyone's requests.
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent", "Content-Type", "Accept-Encoding"),
            )
        )
        verifier: CallerVerifier | None = None
        caches: list[JwksCache] = []
        if config.auth_enabled:
            verifier = build_caller_verifier(config, idp_session, runtime.identity)
            caches = verifier.jwks_caches
            for jwks in caches:
                task = asyncio.create_task(_refresh_jwks(jwks, config.jwks_refresh_interval_s))
                stack.callback(task.cancel)
        elif not config.mtls.enabled and not config.allow_unauthenticated:
            log.warning(
                "inbound: neither inbound.issuer nor inbound.mtls is configured: every call is refused"
            )
        chosen = _build_exchangers(runtime, idp_session) if isinstance(exchanger, _Build) else exchanger
        if config.token_header is None:
            # The exchange section also names the header; the inbound setting wins when given.
            config = replace(config, token_header=getattr(runtime.config.exchange, "header", "Authorization"))
        gate = build_gate(runtime)
        reloading = asyncio.create_task(reload_loop(gate), name="policy-reload")
        stack.callback(reloading.cancel)
        proxy = InboundProxy(
            config,
            observer=runtime.observer,
            verifier=verifier,
            exchanger=chosen,
            upstream=upstream,
            gate=gate,
        )
        # aiohttp's low-level server: one handler sees every request. The router would answer
        # some requests itself (e.g. `Expect` on a target it cannot match), before authentication.
        server, malformed = stack.enter_context(
            # Open SSE streams must not hold shutdown past the pod's grace period.
            hardened_server(proxy.handler(), "outrider.inbound.http", handler_cancellation=True)
        )
        proxy.malformed_count = malformed
        # On stop the runner closes the listener, closes idle keep-alive connections, and gives
        # in-flight calls (open SSE streams too) the configured drain time before cancelling them.
        runner = web.ServerRunner(server, shutdown_timeout=runtime.config.shutdown.drain_timeout_s)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        svid: RotatingServerContext | None = None
        if config.mtls.enabled:
            if runtime.identity is None:
                raise RuntimeError("inbound.mtls.enabled needs the identity component (no workload identity)")
            # Client certificates are optional: bearer-token callers connect over the same TLS port.
            svid = RotatingServerContext(runtime.identity, require_client_cert=False)
        site = web.TCPSite(
            runner, config.host, config.port, ssl_context=svid.context if svid else None, reuse_address=True
        )
        await site.start()
        log.info("inbound MCP proxy on %s:%d -> 127.0.0.1:%d", config.host, config.port, config.mcp_port)

        def ready() -> tuple[bool, str]:
            for jwks in caches:
                if not jwks.loaded:
                    return False, f"issuer signing keys not loaded: {jwks.last_error or 'fetching'}"
            if svid is not None:
                try:
                    svid.current()
                except IdentityUnavailable:
                    return False, "waiting for the X.509-SVID for inbound mTLS"
            return True, "ok"

        runtime.readiness["inbound"] = ready
        runtime.readiness["policy"] = gate.ready
        runtime.metrics.append(proxy.metrics_text)
        runtime.metrics.append(gate.metrics_text)
        if verifier is not None:
            runtime.metrics.append(verifier.metrics_text)
        try:
            yield proxy
        finally:
            runtime.readiness.pop("inbound", None)
            runtime.readiness.pop("policy", None)
            producers = [proxy.metrics_text, gate.metrics_text]
            if verifier is not None:
                producers.append(verifier.metrics_text)
            for producer in producers:
                with suppress(ValueError):
                    runtime.metrics.remove(producer)


@asynccontextmanager
async def component(runtime: Runtime) -> AsyncIterator[None]:
    async with serve(runtime):
        yield
