"""Outrider's data plane: the `outrider-proxy` sidecar process and the `outrider-init` rules.

Identity (SPIFFE), the inbound MCP proxy, token exchange, egress control and telemetry.
"""
