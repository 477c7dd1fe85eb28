"""`cluster_services`: everything `outrider webhook` runs when it is given a cluster.

Opens the API client, loads config and certificates before the server takes traffic, then keeps the
namespace cache, the ConfigMap watch and certificate rotation running until the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from outrider.webhook.cluster.certsync import CertSync, PemLoader
from outrider.webhook.cluster.configmap import ConfigMapWatch
from outrider.webhook.cluster.kube import api_client
from outrider.webhook.cluster.namespaces import NamespaceCache
from outrider.webhook.cluster.options import ClusterOptions
from outrider.webhook.config import ConfigHolder
from outrider.webhook.namespaces import NamespaceFacts

log = logging.getLogger("outrider.webhook.cluster")


@asynccontextmanager
async def cluster_services(
    options: Any, config_holder: ConfigHolder, cert_store: Any
) -> AsyncIterator[NamespaceFacts]:
    opts = options if isinstance(options, ClusterOptions) else ClusterOptions.from_args(options)
    async with api_client(opts) as api:
        tasks: list[asyncio.Task[None]] = []

        def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
            tasks.append(asyncio.create_task(coro, name=name))

        config_watch: ConfigMapWatch | None = None
        if opts.config_map:
            config_watch = ConfigMapWatch(
                api, opts.namespace, opts.config_map, config_holder, pod_name=opts.pod_name
            )
            await config_watch.load_once()  # the first admission already sees the ConfigMap
            spawn(config_watch.run(), "outrider-configmap-watch")
        watched = config_watch
        namespaces = NamespaceCache(api, policies=lambda: watched.namespace_egress if watched else {})
        spawn(namespaces.run(), "outrider-namespace-watch")
        certs: CertSync | None = None
        if opts.cert_mode == "self-managed":
            loader: PemLoader = cert_store
            certs = CertSync(api, opts, loader)
            await certs.start()  # serve only once we hold the agreed certificate
            spawn(certs.run(), "outrider-cert-sync")
        try:
            yield namespaces
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if certs is not None:
                with contextlib.suppress(Exception):
                    await certs.release()
