"""scripts/prebuild.sh's fetch lane: the module resolves of scripts/build-upstream.sh and
scripts/build-node.sh run once per work dir even when the fetch lane and the build ask at the same time.

A stand-in `go` on PATH records each `go get` (and sleeps in it, so that two callers overlap); nothing is
downloaded or compiled. The real builds run in `make test` itself (scripts/prebuild.sh).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_GO = """#!/bin/sh
# records `go get ...` with its work dir; `go build -o OUT` writes OUT
echo "$PWD $*" >> "$FAKE_GO_LOG"
case "$1" in
  get) sleep 1 ;;
  build)
    while [ $# -gt 0 ]; do
      if [ "$1" = -o ]; then printf '#!/bin/sh\\n' > "$2"; chmod +x "$2"; fi
      shift
    done ;;
esac
exit 0
"""


@pytest.fixture
def fake_env(tmp_path: Path) -> dict[str, str]:
    if sys.platform != "linux":
        pytest.skip("the build scripts are bash for Linux")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    go = bindir / "go"
    go.write_text(FAKE_GO)
    go.chmod(go.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "OUTRIDER_CACHE": str(tmp_path / "cache"),
        "FAKE_GO_LOG": str(tmp_path / "go.log"),
    }


def go_gets(env: dict[str, str]) -> list[str]:
    log = Path(env["FAKE_GO_LOG"])
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if " get " in f" {line.split(' ', 1)[1]} "]


def run(script: str, mode: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["bash", str(ROOT / "scripts" / script), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("script", ["build-upstream.sh", "build-node.sh"])
def test_two_concurrent_fetches_resolve_each_work_dir_once(script: str, fake_env: dict[str, str]) -> None:
    first, second = run(script, "fetch", fake_env), run(script, "fetch", fake_env)
    for proc in (first, second):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    gets = go_gets(fake_env)
    work_dirs = [line.split(" ", 1)[0] for line in gets]
    assert work_dirs, "the fetch mode resolved nothing"
    assert len(work_dirs) == len(set(work_dirs)), f"a work dir was resolved twice: {gets}"
    expected = 4 if script == "build-upstream.sh" else 3  # SPIRE, its OIDC provider, helm, syft / the add-ons
    assert len(work_dirs) == expected, gets
    for work in work_dirs:
        assert (Path(work) / ".resolved").exists()
        assert (Path(work) / "go.mod").read_text().startswith("module outrider.local/")


def test_the_build_after_a_fetch_does_not_resolve_again(fake_env: dict[str, str]) -> None:
    fetch = run("build-upstream.sh", "fetch", fake_env)
    assert fetch.wait(timeout=120) == 0
    before = len(go_gets(fake_env))
    build = run("build-upstream.sh", "helm", fake_env)
    _, err = build.communicate(timeout=120)
    assert build.returncode == 0, err
    helm_gets = [line for line in go_gets(fake_env)[before:] if "helm" in line]
    # helm's own `go get` ran in the fetch; the build only reads the version and compiles
    assert helm_gets == [], helm_gets
    assert (Path(fake_env["OUTRIDER_CACHE"]) / "helm-v3.19.0" / "bin" / "helm").exists()


def test_a_failed_resolve_leaves_no_stamp_and_is_retried(fake_env: dict[str, str], tmp_path: Path) -> None:
    failing = tmp_path / "bin" / "go"
    failing.write_text('#!/bin/sh\necho "$PWD $*" >> "$FAKE_GO_LOG"\n[ "$1" = get ] && exit 1\nexit 0\n')
    proc = run("build-node.sh", "fetch", fake_env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    cache = Path(fake_env["OUTRIDER_CACHE"])
    assert not list(cache.glob("*/src/.resolved")), "a failed `go get` was stamped as resolved"
    failing.write_text(FAKE_GO)
    proc = run("build-node.sh", "fetch", fake_env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(list(cache.glob("*/src/.resolved"))) == 3
