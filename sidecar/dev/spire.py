"""A real SPIRE server and agent (v1.13.3 from scripts/build-upstream.sh) on loopback, for tests and demos.

Join-token node attestation, the unix workload attestor, registration entries and agent restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

SPIRE_VERSION = os.environ.get("OUTRIDER_SPIRE_VERSION", "v1.13.3")
Progress = Callable[[str], None]


class SpireError(RuntimeError):
    """SPIRE could not be built, started or driven; the message says which step and shows its log."""


def _stderr_progress(message: str) -> None:
    print(f"[spire] {message}", file=sys.stderr, flush=True)


def cache_bin_dir() -> Path:
    cache = os.environ.get("OUTRIDER_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "outrider"
    )
    return Path(cache) / f"spire-{SPIRE_VERSION}" / "bin"


def find_binaries(*, build: bool = True, progress: Progress = _stderr_progress) -> Path | None:
    """The directory holding spire-server and spire-agent; builds them (minutes, once) if allowed."""
    bin_dir = cache_bin_dir()
    if (bin_dir / "spire-server").exists() and (bin_dir / "spire-agent").exists():
        return bin_dir
    script = Path(__file__).resolve().parents[2] / "scripts" / "build-upstream.sh"
    if not build or not script.exists():
        return None
    progress(f"building SPIRE {SPIRE_VERSION} with {script} (first time only)")
    done = subprocess.run([str(script), "spire"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SpireError(f"{script} spire failed:\n{done.stderr[-3000:]}")
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else str(bin_dir)
    return Path(last) if Path(last, "spire-server").exists() else bin_dir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class SpireOptions:
    trust_domain: str = "example.org"
    default_x509_svid_ttl_s: int = 3600
    default_jwt_svid_ttl_s: int = 300
    ca_ttl_s: int = 24 * 3600
    server_key_manager: str = "memory"  # "memory" | "disk"
    log_level: str = "INFO"
    # The `iss` of every JWT-SVID (SPIRE's `jwt_issuer`): the OIDC discovery provider's URL when an
    # IdP (Entra, Okta, Keycloak) validates JWT-SVIDs through OIDC discovery.
    jwt_issuer: str | None = None


@dataclass(frozen=True)
class Entry:
    id: str
    spiffe_id: str
    selectors: tuple[str, ...]


class Started:
    """`async with` for a dev process: `start()` on entry (`stop()` if that fails), `stop()` on exit."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class SpireDev(Started):
    """`async with SpireDev() as spire:` a server and an attested agent in a private temp dir."""

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        options: SpireOptions | None = None,
        workdir: Path | None = None,
        progress: Progress = _stderr_progress,
    ) -> None:
        self.options = options or SpireOptions()
        self._bin_dir = bin_dir
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="outrider-spire-"))
        self.progress = progress
        self.server_port = 0
        self.join_token = ""
        self._server: asyncio.subprocess.Process | None = None
        self._agent: asyncio.subprocess.Process | None = None

    # -- paths and names ---------------------------------------------------------------------------

    @property
    def server_socket(self) -> Path:
        return self.workdir / "server" / "api.sock"

    @property
    def agent_socket(self) -> Path:
        return self.workdir / "agent" / "public" / "api.sock"

    @property
    def agent_socket_uri(self) -> str:
        return f"unix://{self.agent_socket}"

    @property
    def trust_domain(self) -> str:
        return self.options.trust_domain

    @property
    def agent_id(self) -> str:
        return f"spiffe://{self.trust_domain}/spire/agent/join_token/{self.join_token}"

    def _bin(self, name: str) -> str:
        if self._bin_dir is None:
            self._bin_dir = find_binaries(progress=self.progress)
        if self._bin_dir is None:
            raise SpireError(
                f"SPIRE binaries not found in {cache_bin_dir()}: run scripts/build-upstream.sh spire"
            )
        return str(self._bin_dir / name)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        started = time.monotonic()
        # Other UIDs must reach the agent socket (workloads run as any user), not the server's.
        self.workdir.chmod(0o755)
        for sub in ("server", "agent", "agent/public"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "server").chmod(0o700)
        (self.workdir / "agent" / "public").chmod(0o755)
        self.server_port = _free_port()
        self._write_server_config()
        self.progress(
            f"starting spire-server on 127.0.0.1:{self.server_port} (trust domain {self.trust_domain})"
        )
        self._server = await self._spawn("spire-server", "server")
        await self._wait_healthy("spire-server", self.server_socket, self._server, "server")
        token = await self.server_cli("token", "generate", "-ttl", "600", "-output", "json")
        self.join_token = str(json.loads(token)["value"])
        bundle = await self.server_cli("bundle", "show")
        (self.workdir / "agent" / "bootstrap.pem").write_text(bundle)
        self._write_agent_config()
        await self.start_agent(join_token=self.join_token)
        self.progress(f"SPIRE ready in {time.monotonic() - started:.1f} s; agent socket {self.agent_socket}")

    async def stop(self) -> None:
        await self.stop_agent()
        if self._server is not None:
            await _terminate(self._server)
            self._server = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def start_agent(self, *, join_token: str | None = None) -> None:
        """Start the agent; the first start attests with the join token, later ones reuse the
        agent SVID kept in its data dir (disk key manager), as a restarted DaemonSet pod would."""
        self.progress("starting spire-agent" + (" (join token attestation)" if join_token else ""))
        extra = ["-joinToken", join_token] if join_token else []
        self._agent = await self._spawn("spire-agent", "agent", *extra)
        await self._wait_healthy("spire-agent", self.agent_socket, self._agent, "agent")

    async def stop_agent(self) -> None:
        if self._agent is not None:
            self.progress("stopping spire-agent")
            await _terminate(self._agent)
            self._agent = None

    async def restart_agent(self, down_s: float = 0.0) -> None:
        await self.stop_agent()
        if down_s:
            await asyncio.sleep(down_s)
        await self.start_agent()

    # -- registration entries --------------------------------------------------------------------------

    async def create_entry(
        self,
        spiffe_id: str,
        selectors: Sequence[str],
        *,
        x509_svid_ttl_s: int | None = None,
        jwt_svid_ttl_s: int | None = None,
        parent_id: str | None = None,
    ) -> Entry:
        args = ["entry", "create", "-parentID", parent_id or self.agent_id, "-spiffeID", spiffe_id]
        for selector in selectors:
            args += ["-selector", selector]
        if x509_svid_ttl_s is not None:
            args += ["-x509SVIDTTL", str(x509_svid_ttl_s)]
        if jwt_svid_ttl_s is not None:
            args += ["-jwtSVIDTTL", str(jwt_svid_ttl_s)]
        out = json.loads(await self.server_cli(*args, "-output", "json"))
        result = out["results"][0]
        if result.get("status", {}).get("code", 0) != 0:
            raise SpireError(f"entry create {spiffe_id}: {result['status'].get('message')}")
        entry = Entry(id=str(result["entry"]["id"]), spiffe_id=spiffe_id, selectors=tuple(selectors))
        self.progress(f"registration entry {entry.id}: {spiffe_id} <- {', '.join(selectors)}")
        return entry

    async def delete_entry(self, entry_id: str) -> None:
        await self.server_cli("entry", "delete", "-entryID", entry_id)
        self.progress(f"deleted registration entry {entry_id}")

    async def entries(self) -> list[dict[str, Any]]:
        out = json.loads(await self.server_cli("entry", "show", "-output", "json"))
        found: list[dict[str, Any]] = out.get("entries") or []
        return found

    async def bundle_pem(self) -> str:
        return await self.server_cli("bundle", "show")

    async def server_cli(self, *args: str) -> str:
        """Run `spire-server <args> -socketPath <server socket>` and return its stdout."""
        sub = list(args[:2])  # "entry create", "token generate", "bundle show": flags follow the verb
        argv = [self._bin("spire-server"), *sub, "-socketPath", str(self.server_socket), *args[2:]]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise SpireError(f"spire-server {' '.join(sub)} failed: {(err or out).decode().strip()[-2000:]}")
        return out.decode()

    # -- internals -------------------------------------------------------------------------------------

    def _write_server_config(self) -> None:
        o = self.options
        server_dir = self.workdir / "server"
        key_manager = (
            'KeyManager "memory" {\n    plugin_data {}\n  }'
            if o.server_key_manager == "memory"
            else f'KeyManager "disk" {{\n    plugin_data {{ keys_path = "{server_dir}/keys.json" }}\n  }}'
        )
        jwt_issuer = f'  jwt_issuer = "{o.jwt_issuer}"\n' if o.jwt_issuer else ""
        (server_dir / "server.conf").write_text(
            f"""server {{
  bind_address = "127.0.0.1"
  bind_port = "{self.server_port}"
  socket_path = "{self.server_socket}"
  trust_domain = "{o.trust_domain}"
  data_dir = "{server_dir}/data"
  log_level = "{o.log_level}"
  ca_key_type = "ec-p256"
  ca_ttl = "{o.ca_ttl_s}s"
  default_x509_svid_ttl = "{o.default_x509_svid_ttl_s}s"
  default_jwt_svid_ttl = "{o.default_jwt_svid_ttl_s}s"
{jwt_issuer}}}

plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{server_dir}/data/datastore.sqlite3"
    }}
  }}
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  {key_manager}
}}
"""
        )

    def _write_agent_config(self) -> None:
        o = self.options
        agent_dir = self.workdir / "agent"
        (agent_dir / "agent.conf").write_text(
            f"""agent {{
  data_dir = "{agent_dir}/data"
  log_level = "{o.log_level}"
  server_address = "127.0.0.1"
  server_port = "{self.server_port}"
  socket_path = "{self.agent_socket}"
  trust_bundle_path = "{agent_dir}/bootstrap.pem"
  trust_domain = "{o.trust_domain}"
}}

plugins {{
  NodeAttestor "join_token" {{
    plugin_data {{}}
  }}
  KeyManager "disk" {{
    plugin_data {{
      directory = "{agent_dir}/data"
    }}
  }}
  WorkloadAttestor "unix" {{
    plugin_data {{}}
  }}
}}
"""
        )

    async def _spawn(self, binary: str, role: str, *extra: str) -> asyncio.subprocess.Process:
        config = self.workdir / role / f"{role}.conf"
        log_path = self.workdir / role / f"{role}.log"
        log = log_path.open("ab")
        try:
            return await asyncio.create_subprocess_exec(
                self._bin(binary), "run", "-config", str(config), *extra, stdout=log, stderr=log
            )
        finally:
            log.close()

    async def _wait_healthy(
        self, binary: str, sock: Path, proc: asyncio.subprocess.Process, role: str, timeout_s: float = 60
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise SpireError(f"{binary} exited with {proc.returncode}:\n{self.log_tail(role)}")
            if sock.exists():  # noqa: ASYNC240 (a stat per poll)
                check = await asyncio.create_subprocess_exec(
                    self._bin(binary),
                    "healthcheck",
                    "-socketPath",
                    str(sock),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                if await check.wait() == 0:
                    return
            await asyncio.sleep(0.2)
        raise SpireError(f"{binary} not healthy after {timeout_s:.0f} s:\n{self.log_tail(role)}")

    def log_tail(self, role: str, lines: int = 30) -> str:
        path = self.workdir / role / f"{role}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


async def _terminate(proc: asyncio.subprocess.Process, grace_s: float = 5.0) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _main() -> None:
    async with SpireDev() as spire:
        uid = os.getuid()
        await spire.create_entry(f"spiffe://{spire.trust_domain}/uid/{uid}", [f"unix:uid:{uid}"])
        print(f"SPIFFE_ENDPOINT_SOCKET={spire.agent_socket_uri}", flush=True)
        with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
            await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
