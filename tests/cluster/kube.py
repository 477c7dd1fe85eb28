"""A thin `kubectl` shell for the in-cluster tests: the same calls on the real node and on kind.

Everything goes through the kubectl binary (the one built with the node, or the one on PATH) so
the tests exercise exactly what a user types, and no client library hides an API difference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
CACHE = Path(os.environ.get("OUTRIDER_CACHE", Path.home() / ".cache" / "outrider"))


class KubectlError(RuntimeError):
    def __init__(self, args: list[str], code: int, stderr: str) -> None:
        super().__init__(f"kubectl {' '.join(args)} exited {code}: {stderr.strip()[-2000:]}")
        self.code = code
        self.stderr = stderr


def find_kubectl() -> str | None:
    """$KUBECTL, else the kubectl built beside the node's kube-apiserver, else the one on PATH."""
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    built = sorted(CACHE.glob("kubernetes-v*/bin/kubectl"))
    if built:
        return str(built[-1])
    return shutil.which("kubectl")


@dataclass(frozen=True)
class Kube:
    kubectl: str
    kubeconfig: str | None = None

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.kubectl, *(["--kubeconfig", self.kubeconfig] if self.kubeconfig else []), *args]
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        if check and out.returncode != 0:
            raise KubectlError(list(args), out.returncode, out.stderr)
        return out

    def text(self, *args: str, **kwargs: Any) -> str:
        return self.run(*args, **kwargs).stdout

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.run(*args, "-o", "json", **kwargs).stdout)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        ns = ["-n", namespace] if namespace else []
        out = self.run("get", kind, name, *ns, "-o", "json", "--ignore-not-found", check=False)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def apply(self, objects: Iterable[Mapping[str, Any]] | str, *, server_side: bool = True) -> str:
        body = objects if isinstance(objects, str) else yaml.safe_dump_all([dict(o) for o in objects])
        args = ["apply", "-f", "-"]
        if server_side:
            args += ["--server-side", "--force-conflicts", "--field-manager=outrider-e2e"]
        return self.text(*args, stdin=body)

    def delete_namespace(self, name: str, wait: bool = False) -> None:
        self.run(
            "delete", "namespace", name, "--ignore-not-found", f"--wait={str(wait).lower()}", check=False
        )

    def exec(
        self, namespace: str, pod: str, container: str, *command: str, stdin: str | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        interactive = ["-i"] if stdin is not None else []
        return self.run(
            "exec", *interactive, "-n", namespace, pod, "-c", container, "--", *command, stdin=stdin, **kw
        )

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self.json("get", "pods", "-n", namespace, "-l", selector)["items"]  # type: ignore[no-any-return]


def eventually(check: Callable[[], T | None], what: str, within: float = 120, every: float = 1.0) -> T:
    """Poll until `check` returns something truthy; fail naming `what` and the last error seen."""
    deadline = time.monotonic() + within
    last: str = "never returned a value"
    while True:
        try:
            value = check()
            if value:
                return value
            last = f"last value {value!r}"
        except (KubectlError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
            last = f"last error {exc}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}; {last}")
        time.sleep(every)
