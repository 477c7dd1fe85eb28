"""Host processes of the node: started detached with a log file and a pid file, stopped by that pid file.

A pid file records the executable, so a stale pid reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ProcSpec:
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def _pidfile(run: Path, name: str) -> Path:
    return run / f"{name}.pid"


def _exe(pid: int) -> str | None:
    try:
        return str(Path(f"/proc/{pid}/exe").readlink()).removesuffix(" (deleted)")
    except OSError:
        return None


def running_pid(run: Path, name: str) -> int | None:
    """The pid of our process `name` if it is alive and still the executable we started."""
    try:
        rec = json.loads(_pidfile(run, name).read_text())
        pid, exe = int(rec["pid"]), str(rec["exe"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if _exe(pid) == exe else None


def start(run: Path, logs: Path, spec: ProcSpec) -> int:
    """Start `spec` unless it already runs; returns its pid."""
    pid = running_pid(run, spec.name)
    if pid is not None:
        return pid
    run.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    exe = os.path.realpath(spec.argv[0])
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": "/root", **dict(spec.env)}
    with open(logs / f"{spec.name}.log", "ab") as log:
        proc = subprocess.Popen(
            list(spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            close_fds=True,
        )
    _pidfile(run, spec.name).write_text(json.dumps({"pid": proc.pid, "exe": exe, "argv": list(spec.argv)}))
    return proc.pid


def exited_early(run: Path, name: str) -> bool:
    return running_pid(run, name) is None


def stop(run: Path, name: str, timeout: float = 15.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`; True if a process of ours was running."""
    pid = running_pid(run, name)
    _pidfile(run, name).unlink(missing_ok=True)
    if pid is None:
        return False
    kill_and_wait(pid, timeout)
    return True


def kill_and_wait(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def pids_with_arg(needle: str) -> list[int]:
    """Processes whose command line contains `needle` (e.g. our containerd socket, for its shims)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle.encode() in a for a in args):
            found.append(int(entry.name))
    return found
