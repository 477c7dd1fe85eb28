"""`outrider sidecar` start-up: every failure is one clear line and a non-zero exit, and the secret or
CA files the configuration names are checked at start (log line + /readyz detail), not on first use."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.dev.workload_api import DevWorkloadApi

from .conftest import DOWNSTREAM, free_port


async def _run_sidecar(config: dict[str, Any] | str, tmp_path: Path) -> tuple[int, str]:
    path = tmp_path / "sidecar.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "outrider.webhook.cli", "sidecar", "--config", str(path)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OTEL_SDK_DISABLED": "true"},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), err.decode()


def _local(**sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "inbound": {"host": "127.0.0.1", "port": free_port(), "allow_unauthenticated": True},
        "egress": {"mode": "explicit", "port": free_port(), "policy_file": None},
        "identity": {"socket": "unix:///nonexistent/outrider-test.sock"},
        "telemetry": {"audit": "off"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


async def test_start_up_failures_are_one_line(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases: list[tuple[dict[str, Any] | str, int, str]] = [
        (_local(admin={"port": busy.getsockname()[1]}), 1, "cannot start: admin: "),
        (_local(inbound={"port": busy.getsockname()[1]}), 1, "cannot start: inbound: "),
        (
            _local(telemetry={"audit": "/proc/outrider-no/audit.jsonl"}),
            1,
            "cannot start: telemetry: telemetry.audit",
        ),
        (
            _local(telemetry={"hash_user": True, "hash_salt_file": str(tmp_path / "no-salt")}),
            1,
            "telemetry.hash_salt_file: cannot read",
        ),
        (_local(inbound={"mtls": {"enabeld": True}}), 2, "inbound.mtls: unknown key(s) ['enabeld']"),
        (_local(telemetry={"audit": "syslog"}), 2, "telemetry.audit: 'syslog' is not valid"),
        ("inbound: [", 2, "is not valid YAML"),
    ]
    try:
        for config, code, expected in cases:
            returncode, stderr = await _run_sidecar(config, tmp_path)
            # Log lines (timestamped) may precede it; the failure itself is one plain line.
            problems = [line for line in stderr.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", line)]
            assert returncode == code, (expected, stderr)
            assert "Traceback" not in stderr, stderr
            assert len(problems) == 1 and expected in problems[0], (expected, stderr)
    finally:
        busy.close()
    assert not (Path.cwd() / "syslog").exists()


async def _readyz(session: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status, await response.text()


async def test_unreadable_secret_and_ca_files_show_at_start(
    idp: DevIdP, workload_api: DevWorkloadApi, tmp_path: Path
) -> None:
    secret = tmp_path / "client-secret"
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    config = idp.sidecar_config(
        workload_socket=workload_api.target,
        port=free_port(),
        mcp_port=free_port(),
        resource="https://mcp.example.com/mcp",
        audience=DOWNSTREAM,
    )
    config["exchange"].update(
        {
            "auth": "client-secret",
            "client_id": "weather-mcp",
            "client_secret_file": str(secret),
            "ca_file": str(ca),
        }
    )
    config["admin"] = {"host": "127.0.0.1", "port": free_port()}
    config["egress"] = {"mode": "explicit", "port": free_port(), "policy_file": None}
    config["telemetry"] = {"audit": "off"}
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps(config))
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "outrider.webhook.cli", "sidecar", "--config", str(path)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OTEL_SDK_DISABLED": "true"},
    )
    assert proc.stderr is not None
    log: list[str] = []

    async def read_log() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            log.append(line.decode())

    reader = asyncio.create_task(read_log())
    try:
        async with aiohttp.ClientSession() as session:
            detail = ""
            for _ in range(1500):
                assert proc.returncode is None, "".join(log)
                try:
                    status, detail = await _readyz(session, config["admin"]["port"])
                    if "exchange.ca_file" in detail:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.02)
            assert status == 503
            assert (
                f"exchange.client_secret_file: {secret} cannot be read (No such file or directory)" in detail
            )
            assert f"exchange.ca_file: {ca} holds no PEM CA certificate" in detail
            assert any("exchange.client_secret_file" in line and "ERROR" in line for line in log), log
            # Mounted late (a Secret appearing): the check runs again on each probe.
            secret.write_text("s3cr3t-value\n")
            ca.write_text(_any_ca_pem())
            for _ in range(1500):
                status, detail = await _readyz(session, config["admin"]["port"])
                if status == 200:
                    break
                await asyncio.sleep(0.02)
            assert status == 200, detail
        assert "s3cr3t-value" not in "".join(log)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        reader.cancel()


def _any_ca_pem() -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
