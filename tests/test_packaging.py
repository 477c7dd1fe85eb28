"""The distribution installs one import namespace, `outrider`, and nothing else at the top level.

PyPI already has a package whose import name is `sidecar` (the Jupyter widget); a wheel that
installed top-level `sidecar` or `webhook` packages would overwrite it or be overwritten by it.
These tests build the real wheel, install it into a fresh virtualenv beside PyPI's `sidecar`, and
import both; and they keep the repository from importing the folders by their bare names, which
would load every module twice under two names (two `ConfigError` classes, two registries).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BARE = ("sidecar", "webhook")
CODE_DIRS = ("outrider", "sidecar", "webhook", "localnode", "tests", "bench", "scripts")


def _python_files() -> list[Path]:
    files: list[Path] = []
    for top in CODE_DIRS:
        base = REPO / top
        if base.is_symlink():
            continue
        files += [p for p in base.rglob("*.py") if "testdata" not in p.parts and not p.is_symlink()]
    return files


def _bare_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [n for n in names if n.split(".")[0] in BARE]
    return found


def _names_a_module(text: str) -> bool:
    """`sidecar.dev.idp` yes; `sidecar.inbound.resource` (a configuration key) no."""
    parts = text.split(".")
    if parts[0] not in BARE or len(parts) < 2 or not all(p.isidentifier() for p in parts):
        return False
    where = REPO.joinpath(*parts)
    return where.is_dir() or where.with_suffix(".py").is_file()


def test_no_module_imports_sidecar_or_webhook_by_its_bare_name() -> None:
    offenders = []
    for path in _python_files():
        if path == Path(__file__).resolve():
            continue  # the examples below
        tree = ast.parse(path.read_text(), filename=str(path))
        offenders += [f"{path.relative_to(REPO)}: import {name}" for name in _bare_imports(tree)]
        for node in ast.walk(tree):  # `python -m sidecar.x` / importlib strings
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _names_a_module(node.value):
                offenders.append(f"{path.relative_to(REPO)}: {node.value!r}")
    assert offenders == [], "use the outrider.* names:\n" + "\n".join(offenders)


def test_the_bare_import_check_can_fail() -> None:
    tree = ast.parse(
        "import sidecar.config\nfrom webhook import cli\nfrom .sidecar import x\nimport outrider"
    )
    assert _bare_imports(tree) == ["sidecar.config", "webhook"]
    assert _names_a_module("sidecar.dev.idp") and _names_a_module("webhook.check")
    assert not _names_a_module("sidecar.inbound.resource") and not _names_a_module("sidecar.egress.")


def test_the_namespace_package_points_at_the_two_folders() -> None:
    for name in BARE:
        link = REPO / "outrider" / name
        assert link.is_symlink() and link.resolve() == (REPO / name).resolve()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src") / "outrider"
    # build from a clean export of the tracked files, as a release would (no egg-info, no .venv)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    )
    src.mkdir()
    for rel in archive.stdout.decode().split("\0"):
        if not rel:
            continue
        target, origin = src / rel, REPO / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            target.symlink_to(origin.readlink())
        elif origin.is_file():
            target.write_bytes(origin.read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (built,) = out.glob("outrider-*.whl")
    return built


def test_the_wheel_holds_only_the_outrider_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"outrider"}
    assert "outrider/sidecar/config.py" in names and "outrider/webhook/cli.py" in names
    assert "outrider/sidecar/policy/outrider.cedarschema" in names  # package data comes along
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["outrider"]


@pytest.mark.slow
def test_installed_beside_pypi_sidecar_both_import(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # PyPI's `sidecar` (the Jupyter widget, import name `sidecar`) first, then Outrider, then the
    # other order's worry: reinstalling PyPI's sidecar must not remove any Outrider file
    for spec in ("sidecar", str(wheel), "--force-reinstall --no-deps sidecar"):
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *spec.split()],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0 and spec == "sidecar" and "No matching distribution" in done.stderr:
            pytest.skip("PyPI's `sidecar` package is not reachable from this machine")
        assert done.returncode == 0, done.stderr[-2000:]
    probe = (
        "import sidecar, outrider.sidecar.config as c, outrider.webhook.cli as w, outrider.sidecar.main;"
        "print(sidecar.__file__); print(c.__file__); print(w.__file__); print(hasattr(sidecar, 'Sidecar'))"
    )
    done = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pypi_sidecar, config, cli, widget = done.stdout.split()
    site = str(venv / "lib")
    assert pypi_sidecar.startswith(site) and "/outrider/" not in pypi_sidecar
    assert config.startswith(site) and config.endswith("outrider/sidecar/config.py")
    assert cli.startswith(site) and cli.endswith("outrider/webhook/cli.py")
    assert widget == "True"  # it really is PyPI's package, not ours
    console = subprocess.run(
        [str(venv / "bin" / "outrider"), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert console.returncode == 0 and "sidecar" in console.stdout, console.stderr[-2000:]
