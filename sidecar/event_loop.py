"""Which asyncio event loop the sidecar runs on: `OUTRIDER_EVENT_LOOP` = auto (default), uvloop, asyncio.

`auto` takes uvloop when it is installed (the sidecar image has it) and asyncio's own loop otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Mapping

from outrider.sidecar.config_error import ConfigError

ENV = "OUTRIDER_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def choose(environ: Mapping[str, str], *, uvloop_installed: bool) -> str:
    """`uvloop` or `asyncio`: what to run, from the environment and what is installed."""
    wanted = environ.get(ENV, "auto").strip().lower() or "auto"
    if wanted not in CHOICES:
        raise ConfigError(f"{ENV}: {wanted!r} is not one of {', '.join(CHOICES)}")
    if wanted == "uvloop" and not uvloop_installed:
        raise ConfigError(f"{ENV}=uvloop, but uvloop is not installed (pip install uvloop, or use auto)")
    if wanted == "auto":
        return "uvloop" if uvloop_installed else "asyncio"
    return wanted


def factory(environ: Mapping[str, str]) -> tuple[str, LoopFactory]:
    """The chosen loop's name and a factory for `asyncio.Runner`."""
    name = choose(environ, uvloop_installed=importlib.util.find_spec("uvloop") is not None)
    if name == "uvloop":
        import uvloop

        return name, uvloop.new_event_loop
    return name, asyncio.new_event_loop
