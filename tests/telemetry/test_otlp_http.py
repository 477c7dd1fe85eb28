"""The lean paths' own OTLP/HTTP client and OTEL_* reading, held to the SDK's exporter and SDK settings.

Settings are compared with what the SDK's OTLPSpanExporter / OTLPMetricExporter, Resource.create,
the default sampler and BatchSpanProcessor make of the same environment; the client posts to a real
local receiver (plain HTTP and TLS with a CA and client certificates made here).
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import logging
import os
import ssl
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from outrider.sidecar.telemetry import otel_env
from outrider.sidecar.telemetry.otlp_http import (
    USER_AGENT,
    ExporterSettings,
    OtlpHttpClient,
    parse_headers,
    retry_after_s,
)
from outrider.sidecar.telemetry.span_export import BatchSettings
from outrider.sidecar.telemetry.spans import sampler_plan

from .otlp_receiver import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-live-0123456789abcdef"  # a header value standing for an API key: never in a log

_OTEL = [name for name in os.environ if name.startswith("OTEL_")]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _OTEL:
        monkeypatch.delenv(name, raising=False)


def _set(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# --- settings, against the SDK exporters ---

ENVS: list[dict[str, str]] = [
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://gateway.example/otlp/"},
    {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:9999/custom/path",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics:9999",
    },
    {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": f"api-key={SECRET},X-Scope-OrgID=tenant%201, Empty= ,bad entry",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "authorization=Bearer%20abc,x-liberal=a b",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "soon",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": " Deflate ",
    },
    {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "brotli",
        "OTEL_EXPORTER_OTLP_HEADERS": "content-encoding=identity,User-Agent=mine",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "",  # empty: the generic one applies
    },
]


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("signal", ["traces", "metrics"])
def test_settings_are_those_of_the_sdk_exporter(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], signal: str
) -> None:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    _set(monkeypatch, env)
    sdk = OTLPSpanExporter() if signal == "traces" else OTLPMetricExporter()
    ours = ExporterSettings.from_env(signal, env)  # type: ignore[arg-type]
    client = sdk._client
    assert ours.endpoint == sdk._endpoint
    assert ours.timeout_s == client._timeout
    assert ours.compression == client._compression.value
    expected = {k.lower(): v for k, v in client._headers.items()}
    headers = dict(ours.headers)
    sdk_agent, our_agent = expected.pop("user-agent"), headers.pop("user-agent")
    if our_agent == USER_AGENT:
        assert sdk_agent.startswith("OTel-OTLP-Exporter-Python/")
    else:
        assert our_agent == sdk_agent  # set by *_HEADERS on both sides
    assert headers == expected
    sdk.shutdown()


def test_tls_files_follow_the_per_signal_then_generic_rule() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca.pem",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/traces-ca.pem",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/client.pem",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/client.key",
    }
    traces, metrics = ExporterSettings.from_env("traces", env), ExporterSettings.from_env("metrics", env)
    assert (traces.certificate, traces.client_certificate, traces.client_key) == (
        "/traces-ca.pem",
        "/client.pem",
        "/client.key",
    )
    assert metrics.certificate == "/ca.pem"
    # A key without a certificate is ignored, as the SDK's transport ignores it.
    alone = ExporterSettings.from_env("traces", {"OTEL_EXPORTER_OTLP_CLIENT_KEY": "/k"})
    assert alone.client_key is None and alone.certificate is None


def test_header_values_never_reach_a_log_or_a_repr(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    text = f"good={SECRET},broken {SECRET},split={SECRET}%0D%0Ainjected:1,=x"
    headers = parse_headers(text, "OTEL_EXPORTER_OTLP_HEADERS")
    assert headers == {"good": SECRET}  # the CR/LF one could never be sent: dropped
    settings = ExporterSettings.from_env("traces", {"OTEL_EXPORTER_OTLP_HEADERS": text})
    assert SECRET not in repr(settings)
    assert len(caplog.records) >= 3
    assert SECRET not in caplog.text and "injected" not in caplog.text


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    assert retry_after_s("3") == 3.0
    assert retry_after_s("-1") == 0.0
    assert retry_after_s("nan") is None and retry_after_s("soon") is None and retry_after_s(None) is None
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30)
    delay = retry_after_s(later.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    assert delay is not None and 25 < delay <= 30


# --- the SDK settings the lean paths read themselves ---

RESOURCE_ENVS: list[dict[str, str]] = [
    {},
    {"OTEL_SERVICE_NAME": "from-env"},
    {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod, team = a%20b ,broken,k8s.pod.name=env-pod"},
    {
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=attr,service.instance.id=fixed,=empty",
        "OTEL_SERVICE_NAME": "x",
    },
    {"OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=fixed", "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "otel"},
    {
        "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=fixed",
        "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "otel, service_instance",
    },
]


@pytest.mark.parametrize("env", RESOURCE_ENVS)
@pytest.mark.parametrize("service_name", [True, False])
def test_resource_attributes_are_those_of_resource_create(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], service_name: bool
) -> None:
    from opentelemetry.sdk import resources

    _set(monkeypatch, env)
    attributes = {"service.name": "outrider-proxy"} if service_name else {}
    attributes["k8s.namespace.name"] = "tools"
    ours = otel_env.resource_attributes(attributes, env)
    assert ours is not None
    # One service.instance.id per process on both sides: give the SDK ours.
    monkeypatch.setattr(resources, "_service_instance_id", otel_env._service_instance_id())
    monkeypatch.setattr(resources, "_service_instance_id_pid", os.getpid())
    sdk = resources.Resource.create(dict(attributes)).attributes
    assert list(ours.items()) == list(sdk.items())  # the same attributes, in the same order


def test_an_sdk_only_resource_detector_is_left_to_the_sdk() -> None:
    assert otel_env.resource_attributes({}, {"OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "process"}) is None
    attributes = otel_env.sdk_resource_attributes({"service.name": "s"})
    assert attributes["service.name"] == "s"


def test_the_sdk_version_is_read_without_importing_the_sdk() -> None:
    from opentelemetry.sdk.version import __version__

    assert otel_env.sdk_version() == __version__


SAMPLER_ENVS: list[dict[str, str]] = [
    {},
    {"OTEL_TRACES_SAMPLER": "always_on"},
    {"OTEL_TRACES_SAMPLER": "ALWAYS_OFF"},
    {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
    {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"},
    {"OTEL_TRACES_SAMPLER": "traceidratio"},
    {"OTEL_TRACES_SAMPLER": "jaeger_remote"},
]


@pytest.mark.parametrize("env", SAMPLER_ENVS)
def test_the_sampler_is_the_one_the_sdk_builds(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    from opentelemetry.sdk.trace import sampling

    _set(monkeypatch, env)
    assert otel_env.sampler_from_env(env) == sampler_plan(sampling._get_from_env_or_default())


@pytest.mark.parametrize(
    "env",
    [
        {},
        {
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        },
        {"OTEL_BSP_MAX_QUEUE_SIZE": "many"},
        {"OTEL_BSP_MAX_QUEUE_SIZE": "10"},
        {"OTEL_BSP_SCHEDULE_DELAY": "0"},
        {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "-1"},
    ],
)
def test_batch_settings_are_those_of_the_batch_span_processor(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    _set(monkeypatch, env)
    try:
        sdk = BatchSpanProcessor(SpanExporter())
    except ValueError as refused:
        with pytest.raises(ValueError, match=str(refused)):
            BatchSettings.from_env(env)
        return
    processor = sdk._batch_processor
    expected = BatchSettings(
        processor._max_queue_size, processor._max_export_batch_size, processor._schedule_delay_millis / 1000
    )
    sdk.shutdown()
    assert BatchSettings.from_env(env) == expected


# --- the client against a real receiver ---


@dataclass
class Seen:
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    peer_certs: list[Any] = field(default_factory=list)
    replies: list[tuple[int, dict[str, str]]] = field(default_factory=list)  # then 200


@asynccontextmanager
async def receiver(tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[str, Seen]]:
    """Any POST is recorded raw (compressed bodies stay compressed) and answered from `replies`."""
    seen = Seen()

    async def handle(request: web.Request) -> web.Response:
        seen.paths.append(request.path_qs)
        seen.headers.append({k.lower(): v for k, v in request.headers.items()})
        seen.bodies.append(await request.read())
        if request.transport is not None:
            seen.peer_certs.append(request.transport.get_extra_info("peercert"))
        status, headers = seen.replies.pop(0) if seen.replies else (200, {})
        return web.Response(status=status, headers=headers, body=b"")

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handle)
    runner = web.AppRunner(app, auto_decompress=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def _export(env: dict[str, str], signal: str = "traces", data: bytes = b"\x0a\x00payload") -> bool:
    client = OtlpHttpClient(ExporterSettings.from_env(signal, env))  # type: ignore[arg-type]
    try:
        return await asyncio.to_thread(client.export, data)
    finally:
        client.shutdown()


async def test_endpoint_headers_and_compression_take_effect() -> None:
    data = b"\x0a\x03abc" * 100
    async with receiver() as (url, seen):
        base = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": url + "/base/",
            "OTEL_EXPORTER_OTLP_HEADERS": f"api-key={SECRET}",
        }
        assert await _export({**base, "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, "traces", data)
        assert await _export({**base, "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION": "deflate"}, "metrics", data)
        custom = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": url + "/custom?tenant=1"}
        assert await _export(custom, "traces", data)
    assert seen.paths == ["/base/v1/traces", "/base/v1/metrics", "/custom?tenant=1"]
    assert gzip.decompress(seen.bodies[0]) == data and seen.headers[0]["content-encoding"] == "gzip"
    assert zlib.decompress(seen.bodies[1]) == data and seen.headers[1]["content-encoding"] == "deflate"
    assert seen.bodies[2] == data and "content-encoding" not in seen.headers[2]
    for headers in seen.headers:
        assert headers["api-key"] == SECRET
        assert headers["content-type"] == "application/x-protobuf"
        assert headers["user-agent"] == USER_AGENT
    # One connection per client, kept open across retries and exports (nothing more is asserted here).


async def test_retryable_statuses_are_retried_and_others_are_not(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with receiver() as (url, seen):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_EXPORTER_OTLP_HEADERS": f"api-key={SECRET}"}
        seen.replies = [(503, {"Retry-After": "0"}), (429, {"Retry-After": "0"}), (502, {"Retry-After": "0"})]
        assert await _export(env)  # three retryable answers, then 200
        assert len(seen.bodies) == 4
        seen.replies = [(400, {})]
        assert not await _export(env)  # not retryable: one request only
        assert len(seen.bodies) == 5
        seen.replies = [(503, {"Retry-After": "30"})]
        assert not await _export({**env, "OTEL_EXPORTER_OTLP_TIMEOUT": "2"})  # the wait exceeds the timeout
        assert len(seen.bodies) == 6
    assert SECRET not in caplog.text


@pytest.mark.parametrize("status", [301, 307])
async def test_a_redirect_is_a_failure_not_followed_nor_retried(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Only 2xx accepts (the OTLP spec: success is 200); a redirect used to count as accepted, so the
    data was lost while the exporter reported it sent. Not in the retryable set, so not retried, and
    not followed: the operator is told to fix the endpoint."""
    caplog.set_level(logging.DEBUG)
    async with receiver() as (url, seen):
        seen.replies = [(status, {"Location": f"{url}/elsewhere/v1/traces?token={SECRET}"})]
        assert not await _export({"OTEL_EXPORTER_OTLP_ENDPOINT": url})
        assert seen.paths == ["/v1/traces"]  # one request; the Location was not followed
        assert await _export({"OTEL_EXPORTER_OTLP_ENDPOINT": url})  # the next 200 is accepted
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and f"HTTP {status}" in failures[0].getMessage()
    assert "redirect" in failures[0].getMessage()
    assert SECRET not in caplog.text


async def test_an_unreachable_receiver_fails_within_the_timeout() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "0.5",
    }
    assert not await asyncio.wait_for(_export(env), timeout=10)


async def test_a_request_over_the_size_limit_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    from outrider.sidecar.telemetry import otlp_http

    monkeypatch.setattr(otlp_http, "MAX_REQUEST_BYTES", 10)
    async with receiver() as (url, seen):
        assert not await _export({"OTEL_EXPORTER_OTLP_ENDPOINT": url}, data=b"x" * 11)
        assert await _export({"OTEL_EXPORTER_OTLP_ENDPOINT": url}, data=b"x" * 10)
    assert len(seen.bodies) == 1


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    **kind: Any,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signer = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if kind.get("server"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    d = tmp_path_factory.mktemp("otlp-pki")
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test ca", ca_key, None)
    other = _issue("other ca", other_key, None)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _issue("receiver", server_key, (ca.subject, ca_key), server=True)
    client = _issue("outrider-proxy", client_key, (ca.subject, ca_key))
    files = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "other-ca.pem": other.public_bytes(serialization.Encoding.PEM),
        "server.pem": server.public_bytes(serialization.Encoding.PEM),
        "server.key": _key_pem(server_key),
        "client.pem": client.public_bytes(serialization.Encoding.PEM),
        "client.key": _key_pem(client_key),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    yield Pki(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "other-ca.pem",
    )


def _server_context(pki: Pki, *, client_certs: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if client_certs:
        context.load_verify_locations(pki.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def test_tls_certificate_settings_take_effect(pki: Pki) -> None:
    timeout = {"OTEL_EXPORTER_OTLP_TIMEOUT": "0.5"}
    async with receiver(_server_context(pki, client_certs=False)) as (url, seen):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": url, **timeout}
        assert not await _export(env)  # the receiver's CA is not among the system's
        assert not await _export({**env, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.other_ca)})
        assert await _export({**env, "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca)})
        assert await _export({**env, "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(pki.ca)})
        assert not await _export({**env, "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE": str(pki.ca)})
    assert len(seen.bodies) == 2


async def test_client_certificate_settings_take_effect(pki: Pki) -> None:
    async with receiver(_server_context(pki, client_certs=True)) as (url, seen):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": url,
            "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
            "OTEL_EXPORTER_OTLP_TIMEOUT": "0.5",
        }
        assert not await _export(env)  # the receiver asks for a client certificate
        mtls = {
            **env,
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki.client_cert),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki.client_key),
        }
        assert await _export(mtls)
    assert len(seen.bodies) == 1
    subject = dict(item[0] for item in seen.peer_certs[0]["subject"])
    assert subject["commonName"] == "outrider-proxy"


# --- the whole sidecar telemetry component, in a fresh interpreter ---

_COMPONENT = """
import asyncio, json, sys
from aiohttp import web
from outrider.sidecar.config import parse
from outrider.sidecar.inbound.jsonrpc import McpMessage
from outrider.sidecar.runtime import Runtime
from outrider.sidecar.telemetry import component as telemetry
from outrider.sidecar.telemetry.observer import RequestInfo

async def main(port, audit):
    posts = []

    async def handle(request):
        posts.append(request.path)
        await request.read()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    runtime = Runtime(config=parse({"pod": {"name": "p", "namespace": "n"}, "telemetry": {"audit": audit}}))
    async with telemetry.component(runtime):
        message = McpMessage(kind="request", method="tools/call", id=1, tool_name="echo")
        with runtime.observer.mcp_call(message, RequestInfo("POST", "stateless")) as scope:
            scope.finish(http_status=200, outcome="ok")
        runtime.metrics[-1]()  # a /metrics scrape
    await runner.cleanup()
    loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter",
        "opentelemetry.proto", "google", "urllib3", "requests", "grpc")))
    print(json.dumps({"posts": sorted(posts), "loaded": loaded}))

asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
"""


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_the_lean_sidecar_telemetry_loads_no_sdk_exporter_or_protobuf(tmp_path: Path, protocol: str) -> None:
    """The telemetry component with OTLP/HTTP export and an audit file, a call, a scrape and the
    shutdown's export: not one module of the SDK, its exporters, protobuf or urllib3 was imported.
    (With gRPC, the SDK fallback, they are: the check can see them.)"""
    import json

    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", _COMPONENT, str(port), str(tmp_path / "audit.jsonl")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if protocol == "http/protobuf":
        assert result["loaded"] == []
        assert result["posts"] == ["/v1/metrics", "/v1/traces"]  # the shutdown exported both
    else:
        assert any(m.startswith("opentelemetry.sdk") for m in result["loaded"])
        assert any(m.startswith("google") for m in result["loaded"])
    assert (tmp_path / "audit.jsonl").read_text().count('"mcp.call"') == 1
