"""Thin adapters over the node's CLIs: kubectl, ctr, spire-server, each with a clear error on failure."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from localnode.config import NodeConfig


class NodeError(RuntimeError):
    """A step of `up`/`down` failed; the message says which and where to look."""


def run(argv: list[str], *, input_text: str | None = None, timeout: float = 120) -> str:
    try:
        out = subprocess.run(
            argv, input=input_text, capture_output=True, text=True, check=False, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise NodeError(f"{argv[0]} {' '.join(argv[1:3])} timed out after {timeout:.0f} s") from exc
    if out.returncode != 0:
        raise NodeError(f"{' '.join(argv[:4])} failed (exit {out.returncode}): {out.stderr.strip()[-1500:]}")
    return out.stdout


def kubectl(bins: dict[str, str], cfg: NodeConfig, *args: str, input_text: str | None = None) -> str:
    return run([bins["kubectl"], f"--kubeconfig={cfg.kubeconfig}", *args], input_text=input_text)


def ctr(cfg: NodeConfig, *args: str, timeout: float = 300) -> str:
    return run(["ctr", "--address", str(cfg.containerd_sock), "-n", "k8s.io", *args], timeout=timeout)


def wait_for(what: str, check: Callable[[], bool], timeout: float, log_hint: Path | None = None) -> float:
    """Poll `check` until true; returns the seconds it took or raises NodeError naming the log."""
    start = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - start
        except NodeError:
            pass
        if time.monotonic() - start > timeout:
            hint = f"; see {log_hint}" if log_hint else ""
            raise NodeError(f"timed out after {timeout:.0f} s waiting for {what}{hint}")
        time.sleep(0.5)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
