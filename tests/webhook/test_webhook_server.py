"""The webhook over real TLS: AdmissionReview answers, bad input, metrics, cert hot reload, fuzzing."""

from __future__ import annotations

import base64
import copy
import json
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webhook_support import ThreadedWebhook, load_fixture, review

from outrider.webhook.certs import DEFAULT_DNS_NAMES, write_certs
from outrider.webhook.engine import inject
from outrider.webhook.namespaces import StaticNamespaces

POD, _, _ = load_fixture("multi-init-multi-container")


def _post(server: ThreadedWebhook, document: Any) -> tuple[int, Any]:
    status, body, _ = server.request("POST", "/mutate", json.dumps(document).encode())
    return status, json.loads(body) if status == 200 else body.decode()


def test_mutate_over_verified_tls_returns_a_patch_that_applies(webhook_server: ThreadedWebhook) -> None:
    status, answer = _post(webhook_server, review(POD, uid="abc-123"))
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "abc-123" and response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    patched = jsonpatch.apply_patch(copy.deepcopy(POD), patch)
    assert patched == inject(POD, {"outrider.dev/inject": "enabled"}, webhook_server.holder.current).pod
    assert [c["name"] for c in patched["spec"]["initContainers"]][:2] == ["outrider-init", "outrider-proxy"]


def test_client_with_another_ca_is_refused(webhook_server: ThreadedWebhook, tmp_path: Path) -> None:
    write_certs(tmp_path, DEFAULT_DNS_NAMES)  # a different CA
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection(("127.0.0.1", webhook_server.port)) as raw,
    ):
        context.wrap_socket(raw, server_hostname="localhost")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_below_1_2_is_refused(webhook_server: ThreadedWebhook) -> None:
    context = webhook_server.client_context()
    try:
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", webhook_server.port)) as raw:
        context.wrap_socket(raw, server_hostname="localhost")


@pytest.mark.parametrize(
    ("changes"),
    [
        {"operation": "UPDATE"},
        {"operation": "DELETE"},
        {"kind": "Deployment", "group": "apps"},
        {"kind": "ConfigMap"},
    ],
)
def test_non_pod_or_non_create_is_allowed_without_patch(
    webhook_server: ThreadedWebhook, changes: dict[str, str]
) -> None:
    status, answer = _post(webhook_server, review(POD, **changes))
    assert status == 200
    assert answer["response"] == {"uid": "uid-1", "allowed": True}


def test_subresource_is_allowed_without_patch(webhook_server: ThreadedWebhook) -> None:
    document = review(POD)
    document["request"]["subResource"] = "ephemeralcontainers"
    status, answer = _post(webhook_server, document)
    assert status == 200 and "patch" not in answer["response"] and answer["response"]["allowed"]


def test_dry_run_gets_the_same_answer(webhook_server: ThreadedWebhook) -> None:
    _, normal = _post(webhook_server, review(POD))
    _, dry = _post(webhook_server, review(POD, dry_run=True))
    assert dry == normal


def test_denial_carries_the_engine_message(webhook_server: ThreadedWebhook) -> None:
    pod, _, _ = load_fixture("sidecar-port-clash")
    status, answer = _post(webhook_server, review(pod))
    assert status == 200
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"]["code"] == 403
    assert "15020" in answer["response"]["status"]["message"]


def test_warnings_reach_the_api_server(webhook_server: ThreadedWebhook) -> None:
    pod, _, _ = load_fixture("host-network")
    _, answer = _post(webhook_server, review(pod))
    assert answer["response"]["allowed"] is True and "patch" not in answer["response"]
    assert any("hostNetwork" in w for w in answer["response"]["warnings"])


LONG = b"[" * 200_000 + b"]" * 200_000


@pytest.mark.parametrize(
    ("method", "body", "status", "fragment"),
    [
        ("POST", b"", 400, "empty body"),
        ("POST", b"not json", 400, "not JSON"),
        ("POST", b"\xff\xfe\x00", 400, "not JSON"),
        ("POST", b"[1,2]", 400, "not a JSON object"),
        ("POST", b'{"apiVersion":"v1","kind":"Pod"}', 400, "expected apiVersion"),
        ("POST", b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}', 400, "request"),
        ("POST", b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}', 400, "uid"),
        (
            "POST",
            b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":7}}',
            400,
            "uid",
        ),
        ("POST", LONG[:100_000] + LONG[-100_000:], 400, "nested too deeply"),
        ("POST", b"{" + b'"a":"' + b"x" * 300_000 + b'"}', 413, "exceeded"),
        ("GET", None, 405, "Method Not Allowed"),
        ("PUT", b"{}", 405, "Method Not Allowed"),
    ],
)
def test_bad_input_gets_a_one_line_4xx(
    webhook_server: ThreadedWebhook, method: str, body: bytes | None, status: int, fragment: str
) -> None:
    got, data, _ = webhook_server.request(method, "/mutate", body)
    text = data.decode()
    assert got == status, text
    assert fragment in text
    assert text.strip().count("\n") == 0 and "Traceback" not in text


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda r: r["request"].__setitem__("object", None), "request.object"),
        (lambda r: r["request"].__setitem__("object", "pod"), "request.object"),
        (lambda r: r["request"].__setitem__("kind", "Pod"), "request.kind"),
        (lambda r: r["request"].__setitem__("operation", 1), "request.operation"),
        (lambda r: r["request"].__setitem__("namespace", ["x"]), "request.namespace"),
        (lambda r: r["request"].__setitem__("dryRun", "yes"), "request.dryRun"),
    ],
)
def test_bad_request_with_a_uid_gets_an_admission_answer(
    webhook_server: ThreadedWebhook, mutate: Any, fragment: str
) -> None:
    document = review(POD, uid="u-9")
    mutate(document)
    status, answer = _post(webhook_server, document)
    assert status == 200
    assert answer["response"]["uid"] == "u-9" and answer["response"]["allowed"] is False
    assert answer["response"]["status"]["code"] == 400
    assert fragment in answer["response"]["status"]["message"]


def test_health_readiness_and_metrics(webhook_server: ThreadedWebhook) -> None:
    assert webhook_server.request("GET", "/healthz")[:2] == (200, b"ok\n")
    assert webhook_server.request("GET", "/readyz")[:2] == (200, b"ready\n")
    before = _metric(webhook_server, 'outrider_webhook_admissions_total{outcome="injected"}')
    _post(webhook_server, review(POD))
    _post(webhook_server, review(POD, operation="UPDATE"))
    webhook_server.request("POST", "/mutate", b"nope")
    assert _metric(webhook_server, 'outrider_webhook_admissions_total{outcome="injected"}') == before + 1
    assert _metric(webhook_server, 'outrider_webhook_admissions_total{outcome="ignored"}') >= 1
    assert _metric(webhook_server, 'outrider_webhook_admissions_total{outcome="invalid"}') >= 1
    assert _metric(webhook_server, "outrider_webhook_admission_duration_seconds_count") >= 3


def _metric(server: ThreadedWebhook, name: str) -> float:
    status, body, headers = server.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"metric {name} not found")


def test_strict_namespace_from_namespace_facts(cert_dir: Path) -> None:
    facts = StaticNamespaces(
        namespace_labels={
            "secure": {"outrider.dev/inject": "strict"},
            "tools": {"outrider.dev/inject": "enabled"},
        }
    )
    server = ThreadedWebhook(cert_dir, namespaces=facts)
    try:
        pod, _, _ = load_fixture("opted-out-label")
        _, strict = _post(server, review(pod, namespace="secure"))
        _, enabled = _post(server, review(pod, namespace="tools"))
        _, other = _post(server, review(POD, namespace="elsewhere"))
    finally:
        server.close()
    assert strict["response"]["allowed"] is False and "strict" in strict["response"]["status"]["message"]
    assert enabled["response"]["allowed"] is True and "patch" not in enabled["response"]
    assert other["response"] == {"uid": "uid-1", "allowed": True}  # namespace not opted in


def test_cert_hot_reload_keeps_open_connections(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    write_certs(first, DEFAULT_DNS_NAMES)
    write_certs(second, DEFAULT_DNS_NAMES)  # a new CA, so only the new cert verifies against it
    live = tmp_path / "live"
    live.mkdir()
    for name in ("ca.crt", "tls.crt", "tls.key"):
        (live / name).write_bytes((first / name).read_bytes())
    server = ThreadedWebhook(live)
    try:
        old = server.connection()
        assert server.request("GET", "/healthz", conn=old)[0] == 200
        old_fingerprint = server.store.fingerprint
        (live / "tls.crt").write_bytes((second / "tls.crt").read_bytes())
        assert server.store.reload_if_changed() is False  # half-written pair: keep serving the old one
        assert server.store.fingerprint == old_fingerprint
        (live / "tls.key").write_bytes((second / "tls.key").read_bytes())
        assert server.store.reload_if_changed() is True
        assert server.store.fingerprint != old_fingerprint
        # The established keep-alive connection still works ...
        assert server.request("GET", "/healthz", conn=old)[0] == 200
        assert old.sock is not None
        old.close()
        # ... and new handshakes get the new certificate: the new CA verifies it, the old one does not.
        import http.client

        fresh = http.client.HTTPSConnection(
            "localhost", server.port, context=server.client_context(second / "ca.crt")
        )
        assert server.request("GET", "/healthz", conn=fresh)[0] == 200
        fresh.close()
        stale = http.client.HTTPSConnection(
            "localhost", server.port, context=server.client_context(first / "ca.crt")
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            server.request("GET", "/healthz", conn=stale)
    finally:
        server.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_arbitrary_bodies_never_5xx(webhook_server: ThreadedWebhook, body: bytes) -> None:
    status, data, _ = webhook_server.request("POST", "/mutate", body)
    assert status < 500
    assert b"Traceback" not in data
    if status == 200:
        assert json.loads(data)["kind"] == "AdmissionReview"
    assert webhook_server.request("GET", "/healthz")[0] == 200  # and it stays healthy


FIELDS = st.sampled_from(["uid", "kind", "operation", "namespace", "object", "dryRun", "subResource"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=FIELDS, value=json_values, where=st.sampled_from(["request", "object", "spec", "container"]))
def test_fuzz_mutated_reviews_never_5xx(
    webhook_server: ThreadedWebhook, field: str, value: Any, where: str
) -> None:
    document = review(copy.deepcopy(POD))
    target = {
        "request": document["request"],
        "object": document["request"]["object"],
        "spec": document["request"]["object"]["spec"],
        "container": document["request"]["object"]["spec"]["containers"][0],
    }[where]
    key = (
        field
        if where == "request"
        else {
            "uid": "metadata",
            "kind": "ports",
            "operation": "securityContext",
            "namespace": "annotations",
            "object": "livenessProbe",
            "dryRun": "env",
            "subResource": "volumes",
        }[field]
    )
    target[key] = value
    status, data, _ = webhook_server.request("POST", "/mutate", json.dumps(document).encode())
    assert status < 500 and b"Traceback" not in data
    if status == 200:
        response = json.loads(data)["response"]
        assert response["allowed"] in (True, False)
        if "patch" in response:
            jsonpatch.apply_patch(
                document["request"]["object"], json.loads(base64.b64decode(response["patch"]))
            )
    assert webhook_server.request("GET", "/healthz")[0] == 200


def test_cached_answers_follow_uid_and_config(cert_dir: Path) -> None:
    server = ThreadedWebhook(cert_dir)
    try:
        _, first = _post(server, review(POD, uid="a"))
        _, second = _post(server, review(POD, uid="b"))
        assert first["response"]["uid"] == "a" and second["response"]["uid"] == "b"
        assert {**first["response"], "uid": "b"} == second["response"]
        # A new config (ConfigMap update) must not be answered from the old config's cache entries.
        from outrider.webhook.config import parse_config

        server.holder.replace(parse_config({"sidecar_image": "registry.example/outrider:new"}))
        _, third = _post(server, review(POD, uid="c"))
        patch = json.loads(base64.b64decode(third["response"]["patch"]))
        assert "registry.example/outrider:new" in json.dumps(patch)
        assert "registry.example/outrider:new" not in json.dumps(
            json.loads(base64.b64decode(first["response"]["patch"]))
        )
    finally:
        server.close()


async def test_readyz_needs_a_certificate_and_every_ready_check() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from outrider.webhook.config import ConfigHolder
    from outrider.webhook.server import READY_CHECKS, build_app
    from outrider.webhook.tls import CertStore

    store = CertStore()  # nothing loaded yet (self-managed certs still being agreed)
    app = build_app(ConfigHolder(), store)
    ready = {"cluster": False}
    app[READY_CHECKS].append(lambda: ready["cluster"])
    async with TestClient(TestServer(app)) as http:
        assert (await http.get("/readyz")).status == 503
        assert (await http.get("/healthz")).status == 200
        certs = Path(tempfile.mkdtemp())
        write_certs(certs, DEFAULT_DNS_NAMES)
        store.load_files(certs / "tls.crt", certs / "tls.key")
        assert (await http.get("/readyz")).status == 503
        ready["cluster"] = True
        response = await http.get("/readyz")
        assert response.status == 200 and await response.text() == "ready\n"
