"""Kubernetes API client set-up: a kubeconfig file (dev, tests) or the pod's service account.

One `ApiClient` per process, closed by the context manager that opened it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import yaml
from kubernetes_asyncio import client, config

from outrider.webhook.cluster.options import ClusterOptions


class ClusterAccessError(RuntimeError):
    """The process cannot talk to the cluster as asked; the message says which flag and why."""


@asynccontextmanager
async def api_client(options: ClusterOptions) -> AsyncIterator[client.ApiClient]:
    if options.in_cluster:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError) as exc:
            raise ClusterAccessError(
                f"--in-cluster: this process does not run in a Kubernetes pod ({exc}); outside a "
                "cluster use --kubeconfig FILE"
            ) from None
        api = client.ApiClient(configuration)
    else:
        path = options.kubeconfig
        try:
            await asyncio.to_thread(Path(str(path)).read_bytes)
        except OSError as exc:
            raise ClusterAccessError(f"--kubeconfig {path}: cannot read it: {exc.strerror}") from None
        try:
            api = await config.new_client_from_config(config_file=path)
        except (
            config.ConfigException,
            yaml.YAMLError,
            OSError,
            ValueError,
            TypeError,
            AttributeError,
        ) as exc:
            # kubernetes_asyncio reports a malformed file in several ways; each means the same.
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ClusterAccessError(f"--kubeconfig {path}: not a usable kubeconfig ({first})") from None
    try:
        yield api
    finally:
        await api.close()
