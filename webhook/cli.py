"""The `outrider` console script: one entry point, one sub-command per process or tool.

Each sub-command lives in the module that owns it; that module exposes `configure(parser)` and
`run(args) -> int`. Modules are imported lazily so `outrider certs` never pays for the sidecar.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outrider", description="Outrider: safe MCP servers on Kubernetes.")
    parser.add_argument("--version", action="version", version=f"outrider {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        if name in _requested_commands():
            importlib.import_module(module_name).configure(sub_parser)
    return parser


def _requested_commands() -> set[str]:
    # Only the chosen sub-command's module is imported (to add its flags); `--help` lists them all.
    return {arg for arg in sys.argv[1:] if arg in COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args()
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
