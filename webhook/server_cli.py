"""`outrider webhook`: flags, start-up order and shutdown of the admission webhook process.

Without cluster flags it serves from files and treats every namespace as opted in; with
`--kubeconfig`/`--in-cluster` it enters `outrider.webhook.cluster.services.cluster_services` first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from outrider.webhook.config import (
    ConfigError,
    ConfigHolder,
    WebhookConfig,
    load_config_file,
    parse_config_text,
)
from outrider.webhook.namespaces import NamespaceFacts
from outrider.webhook.server import DEFAULT_MAX_BODY, READY_CHECKS, build_app, settle_heap
from outrider.webhook.tls import CertError, CertStore

if TYPE_CHECKING:
    from outrider.sidecar.telemetry.setup import TelemetryProviders

log = logging.getLogger("outrider.webhook")
SERVICE_NAME = "outrider-webhook"


def _otel_wanted(env: Mapping[str, str]) -> bool:
    # Cheap check first: without any OTEL_* variable the SDK and exporters are never imported.
    return any(key.startswith("OTEL_") for key in env)


@contextlib.contextmanager
def telemetry(env: Mapping[str, str] | None = None) -> Iterator[TelemetryProviders | None]:
    """The OTel SDK with OTLP exporters from the `OTEL_*` variables; None when nothing is exported."""
    env = os.environ if env is None else env
    if not _otel_wanted(env):
        yield None
        return
    from outrider.sidecar.telemetry.setup import build_providers, plan_export, tune_switch_interval

    plan = plan_export(env)
    if plan.traces is None and plan.metrics is None:
        for note in plan.notes:
            log.warning("telemetry: %s", note)
        log.info("telemetry: OTEL_* set but no OTLP endpoint; nothing exported")
        yield None
        return
    # the webhook's spans are the SDK's own (webhook/server.py): the lean span records are the sidecar's
    providers = build_providers(SERVICE_NAME, env=env, lean_spans=False)
    previous = tune_switch_interval(plan)
    try:
        yield providers
    finally:
        providers.shutdown()
        if previous is not None:
            sys.setswitchinterval(previous)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", help="serving certificate (PEM); reloaded when the file changes")
    parser.add_argument("--tls-key", help="serving key (PEM); reloaded when the file changes")
    parser.add_argument("--port", type=int, default=8443, help="HTTPS port (default: %(default)s)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    parser.add_argument("--config", help="webhook config file (YAML); default: built-in defaults")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="request body limit")
    parser.add_argument(
        "--reload-interval",
        type=float,
        default=2.0,
        help="seconds between checks of the cert and --config files",
    )
    parser.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        help="seconds between SIGTERM and closing the listener: /readyz answers 503 meanwhile, admissions "
        "are still served, so the Service drops this replica before it stops answering (manifests: 5)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    cluster = parser.add_argument_group("cluster (optional)")
    cluster.add_argument("--kubeconfig", help="talk to the cluster with this kubeconfig")
    cluster.add_argument(
        "--in-cluster", action="store_true", help="talk to the cluster as the pod's service account"
    )
    cluster.add_argument(
        "--namespace", default="outrider-system", help="the webhook's namespace (default: %(default)s)"
    )
    cluster.add_argument(
        "--webhook-config-name", default="outrider", help="MutatingWebhookConfiguration name"
    )
    cluster.add_argument(
        "--cert-mode",
        choices=["files", "self-managed"],
        default=None,
        help="files: --tls-cert/--tls-key (e.g. cert-manager); self-managed: the webhook issues and "
        "rotates its own (default in a cluster without --tls-cert)",
    )
    cluster.add_argument("--config-map", help="ConfigMap (in --namespace) holding the webhook config")


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None) -> int:
    try:
        config = load_config_file(args.config) if args.config else WebhookConfig()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    holder = ConfigHolder(config)
    store = CertStore()
    in_cluster = bool(args.kubeconfig or args.in_cluster)
    have_files = bool(args.tls_cert and args.tls_key)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: give both --tls-cert and --tls-key", file=sys.stderr)
        return 2
    if args.cert_mode is None:
        args.cert_mode = "files" if have_files or not in_cluster else "self-managed"
    if args.cert_mode == "files" and not have_files:
        print(
            "error: --tls-cert and --tls-key are required (or use --cert-mode self-managed in a cluster)",
            file=sys.stderr,
        )
        return 2
    if args.config_map and not in_cluster:
        print("error: --config-map needs a cluster: add --kubeconfig FILE or --in-cluster", file=sys.stderr)
        return 2
    if not 0 <= args.shutdown_delay <= 300:
        print(f"error: --shutdown-delay {args.shutdown_delay}: give seconds from 0 to 300", file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        print(f"error: --port {args.port} is not a port number (1-65535)", file=sys.stderr)
        return 2
    if args.cert_mode == "files":
        try:
            store.load_files(args.tls_cert, args.tls_key)
        except CertError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    draining = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        try:
            tasks = await _start(args, stack, holder, store, in_cluster, draining)
        except Exception as exc:  # every start-up failure is one line, never a traceback
            print(f"error: {_startup_failure(exc)}", file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
            draining.set()
            if args.shutdown_delay:
                # the kubelet's SIGTERM and the Service losing this endpoint race: serve on while
                # kube-proxy (and the apiserver's keep-alive connections) move to the other replicas
                log.info("outrider webhook draining for %.1f s (/readyz: 503)", args.shutdown_delay)
                await asyncio.sleep(args.shutdown_delay)
        finally:
            log.info("outrider webhook shutting down")
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return 0


class _StartError(RuntimeError):
    """A start-up step failed; the message is the one line the operator sees."""


def _startup_failure(exc: BaseException) -> str:
    """One line for a failed start: what was being done, and the cause without a traceback."""
    from outrider.webhook.cluster.kube import ClusterAccessError

    if isinstance(exc, _StartError | ClusterAccessError):
        return str(exc)
    status = getattr(exc, "status", None)
    if status is not None:  # kubernetes_asyncio ApiException
        return (
            f"the Kubernetes API refused a start-up call ({status} {getattr(exc, 'reason', '')}); check "
            "the webhook's RBAC (manifests/base) and --namespace"
        )
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, OSError):  # aiohttp's connection errors are OSErrors
        return f"cannot reach the Kubernetes API: {text or type(exc).__name__}"
    return f"start-up failed: {type(exc).__name__}{': ' + text if text else ''}"


async def _start(
    args: argparse.Namespace,
    stack: contextlib.AsyncExitStack,
    holder: ConfigHolder,
    store: CertStore,
    in_cluster: bool,
    draining: asyncio.Event,
) -> list[asyncio.Task[Any]]:
    """Everything before serving: telemetry, the cluster services, the HTTPS listener, the watches."""
    # Entered first, left last: spans and metrics of the final admissions are flushed on exit.
    otel = stack.enter_context(telemetry())
    namespaces: NamespaceFacts | None = None
    if in_cluster:
        from outrider.webhook.cluster.services import cluster_services

        namespaces = await stack.enter_async_context(cluster_services(args, holder, store))
    app = build_app(
        holder,
        store,
        namespaces,
        args.max_body_bytes,
        meter_provider=otel.meter_provider if otel else None,
        tracer_provider=otel.tracer_provider if otel else None,
    )
    app[READY_CHECKS].append(lambda: not draining.is_set())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, args.host, args.port, ssl_context=store.context, shutdown_timeout=10)
    try:
        await site.start()
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _StartError(f"cannot listen on {args.host}:{args.port}: {reason}") from None
    log.info("outrider webhook listening on https://%s:%s", args.host, args.port)
    settle_heap()
    tasks: list[asyncio.Task[Any]] = []
    if args.cert_mode == "files":
        tasks.append(asyncio.create_task(store.watch(args.reload_interval), name="outrider-cert-watch"))
    if args.config and not args.config_map:
        watch = watch_config_file(args.config, holder, args.reload_interval)
        tasks.append(asyncio.create_task(watch, name="outrider-config-watch"))
    return tasks


async def watch_config_file(path: str, holder: ConfigHolder, interval: float, settle: float = 0.1) -> None:
    """Apply edits of `--config` while serving; a bad edit is logged and the last good config kept.

    An edit is applied only once the file reads the same twice, `settle` seconds apart, and the
    config is parsed from exactly those bytes: a file caught mid-write (truncated, or empty while an
    editor rewrites it) is never applied, not even for one poll.
    """
    last = _read_bytes(path)
    while True:
        await asyncio.sleep(interval)
        current = _read_bytes(path)
        if current is None or current == last:
            continue
        await asyncio.sleep(settle)
        if _read_bytes(path) != current:
            continue  # still being written: judged at a later poll
        last = current
        try:
            config = parse_config_text(current.decode("utf-8"), path)
        except UnicodeDecodeError:
            log.warning("webhook config %s not applied (keeping the previous one): not UTF-8 text", path)
            continue
        except ConfigError as exc:
            log.warning("webhook config %s not applied (keeping the previous one): %s", path, exc)
            continue
        if config != holder.current:
            holder.replace(config)
            log.info("webhook config %s applied (hash %s)", path, config.hash)


def _read_bytes(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args))
