"""`python -m outrider.sidecar.egress`: only the egress component, for tests, benchmarks and debugging.

Reads the same configuration as `outrider sidecar` and prints every egress decision as one JSON line
on stdout (the full sidecar turns them into audit events instead).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys

from outrider.sidecar.config import ConfigError, load
from outrider.sidecar.egress.component import component
from outrider.sidecar.runtime import Runtime
from outrider.sidecar.telemetry.observer import EgressDecision, NullObserver


class JsonLinesObserver(NullObserver):
    def egress(self, decision: EgressDecision) -> None:
        print(json.dumps(dataclasses.asdict(decision), sort_keys=True), flush=True)


async def _main(config_path: str | None) -> int:
    try:
        config = load(config_path)
    except ConfigError as exc:
        print(f"outrider egress: configuration error: {exc}", file=sys.stderr)
        return 2
    runtime = Runtime(config=config, observer=JsonLinesObserver())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with component(runtime):
        print(json.dumps({"ready": True}), flush=True)
        await stop.wait()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m outrider.sidecar.egress")
    parser.add_argument("--config", help="YAML/JSON sidecar config file (also OUTRIDER_CONFIG)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_main(args.config))


if __name__ == "__main__":
    sys.exit(main())
