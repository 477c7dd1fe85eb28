"""The `outrider certs`, `outrider inject` and `outrider webhook` commands as a user runs them."""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webhook_support import GOLDEN_DIR

OUTRIDER = [sys.executable, "-m", "outrider.webhook.cli"]


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OUTRIDER, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_certs_writes_ca_and_serving_cert_with_private_keys(tmp_path: Path) -> None:
    result = _run("certs", "--out", str(tmp_path), "--dns-name", "webhook.example.test")
    assert result.returncode == 0, result.stderr
    for name in ("ca.crt", "tls.crt", "tls.key", "ca.key"):
        assert (tmp_path / name).exists()
    for key in ("tls.key", "ca.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((tmp_path / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "outrider-webhook.outrider-system.svc" in sans.get_values_for_type(x509.DNSName)
    assert "webhook.example.test" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    # A second run reuses the CA, so clients that trust it keep working.
    ca_before = (tmp_path / "ca.crt").read_bytes()
    assert _run("certs", "--out", str(tmp_path)).returncode == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca_before


def test_inject_multi_document_stdin() -> None:
    docs = "\n---\n".join(
        (GOLDEN_DIR / f"{n}.yaml").read_text() for n in ("deployment", "cronjob", "host-network")
    )
    docs += "\n---\napiVersion: v1\nkind: Service\nmetadata: {name: svc}\nspec: {ports: [{port: 80}]}\n---\n"
    result = _run("inject", "-f", "-", stdin=docs)
    assert result.returncode == 0, result.stderr
    out = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in out] == ["Deployment", "CronJob", "Pod", "Service"]
    assert out[0]["spec"]["template"]["spec"]["initContainers"][1]["name"] == "outrider-proxy"
    cron_pod = out[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cron_pod["initContainers"][0]["name"] == "outrider-init"
    assert "initContainers" not in out[2]["spec"]  # hostNetwork: skipped
    assert out[3] == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "svc"},
        "spec": {"ports": [{"port": 80}]},
    }
    assert "warning: Pod/hostnet-mcp: spec.hostNetwork is true" in result.stderr


def test_inject_refusal_and_bad_yaml_are_clear(tmp_path: Path) -> None:
    strict = _run(
        "inject",
        "-f",
        str(GOLDEN_DIR / "opted-out-strict.yaml"),
        "--namespace-labels",
        "outrider.dev/inject=strict",
    )
    assert strict.returncode == 1
    assert "error: Pod/legacy-mcp: metadata.annotations[outrider.dev/inject]" in strict.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Pod\n  spec: [\n")
    result = _run("inject", "-f", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad} document 1 is not valid YAML")
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    missing = _run("inject", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_inject_prints_nothing_for_a_refused_workload() -> None:
    """`outrider inject -f x.yaml | kubectl apply -f -` must never apply a pod without its sidecar."""
    refused = (GOLDEN_DIR / "opted-out-strict.yaml").read_text()
    result = _run("inject", "-f", "-", "--namespace-labels", "outrider.dev/inject=strict", stdin=refused)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "error: Pod/legacy-mcp: metadata.annotations[outrider.dev/inject]" in result.stderr
    assert "error: Pod/legacy-mcp: refused, so it is left out of the output" in result.stderr


def test_inject_multi_document_with_one_refused_prints_the_others() -> None:
    service = (
        "# the Service keeps its comments\napiVersion: v1\nkind: Service\nmetadata: {name: svc}  # inline\n"
    )
    docs = "---\n".join(
        [
            (GOLDEN_DIR / "strict-hardened-deployment.yaml").read_text(),
            (GOLDEN_DIR / "strict-escapes.yaml").read_text(),
            service,
        ]
    )
    result = _run("inject", "-f", "-", "--namespace-labels", "outrider.dev/inject=strict", stdin=docs)
    assert result.returncode == 1, result.stderr
    out = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [d["kind"] for d in out] == ["Deployment", "Service"]
    assert "error: Pod/" in result.stderr and "refused, so it is left out of the output" in result.stderr
    assert result.stdout.endswith(service)  # passed through byte for byte, comments and all


def test_inject_list_drops_only_the_refused_items() -> None:
    items = [
        yaml.safe_load((GOLDEN_DIR / "strict-clean.yaml").read_text()),
        yaml.safe_load((GOLDEN_DIR / "opted-out-strict.yaml").read_text()),
    ]
    document = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items})
    result = _run("inject", "-f", "-", "--namespace-labels", "outrider.dev/inject=strict", stdin=document)
    assert result.returncode == 1
    [listing] = list(yaml.safe_load_all(result.stdout))
    assert [i["metadata"]["name"] for i in listing["items"]] == [items[0]["metadata"]["name"]]
    assert "outrider.dev/status" in listing["items"][0]["metadata"]["annotations"]
    assert "the refused items are left out of the output" in result.stderr


def test_inject_namespace_annotations_and_other_meshes() -> None:
    pod = (GOLDEN_DIR / "simple-pod.yaml").read_text()
    warned = _run("inject", "-f", "-", "--namespace-annotations", "linkerd.io/inject=enabled", stdin=pod)
    assert warned.returncode == 0 and warned.stdout == pod  # left alone, byte for byte
    assert "warning: Pod/weather-mcp: the namespace annotation linkerd.io/inject: enabled" in warned.stderr
    refused = _run(
        "inject",
        "-f",
        "-",
        "--namespace-labels",
        "outrider.dev/inject=strict,istio.io/rev=stable",
        stdin=pod,
    )
    assert refused.returncode == 1 and refused.stdout == ""
    assert "namespace label istio.io/rev=stable" in refused.stderr
    bad = _run("inject", "-f", "-", "--namespace-annotations", "nonsense", stdin=pod)
    assert bad.returncode == 2 and "--namespace-annotations: 'nonsense' is not key=value" in bad.stderr


def test_inject_reads_like_kubectl_and_refuses_what_kubectl_cannot_read() -> None:
    pod = (GOLDEN_DIR / "simple-pod.yaml").read_text()
    separator = _run("inject", "-f", "-", stdin=pod + "--- {kind: Pod}\n")
    assert separator.returncode == 2 and separator.stdout == ""
    assert "kubectl allows only a comment after a --- document separator" in separator.stderr
    nan = _run("inject", "-f", "-", stdin=pod + "---\nkind: ConfigMap\ndata: {x: .nan}\n")
    assert nan.returncode == 2 and nan.stdout == ""
    assert "document 2 cannot be read by kubectl" in nan.stderr and ".nan" in nan.stderr
    # `yes` unquoted is a boolean to kubectl: the output keeps it a boolean, "yes" stays a string
    text = pod.replace(
        "app: weather-mcp", "app: weather-mcp\n    enabled: yes\n    quoted: 'yes'\n    zip: 012"
    )
    result = _run("inject", "-f", "-", stdin=text)
    assert result.returncode == 0, result.stderr
    assert (
        "enabled: true" in result.stdout and "quoted: 'yes'" in result.stdout and "zip: 10" in result.stdout
    )


def test_inject_with_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("native_sidecar: false\nsidecar_image: registry.example/outrider:dev\n")
    result = _run("inject", "-f", str(GOLDEN_DIR / "simple-pod.yaml"), "--config", str(config))
    assert result.returncode == 0, result.stderr
    pod = yaml.safe_load(result.stdout)
    assert pod["spec"]["containers"][-1]["name"] == "outrider-proxy"
    assert pod["spec"]["containers"][-1]["image"] == "registry.example/outrider:dev"
    config.write_text("native_sidecar: maybe\n")
    bad = _run("inject", "-f", str(GOLDEN_DIR / "simple-pod.yaml"), "--config", str(config))
    assert bad.returncode == 2 and "native_sidecar" in bad.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_webhook(cert_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """`outrider webhook` on a free loopback port with the certs in `cert_dir` (output on stdout)."""
    port = _free_port()
    command = [*OUTRIDER, "webhook", "--tls-cert", str(cert_dir / "tls.crt")]
    command += ["--tls-key", str(cert_dir / "tls.key"), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


def test_webhook_command_serves_tls_and_stops_on_sigterm(tmp_path: Path) -> None:
    assert _run("certs", "--out", str(tmp_path)).returncode == 0
    proc, port = _start_webhook(tmp_path)
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=5)
                conn.request("GET", "/readyz")
                response = conn.getresponse()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "webhook did not come up"
                time.sleep(0.2)
        assert response.status == 200 and response.read() == b"ready\n"
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "listening on https://127.0.0.1" in output and "shutting down" in output


def test_webhook_command_rejects_bad_flags(tmp_path: Path) -> None:
    missing = _run("webhook", "--port", "0")
    assert missing.returncode == 2 and "--tls-cert and --tls-key are required" in missing.stderr
    half = _run("webhook", "--tls-cert", "x")
    assert half.returncode == 2 and "both --tls-cert and --tls-key" in half.stderr
    cm = _run("webhook", "--tls-cert", "x", "--tls-key", "y", "--config-map", "c")
    assert cm.returncode == 2 and "--config-map needs a cluster" in cm.stderr
    unreadable = _run("webhook", "--tls-cert", str(tmp_path / "a"), "--tls-key", str(tmp_path / "b"))
    assert unreadable.returncode == 2 and "cannot read" in unreadable.stderr


def test_webhook_command_picks_up_rotated_cert_files(tmp_path: Path) -> None:
    live, rotated = tmp_path / "live", tmp_path / "rotated"
    assert _run("certs", "--out", str(live)).returncode == 0
    assert _run("certs", "--out", str(rotated)).returncode == 0  # another CA
    proc, port = _start_webhook(live, "--reload-interval", "0.2")

    def healthz(ca: Path) -> int:
        conn = http.client.HTTPSConnection(
            "localhost", port, context=ssl.create_default_context(cafile=str(ca)), timeout=5
        )
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert healthz(live / "ca.crt") == 200
                break
            except (OSError, ssl.SSLError):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        # Rotate like cert-manager does (the two files land one after the other).
        (live / "tls.key").write_bytes((rotated / "tls.key").read_bytes())
        (live / "tls.crt").write_bytes((rotated / "tls.crt").read_bytes())
        deadline = time.monotonic() + 30
        while True:
            try:
                assert healthz(rotated / "ca.crt") == 200
                break
            except ssl.SSLCertVerificationError:
                assert proc.poll() is None and time.monotonic() < deadline, "new certificate never served"
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert output.count("serving certificate loaded") == 2


def test_webhook_command_applies_config_file_edits(tmp_path: Path) -> None:
    import base64
    import json

    from webhook_support import load_fixture, review

    assert _run("certs", "--out", str(tmp_path)).returncode == 0
    config = tmp_path / "config.yaml"
    config.write_text("sidecar_image: registry.example/outrider:one\n")
    proc, port = _start_webhook(tmp_path, "--config", str(config), "--reload-interval", "0.2")
    pod, _, _ = load_fixture("simple-pod")
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    lines: list[str] = []
    import threading

    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()

    def image() -> str:
        conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=5)
        try:
            conn.request(
                "POST", "/mutate", body=json.dumps(review(pod)), headers={"Content-Type": "application/json"}
            )
            answer = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        patch = json.loads(base64.b64decode(answer["response"]["patch"]))
        return (
            str(patch[-1]["value"][0]["image"])
            if patch[-1]["path"] == "/spec/initContainers"
            else json.dumps(patch)
        )

    def wait_for(expected: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                if expected in image():
                    return
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, f"never saw {expected}"
            time.sleep(0.2)

    try:
        wait_for("registry.example/outrider:one")
        config.write_text("sidecar_image: registry.example/outrider:two\n")
        wait_for("registry.example/outrider:two")
        config.write_text("sidecar_image: [not, a, string]\n")
        deadline = time.monotonic() + 30
        while not any("not applied (keeping the previous one): sidecar_image" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "bad config edit never reported"
            time.sleep(0.2)
        assert "registry.example/outrider:two" in image()  # the last good config still serves
        # A typo in the sidecar block is refused by the sidecar's own parser, at reload too.
        config.write_text("sidecar_image: registry.example/outrider:three\nsidecar: {inbound: {isuer: x}}\n")
        deadline = time.monotonic() + 30
        while not any("not applied" in line and "['isuer']" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "bad sidecar block never reported"
            time.sleep(0.2)
        assert "registry.example/outrider:two" in image()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(30)
    assert proc.returncode == 0, "".join(lines)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(max_size=200)
    | st.sampled_from(
        [
            "kind: Pod\nspec: 1",
            "kind: Deployment\nspec: {template: 3}",
            "- a\n- b",
            "kind: CronJob\nspec: {jobTemplate: null}",
            "kind: Pod\nspec: {containers: [1]}",
            "kind: List\nitems: [1, {kind: Pod}]",
        ]
    )
)
def test_fuzz_offline_inject_never_crashes(
    text: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import io

    from outrider.webhook import offline

    parser = argparse.ArgumentParser()
    offline.configure(parser)
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    code = offline.run(parser.parse_args(["-f", "-"]))
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    assert "Traceback" not in err


def test_webhook_start_up_failures_are_one_line_without_traceback(tmp_path: Path) -> None:
    assert _run("certs", "--out", str(tmp_path)).returncode == 0
    tls = ["--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key")]
    garbled = tmp_path / "garbled-kubeconfig"
    garbled.write_text("clusters: [\n")
    empty = tmp_path / "empty-kubeconfig"
    empty.write_text("apiVersion: v1\nkind: Config\n")
    bad_block = tmp_path / "config.yaml"
    bad_block.write_text("sidecar:\n  inbound:\n    mtls: {enabeld: true}\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    env_free = {k: v for k, v in __import__("os").environ.items() if not k.startswith("KUBERNETES_")}
    cases = [
        (["--in-cluster"], "--in-cluster: this process does not run in a Kubernetes pod"),
        (["--kubeconfig", str(tmp_path / "missing")], "cannot read it: No such file or directory"),
        (["--kubeconfig", str(garbled)], "not a usable kubeconfig"),
        (["--kubeconfig", str(empty)], "not a usable kubeconfig"),
        (["--port", "70000"], "--port 70000 is not a port number"),
        (["--host", "127.0.0.1", "--port", str(busy.getsockname()[1])], "cannot listen on 127.0.0.1:"),
        (["--host", "no-such-host.invalid"], "cannot listen on no-such-host.invalid"),
        (["--config", str(bad_block)], "inbound.mtls: unknown key(s) ['enabeld']"),
        (["--config", str(tmp_path / "nope.yaml")], "cannot read webhook config"),
        (["--config", str(garbled)], "is not valid YAML"),
    ]
    try:
        for extra, expected in cases:
            result = subprocess.run(
                [*OUTRIDER, "webhook", *tls, *extra],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env=env_free,
            )
            errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
            assert result.returncode != 0, (extra, result.stderr)
            assert "Traceback" not in result.stderr, (extra, result.stderr)
            assert len(errors) == 1 and errors[0].startswith("error: "), (extra, result.stderr)
            assert expected in errors[0], (extra, errors[0])
    finally:
        busy.close()


def test_webhook_drains_after_sigterm_before_it_stops_answering(tmp_path: Path) -> None:
    """--shutdown-delay: after SIGTERM /readyz says 503 (the Service drops the replica) while admissions
    are still answered, and only then does the process stop."""
    assert _run("certs", "--out", str(tmp_path)).returncode == 0
    proc, port = _start_webhook(tmp_path, "--shutdown-delay=3")
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))

    def get(path: str) -> int:
        conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert get("/readyz") == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "webhook did not come up"
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while get("/readyz") != 503:  # the signal is handled asynchronously
            assert time.monotonic() < deadline, "/readyz never turned 503 after SIGTERM"
            time.sleep(0.05)
        assert get("/healthz") == 200 and proc.poll() is None, "the webhook stopped answering while draining"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "draining for 3.0 s" in output and "shutting down" in output
    assert output.index("draining") < output.index("shutting down")


def test_webhook_refuses_a_bad_shutdown_delay() -> None:
    bad = _run("webhook", "--tls-cert", "x", "--tls-key", "y", "--shutdown-delay=-1")
    assert bad.returncode == 2 and "--shutdown-delay -1.0" in bad.stderr


async def test_config_file_caught_mid_write_is_never_applied(tmp_path: Path) -> None:
    """An editor that truncates the file, then writes it: the empty (or partial) file read in between
    must not be served, not even for one poll; the finished edit is applied from the bytes judged."""
    import asyncio

    from outrider.webhook.config import ConfigHolder, load_config_file
    from outrider.webhook.server_cli import watch_config_file

    config = tmp_path / "config.yaml"
    config.write_text("sidecar_image: registry.example/outrider:one\n")
    holder = ConfigHolder(load_config_file(config))
    served: list[str] = []
    replace = holder.replace

    def recording(new: object) -> None:
        served.append(new.sidecar_image)  # type: ignore[attr-defined]
        replace(new)  # type: ignore[arg-type]

    holder.replace = recording  # type: ignore[method-assign]
    watch = asyncio.create_task(watch_config_file(str(config), holder, interval=0.02, settle=0.5))
    try:
        await asyncio.sleep(0.1)  # the watch has read the first config
        config.write_text("")  # truncated: an empty file is a valid config of defaults
        await asyncio.sleep(0.2)  # polled several times while empty, inside the settle window
        config.write_text("sidecar_image: registry.example/outrider:two\n")
        for _ in range(300):
            if served:
                break
            await asyncio.sleep(0.02)
        config.write_bytes(b"sidecar_image: \xff\xfe\n")  # not UTF-8: refused, the last good one stays
        await asyncio.sleep(1.0)
    finally:
        watch.cancel()
    assert served == ["registry.example/outrider:two"]
    assert holder.current.sidecar_image == "registry.example/outrider:two"
