"""The `outrider` console script lists every fixed sub-command and rejects unknown ones."""

import subprocess
import sys
from pathlib import Path

from outrider.webhook.cli import COMMANDS


def test_every_fixed_subcommand_is_registered() -> None:
    assert {"webhook", "sidecar", "iptables", "inject", "certs", "demo"} <= set(COMMANDS)


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "outrider.webhook.cli", "no-such-command"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


# A stand-in for an installation without the demo (the production images): a finder that says the
# module does not exist, exactly as Python says it for a package that is not on disk.
_WITHOUT_DEMO = """
import sys
class NoDemo:
    def find_spec(self, name, path=None, target=None):
        if name == "outrider.sidecar.demo" or name.startswith("outrider.sidecar.demo."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoDemo())
from outrider.webhook.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _without_demo(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_DEMO, *args], capture_output=True, text=True, check=False, cwd=cwd
    )


def test_a_command_whose_code_is_absent_fails_with_one_line() -> None:
    for args in (["demo"], ["demo", "--help"]):
        result = _without_demo(*args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "`outrider demo` is not available in this installation" in lines[0]
        assert "'outrider.sidecar.demo'" in lines[0]
        assert result.stdout == ""


def test_only_the_chosen_command_is_imported(tmp_path: Path) -> None:
    # `demo` as an argument value of another command must not import (and so not need) the demo
    result = _without_demo("certs", "--out", "demo", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo").is_dir()
    assert any((tmp_path / "demo").iterdir())
    # and the full help still lists every command without importing any of them
    listing = _without_demo("--help")
    assert listing.returncode == 0, listing.stderr
    assert all(name in listing.stdout for name in COMMANDS)
