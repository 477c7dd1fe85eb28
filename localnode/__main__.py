"""`python -m localnode up|down|status` (see docs/node.md)."""

from __future__ import annotations

import argparse
import sys

from localnode import down, procs, up
from localnode.config import from_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localnode", description="a real one-node Kubernetes")
    parser.add_argument("command", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    try:
        cfg = from_env()
    except ValueError as exc:
        print(f"[node] {exc}", file=sys.stderr)
        return 2
    if args.command == "up":
        return up.main(cfg)
    if args.command == "down":
        return down.main(cfg)
    missing = [n for n in up.ORDER if procs.running_pid(cfg.run, n) is None]
    if missing:
        print(f"[node] down (not running: {', '.join(missing)})")
        return 1
    print(up.usage(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
