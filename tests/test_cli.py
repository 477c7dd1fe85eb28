"""The `outrider` console script lists every fixed sub-command and rejects unknown ones."""

import subprocess
import sys

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
