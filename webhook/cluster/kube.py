"""Kubernetes API client set-up: a kubeconfig file (dev, tests) or the pod's service account.

One `ApiClient` per process, closed by the context manager that opened it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from kubernetes_asyncio import client, config

from webhook.cluster.options import ClusterOptions


@asynccontextmanager
async def api_client(options: ClusterOptions) -> AsyncIterator[client.ApiClient]:
    if options.in_cluster:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        api = client.ApiClient(configuration)
    else:
        api = await config.new_client_from_config(config_file=options.kubeconfig)
    try:
        yield api
    finally:
        await api.close()
