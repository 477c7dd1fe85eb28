"""What the sidecar loads is what its configuration uses (issue 14: idle RSS).

Each check runs a fresh interpreter (this test process has imported everything already) and looks
at `sys.modules` after the imports and start-up steps of one configuration.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from outrider.sidecar.dev.workload_api import DevWorkloadApi

ROOT = Path(__file__).resolve().parent.parent

# Never in the sidecar unless the configuration asks for them (see the comments below).
HEAVY = (
    "grpc",
    "cedarpy",
    "limits",
    "redis",
    "dns",
    "prometheus_client",
    "kubernetes_asyncio",
    "requests",
    "google",  # protobuf: the Workload API messages have their own codec (identity/workload_messages.py)
    "spiffe",
    "mcp",
    "pydantic",
    "jsonschema",
)


def _loaded(code: str, env: dict[str, str] | None = None) -> set[str]:
    program = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True, env=env
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_sidecar_module_loads_no_optional_library() -> None:
    loaded = _loaded("import outrider.sidecar.main")
    assert loaded.isdisjoint(HEAVY), loaded & set(HEAVY)
    assert "opentelemetry" not in loaded  # telemetry loads it only when it is on
    assert "yaml" not in loaded  # only a config or egress policy file needs PyYAML (JSON from the pod)
    assert "h2" in loaded  # the Workload API client


def test_policies_load_cedar_and_limits_only_when_configured() -> None:
    code = """
from outrider.sidecar.policy.config import PolicyConfig
from outrider.sidecar.policy.gate import Gate
from outrider.sidecar.policy.model import Server
gate = Gate.from_config(PolicyConfig.from_mapping({}), lambda: Server("s"))
assert not gate.active
"""
    assert _loaded(code).isdisjoint({"cedarpy", "limits", "redis"})
    with_policy = code.replace(
        "PolicyConfig.from_mapping({})",
        "PolicyConfig.from_mapping({'cedar': 'permit(principal, action, resource);', "
        "'rate_limits': {'per_user': '10/minute'}})",
    ).replace("assert not gate.active", "assert gate.active")
    assert {"cedarpy", "limits"} <= _loaded(with_policy)


def test_otlp_http_export_does_not_load_requests_grpc_protobuf_or_urllib3() -> None:
    code = """
from outrider.sidecar.telemetry.setup import build_providers
providers = build_providers("outrider-proxy")
assert providers.plan.traces == "http/protobuf" and providers.plan.metrics == "http/protobuf"
providers.shutdown()
"""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    loaded = _loaded(code, env)
    assert "opentelemetry" in loaded
    # The lean paths post with their own client: no protobuf, no urllib3 (test_otlp_http.py checks
    # the SDK's and the exporters' modules one by one).
    assert loaded.isdisjoint({"requests", "grpc", "prometheus_client", "google", "urllib3"}), loaded


def test_tls_files_are_read_as_the_sdk_reads_them() -> None:
    from outrider.sidecar.telemetry.setup import tls_files

    assert tls_files("traces", {}) == (True, None)
    env = {
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca.pem",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/traces-ca.pem",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/client.pem",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/client.key",
    }
    assert tls_files("traces", env) == ("/traces-ca.pem", ("/client.pem", "/client.key"))
    assert tls_files("metrics", env) == ("/ca.pem", ("/client.pem", "/client.key"))
    assert tls_files("metrics", {"OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE": "/c.pem"}) == (
        True,
        "/c.pem",
    )


def test_the_workload_api_client_runs_without_protobuf() -> None:
    """Start the identity against the dev Workload API (grpcio serving the generated messages) in a
    process that never imports protobuf itself: an X.509-SVID, a JWT-SVID and the JWT bundles arrive."""
    code = """
import asyncio, sys, tempfile
from pathlib import Path
from outrider.sidecar.identity.config import IdentityConfig
from outrider.sidecar.identity.workload import WorkloadApiIdentity

async def main(sock):
    identity = WorkloadApiIdentity(IdentityConfig(socket="unix://" + sock))
    async with identity:
        assert await identity.wait_ready(20), identity.status
        assert identity.x509().spiffe_id == "spiffe://example.org/ns/a/sa/b"
        assert (await identity.jwt_svid("aud-1")).count(".") == 2
        assert "example.org" in await identity.jwt_bundles()
    assert "google" not in {m.split(".")[0] for m in sys.modules}, "protobuf was imported"

asyncio.run(main(sys.argv[1]))
"""

    async def serve_and_check(sock: Path) -> subprocess.CompletedProcess[str]:
        async with DevWorkloadApi(sock, spiffe_id="spiffe://example.org/ns/a/sa/b"):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                code,
                str(sock),
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await process.communicate()
            return subprocess.CompletedProcess([], process.returncode or 0, out.decode(), err.decode())

    with tempfile.TemporaryDirectory(prefix="outrider-footprint-") as tmp:
        done = asyncio.run(serve_and_check(Path(tmp) / "agent.sock"))
    assert done.returncode == 0, done.stderr[-2000:]
