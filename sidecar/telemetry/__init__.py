"""Telemetry and audit: OpenTelemetry spans and metrics, Prometheus text, the JSON audit log."""
