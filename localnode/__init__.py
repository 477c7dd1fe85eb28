"""A real one-node Kubernetes on this machine (`make node`): upstream parts, cached builds, clean teardown.

`python -m localnode up|down|status`; see docs/node.md for what it changes on the host and how it undoes it.
"""
