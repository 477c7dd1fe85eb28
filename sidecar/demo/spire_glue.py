"""`outrider demo --spire`: the real SPIRE server and agent as the pod's Workload API.

Builds SPIRE into the cache first when absent (streaming the build's progress), then registers the
sidecar's uid and the dev IdP's uid with the unix workload attestor, as a cluster's entries would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from outrider.sidecar.dev import spire

if TYPE_CHECKING:
    from outrider.sidecar.demo.run import Demo


BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-upstream.sh"


async def _build_with_progress(demo: Demo) -> None:
    script = BUILD_SCRIPT
    demo.console.say(
        f"SPIRE {spire.SPIRE_VERSION} is not in the cache yet: building it (several minutes, once)"
    )
    proc = await asyncio.create_subprocess_exec(
        str(script),
        "spire",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # Ctrl-C stops the whole build (go and its compilers) below
    )
    assert proc.stderr is not None
    try:
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                demo.console.dim(line)
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            await proc.wait()
    if code != 0:
        raise RuntimeError(f"{script} spire failed (exit {proc.returncode}); see the lines above")


def _make_dir(path: Path) -> Path:
    path.mkdir()
    return path


async def start(demo: Demo, uid: int, idp_uid: int) -> str:
    """Start SPIRE (server + join-token-attested agent) for the demo; return the agent socket path."""
    from outrider.sidecar.demo.run import IDP_SPIFFE_ID, TRUST_DOMAIN

    c = demo.console
    if spire.find_binaries(build=False) is None:
        await _build_with_progress(demo)
    c.say(
        "SPIFFE Workload API: the REAL SPIRE server and agent "
        "(join-token node attestation, unix workload attestor)"
    )
    workdir = _make_dir(demo.workdir / "spire")
    dev = spire.SpireDev(
        options=spire.SpireOptions(trust_domain=TRUST_DOMAIN),
        workdir=workdir,
        progress=lambda message: c.dim(f"[spire] {message}"),
    )
    await demo.stack.enter_async_context(dev)
    assert demo.spiffe_id is not None
    await dev.create_entry(demo.spiffe_id, [f"unix:uid:{uid}"])
    if idp_uid != uid:
        await dev.create_entry(IDP_SPIFFE_ID, [f"unix:uid:{idp_uid}"])
    # The agent hands out SVIDs for new entries after its next sync; the sidecar retries until then.
    return str(dev.agent_socket)
