"""`outrider demo` end to end, as CI runs it (root: network namespaces and real iptables).

It must exit 0 and print the key lines of every step; a piece that is missing makes it fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.root]

KEY_LINES = (
    "Step 1: Injection",
    "+ initContainer outrider-proxy",
    "[ok] the pod is allowed",
    "Step 2: A pod's data plane",
    "DEV STAND-IN",
    "[ok] outrider-proxy is ready",
    "Step 3: An MCP client acting as user alice",
    "[ok] its subject is alice",
    "[ok] its act claim names the sidecar's SPIFFE ID",
    "[ok] the server never saw alice's own token",
    "[ok] an allowed host is reachable",
    "[ok] a host outside the allowlist is blocked",
    "[ok] tools/list hides the tool alice may not call",
    "[ok] a tool call the policy does not permit is denied",
    "[ok] the third call in the window is rate limited: 429 with Retry-After",
    "[ok] an expired token is refused with 401",
    "Step 4: What an operator sees",
    "[ok] no token appears in any process's log",
    "[ok] the audit log records alice's denied call with the policy decision",
    "[ok] the audit log records the rate-limited call",
    "[ok] the sidecar's /metrics counts the calls",
    "[ok] the whoami call's trace arrived over OTLP/HTTP",
    "[ok] the server span names the MCP method, the tool and the user",
    "[ok] the sidecar continued the trace the client started",
    "[ok] a token exchange with the IdP shows as a child span with its duration",
    "[ok] nothing left behind",
    "Outrider demo: every step behaved as described",
)


def _netns_names() -> set[str]:
    run_netns = Path("/run/netns")
    return {p.name for p in run_netns.iterdir()} if run_netns.exists() else set()


def _run_demo(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outrider.webhook.cli", "demo", "--no-colour", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,  # the demo must not depend on the working directory
    )


def test_demo_runs_every_step_and_cleans_up(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        print("not root: the demo runs in explicit-proxy mode (CI runs as root and covers capture mode)")
    before = _netns_names()
    result = _run_demo(tmp_path)
    out = result.stdout
    print(out)
    print(result.stderr[-3000:], file=sys.stderr)
    missing = [line for line in KEY_LINES if line not in out]
    assert not missing, f"demo output lacks {missing}"
    assert result.returncode == 0
    if os.geteuid() == 0:
        assert "mode: CAPTURE" in out
    leftover = {n for n in _netns_names() - before if n.startswith("outrider-demo-")}
    assert not leftover, f"network namespaces left behind: {leftover}"
    assert "skipped:" not in out
    # the demo's own client exports spans to a receiver on its event loop: it must never block it
    assert "Failed to export" not in out + result.stderr


def test_ctrl_c_stops_the_demo_and_cleans_up(tmp_path: Path) -> None:
    """SIGINT while step 2 builds the pod: exit non-zero, no namespace, process or temp dir left behind."""
    import signal
    import time

    before = _netns_names()
    proc = subprocess.Popen(
        [sys.executable, "-m", "outrider.webhook.cli", "demo", "--no-colour"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # see each header as it is printed
        # as at a terminal: a runner started in the background inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        seen.append(line)
        if "Step 2:" in line or time.monotonic() > deadline:
            break
    assert any("Step 2:" in line for line in seen), "".join(seen)[-3000:]
    workdir = next(
        (ln.split("working directory", 1)[1].strip() for ln in seen if "working directory" in ln), None
    )
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert proc.returncode != 0, out[-3000:]
    leftover = {n for n in _netns_names() - before if n.startswith("outrider-demo-")}
    assert not leftover, f"network namespaces left behind: {leftover}"
    if workdir:
        assert not Path(workdir).exists(), f"temp dir {workdir} left behind"
    children = subprocess.run(["pgrep", "-f", workdir or "outrider-demo-"], capture_output=True, text=True)
    assert not children.stdout.strip(), f"processes left behind: {children.stdout}"


def test_demo_fails_when_a_step_cannot_behave_as_described() -> None:
    """A missing piece is reported as skipped and the demo exits non-zero (never fakes output)."""
    code = (
        "import sys; from outrider.sidecar.demo import run;"
        "run.PIECES['webhook'] = ['webhook.no_such_engine'];"
        "from outrider.webhook.cli import main; sys.exit(main(['demo', '--no-colour']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    print(result.stdout)
    assert "skipped: webhook not available yet" in result.stdout
    assert "Outrider demo: some steps did NOT behave as described" in result.stdout
    assert "[ok] nothing left behind" in result.stdout
    assert result.returncode == 1


@pytest.mark.spire
def test_demo_with_real_spire(tmp_path: Path) -> None:
    """`make demo SPIRE=1`: the same story with the real SPIRE server and agent as the Workload API."""
    result = _run_demo(tmp_path, "--spire")
    print(result.stdout)
    print(result.stderr[-3000:], file=sys.stderr)
    assert "the REAL SPIRE server and agent" in result.stdout
    assert "DEV STAND-IN" not in result.stdout
    for line in KEY_LINES:
        if line != "DEV STAND-IN":
            assert line in result.stdout
    assert result.returncode == 0


def test_demo_in_explicit_proxy_mode(tmp_path: Path) -> None:
    """What a user without root gets: no namespaces or iptables, HTTP(S)_PROXY on the same allowlist."""
    result = _run_demo(tmp_path, "--mode", "explicit")
    print(result.stdout)
    print(result.stderr[-3000:], file=sys.stderr)
    out = result.stdout
    assert "mode: EXPLICIT PROXY" in out
    assert "an app that ignores those variables is NOT stopped in this mode" in out
    for line in KEY_LINES:
        assert line in out
    assert result.returncode == 0
