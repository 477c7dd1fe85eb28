"""SPIRE's own OIDC discovery provider (built by scripts/build-upstream.sh spire) beside a `SpireDev`.

It reads the JWT signing keys from the SPIRE server API and serves `/.well-known/openid-configuration`
and `/keys` over plain HTTP on loopback: what Entra and Okta fetch to trust JWT-SVIDs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from outrider.sidecar.dev.spire import SpireDev, SpireError, Started, _free_port, _terminate, cache_bin_dir


def find_oidc_provider(*, build: bool = True) -> Path | None:
    """The cached binary; builds it (a minute or two, once) with scripts/build-upstream.sh if allowed."""
    path = cache_bin_dir() / "oidc-discovery-provider"
    script = Path(__file__).resolve().parents[2] / "scripts" / "build-upstream.sh"
    if not path.exists() and build and script.exists():
        done = subprocess.run([str(script), "spire-oidc"], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SpireError(f"{script} spire-oidc failed:\n{done.stderr[-3000:]}")
    return path if path.exists() else None


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback http only)
        return json.loads(response.read())


class SpireOidcProvider(Started):
    """`async with SpireOidcProvider(spire, port=...) as oidc:` serving `oidc.url` (= `jwt_issuer`)."""

    def __init__(self, spire: SpireDev, *, port: int | None = None, binary: Path | None = None) -> None:
        self.spire = spire
        self.port = port or _free_port()
        self.binary = binary or find_oidc_provider()
        self.workdir = spire.workdir / "oidc"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/keys"

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    async def start(self, timeout_s: float = 30) -> None:
        if self.binary is None:
            raise SpireError(
                f"oidc-discovery-provider not found in {cache_bin_dir()}: run scripts/build-upstream.sh spire"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "oidc.conf"
        config.write_text(
            f"""log_level = "warn"
domains = ["127.0.0.1", "localhost"]
insecure_addr = "127.0.0.1:{self.port}"
allow_insecure_scheme = true
set_key_use = true
jwt_issuer = "{self.url}"
jwks_uri = "{self.jwks_uri}"
server_api {{
  address = "unix://{self.spire.server_socket}"
  poll_interval = "1s"
}}
"""
        )
        log = (self.workdir / "oidc.log").open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                str(self.binary), "-config", str(config), stdout=log, stderr=log
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise SpireError(
                    f"oidc-discovery-provider exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, ValueError):
                keys = await asyncio.to_thread(_get_json, self.jwks_uri)
                if isinstance(keys, dict) and keys.get("keys"):
                    return
            await asyncio.sleep(0.2)
        raise SpireError(
            f"oidc-discovery-provider served no keys after {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    async def stop(self) -> None:
        if self._proc is not None:
            await _terminate(self._proc)
            self._proc = None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / "oidc.log").read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"
