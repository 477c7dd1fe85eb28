"""The `outrider` console script: one entry point, one sub-command per process or tool.

Each sub-command lives in the module that owns it; that module exposes `configure(parser)` and
`run(args) -> int`. Modules are imported lazily so `outrider certs` never pays for the sidecar, and
so a production image that leaves a command's code or dependencies out (the sidecar image has no
demo, no webhook server; docs/install.md) answers that command with one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from outrider.webhook import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "webhook": ("outrider.webhook.server_cli", "run the mutating admission webhook (HTTPS)"),
    "inject": (
        "outrider.webhook.offline",
        "inject the sidecar into manifests offline, like istioctl kube-inject",
    ),
    "certs": ("outrider.webhook.certs", "write a dev CA and a serving certificate for the webhook"),
    "sidecar": (
        "outrider.sidecar.main",
        "run the outrider-proxy sidecar (identity, MCP proxy, egress, telemetry)",
    ),
    "iptables": ("outrider.sidecar.egress.iptables_cli", "compute and apply the pod's traffic-capture rules"),
    "demo": ("outrider.sidecar.demo.run", "run the whole Outrider story on this machine"),
    "check": (
        "outrider.webhook.check.cli",
        "check install prerequisites (--pre) and the installed webhook's health",
    ),
}


# exit status of a command this installation does not carry (argparse's usage errors are 2 as well)
UNAVAILABLE = 2


class CommandUnavailable(Exception):
    """A sub-command whose module, or a module it imports, is not installed here."""

    def __init__(self, command: str, reason: str) -> None:
        self.command = command
        self.reason = reason
        super().__init__(
            f"outrider: `outrider {command}` is not available in this installation: {reason} "
            "(each Outrider image carries only its own commands: "
            "the sidecar image `sidecar` and `iptables`, the webhook image `webhook`, `check`, `inject` "
            "and `certs`; `pip install outrider` or a checkout has them all)"
        )


def load_command(name: str) -> ModuleType:
    """The sub-command's module; CommandUnavailable when it, or a module it imports, is absent."""
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise CommandUnavailable(name, f"the Python module {missing!r} is not installed") from None
    except ImportError as exc:  # a module that checks for its dependency itself, with its own words
        raise CommandUnavailable(name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outrider", description="Outrider: safe MCP servers on Kubernetes.")
    parser.add_argument("--version", action="version", version=f"outrider {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_command=name)
        if name in _requested_commands():
            load_command(name).configure(sub_parser)
    return parser


def _requested_commands() -> set[str]:
    # Only the chosen sub-command's module is imported (to add its flags); `--help` lists them all.
    # The sub-command is the first word that is not an option: a later argument that happens to be a
    # command's name (`outrider certs --out demo`) must not import that command.
    words = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    return {words[0]} if words and words[0] in COMMANDS else set()


def main(argv: Sequence[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        parser = build_parser()
        args = parser.parse_args()
        module = load_command(args._command)
    except CommandUnavailable as exc:
        print(exc, file=sys.stderr)
        return UNAVAILABLE
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
