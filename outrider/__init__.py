"""Outrider: a sidecar and an admission webhook that secure MCP servers on Kubernetes.

The code lives in the repository's top-level `sidecar/` and `webhook/` folders; this package is the one
import namespace they are installed under (`outrider.sidecar`, `outrider.webhook`), so that generic
names such as PyPI's own `sidecar` package never collide with them. In the repository the two
sub-packages are symlinks to those folders; a built wheel holds real copies.
"""
