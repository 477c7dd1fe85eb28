"""In-cluster services of the webhook: kube client, namespace cache, self-managed certs, config reload.

`services.cluster_services` composes them; every decision lives in a pure module beside its adapter.
"""
