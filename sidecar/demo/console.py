"""How the demo talks to the person watching: step headers, progress lines and the verdict.

Every check records pass/fail/skip so the demo's exit code says whether each step behaved as described.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

_COLOURS = {"ok": "32", "FAIL": "31", "skipped": "33", "step": "1;36", "dim": "2"}


@dataclass
class Outcome:
    step: str
    status: str  # "ok" | "FAIL" | "skipped"
    detail: str


@dataclass
class Console:
    out: TextIO = field(default_factory=lambda: sys.stdout)
    colour: bool | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    current: str = "setup"

    def __post_init__(self) -> None:
        if self.colour is None:
            self.colour = bool(getattr(self.out, "isatty", lambda: False)())

    def _paint(self, kind: str, text: str) -> str:
        if not self.colour:
            return text
        return f"\033[{_COLOURS[kind]}m{text}\033[0m"

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def step(self, number: int, title: str) -> None:
        self.current = f"{number}. {title}"
        bar = "=" * 78
        self._print("")
        self._print(self._paint("step", bar))
        self._print(self._paint("step", f"Step {number}: {title}"))
        self._print(self._paint("step", bar))

    def say(self, text: str) -> None:
        """What the demo is doing now."""
        self._print(f"  > {text}")

    def show(self, text: str, indent: int = 4) -> None:
        """Output the demo shows as evidence (a diff line, a claim, an audit event)."""
        pad = " " * indent
        for line in text.splitlines() or [""]:
            self._print(f"{pad}{line}")

    def dim(self, text: str) -> None:
        self._print(self._paint("dim", f"    {text}"))

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        """Record one expectation; a failed one makes the demo exit non-zero."""
        status = "ok" if ok else "FAIL"
        suffix = f" ({detail})" if detail else ""
        self._print(f"  [{self._paint(status, status)}] {what}{suffix}")
        self.outcomes.append(Outcome(self.current, status, what))
        return ok

    def skip(self, piece: str, detail: str = "") -> None:
        """A piece the step needs is not there: say so, and count it as not behaving as described."""
        suffix = f" ({detail})" if detail else ""
        self._print(f"  [{self._paint('skipped', 'skipped')}] skipped: {piece} not available yet{suffix}")
        self.outcomes.append(Outcome(self.current, "skipped", f"{piece} not available yet"))

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.status == "ok" for o in self.outcomes)

    def summary(self) -> None:
        self._print("")
        self._print(self._paint("step", "=" * 78))
        ok = sum(o.status == "ok" for o in self.outcomes)
        failed = [o for o in self.outcomes if o.status == "FAIL"]
        skipped = [o for o in self.outcomes if o.status == "skipped"]
        self._print(f"Summary: {ok} checks ok, {len(failed)} failed, {len(skipped)} skipped")
        for o in failed + skipped:
            self._print(f"  {o.status:8} step {o.step}: {o.detail}")
        verdict = (
            "every step behaved as described" if self.passed else "some steps did NOT behave as described"
        )
        self._print(self._paint("ok" if self.passed else "FAIL", f"Outrider demo: {verdict}"))
