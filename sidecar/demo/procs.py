"""The demo's child processes: started with logs in the demo's temp dir, stopped for sure at the end.

Each child gets its own process group (so the whole tree can be signalled) and dies with the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .uid_access import require_runnable_as

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child before exec: a SIGKILLed demo must not leave servers behind.
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.proc.returncode is None


@dataclass
class Supervisor:
    workdir: Path
    children: list[Child] = field(default_factory=list)

    async def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        netns: str | None = None,
        uid: int | None = None,
        cwd: str | None = None,
    ) -> Child:
        """Start `argv` (optionally inside network namespace `netns` and as `uid`), logging to a file."""
        command = list(argv)
        if uid is not None:
            if command and command[0] == sys.executable:
                await asyncio.to_thread(require_runnable_as, [uid], sys.executable)
            command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *command]
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        log = self.workdir / f"{name}.log"
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        with log.open("wb") as handle:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=handle,
                stderr=asyncio.subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    async def stop(self, child: Child, grace: float = 5.0) -> None:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(child.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                await child.proc.wait()
        # Grandchildren that outlived their leader (same process group) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)

    async def stop_all(self) -> None:
        for child in reversed(self.children):
            await self.stop(child)
        self.children.clear()


async def wait_until(
    what: str,
    probe: Callable[[], Awaitable[bool]],
    *,
    child: Child | None = None,
    limit: float = 30.0,
    interval: float = 0.1,
) -> None:
    """Call async `probe()` until it returns True; raise RuntimeError naming `what` otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    last = ""
    while loop.time() < deadline:
        if child is not None and not child.running:
            raise RuntimeError(
                f"{child.name} exited with code {child.proc.returncode} while waiting for {what}"
            )
        try:
            if await probe():
                return
        except Exception as exc:  # keep polling; remember why for the error message
            last = f": {type(exc).__name__}: {exc}"
        await asyncio.sleep(interval)
    raise RuntimeError(f"timed out after {limit:.0f}s waiting for {what}{last}")


async def tcp_open(host: str, port: int) -> bool:
    _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


async def http_ok(session: aiohttp.ClientSession, url: str, **kwargs: object) -> bool:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=3), **kwargs) as r:  # type: ignore[arg-type]
        return r.status < 500


def python() -> str:
    return sys.executable


def outrider_cmd() -> list[str]:
    """How to run the `outrider` console script with the same interpreter as the demo."""
    return [sys.executable, "-m", "outrider.webhook.cli"]
