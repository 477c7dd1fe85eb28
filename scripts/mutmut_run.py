#!/usr/bin/env python3
"""`mutmut run` with two changes to how a mutant's tests are run (used by scripts/mutation.py).

1. Fastest first. mutmut 3.8 sorts a mutant's tests by their recorded duration only in its plain
   `fork` mode; with `process_isolation = "forkserver"` (which we need: see scripts/mutation.py) the
   tests go to pytest in set order, which changes with every run. With `-x` a mutant stops at its first
   failing test, so a slow test (the iptables netns test, 5 s) that lands early is paid for by every
   mutant it is selected for. Here the parent sorts them by duration before handing them over.
2. In two rounds. pytest collects every test id it is given before it runs the first one; for the
   webhook engine (~750 ids) collecting is most of a killed mutant's cost. A mutant with more than
   FIRST tests runs its FIRST fastest ones, and only if they all pass (it survived them) the rest.
   The outcome is the same (the same tests, a failure in either round kills), only cheaper.

Everything else is mutmut's own: `python scripts/mutmut_run.py run --max-children 2` in the scratch copy.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from mutmut.__main__ import cli
from mutmut.runners.harness import PytestRunner
from mutmut.state import state
from mutmut.workers.isolation import ForkServerRunner

FIRST = 40

_submit = ForkServerRunner.submit
_run_tests = PytestRunner.run_tests


def _fastest_first(
    self: ForkServerRunner, mutant_name: str, tests: list[str], cpu_time_limit: int, estimated_time: float
) -> None:
    durations = state().duration_by_test
    ordered = sorted(tests, key=lambda name: (durations.get(name, 0.0), name))
    _submit(self, mutant_name, ordered, cpu_time_limit, estimated_time)


def _in_two_rounds(self: PytestRunner, *, mutant_name: str | None, tests: Iterable[str]) -> int:
    tests = list(tests)
    if mutant_name is None or len(tests) <= FIRST:
        return _run_tests(self, mutant_name=mutant_name, tests=tests)
    first = _run_tests(self, mutant_name=mutant_name, tests=tests[:FIRST])
    if first != 0:
        return first
    return _run_tests(self, mutant_name=mutant_name, tests=tests[FIRST:])


def main() -> Any:
    ForkServerRunner.submit = _fastest_first  # type: ignore[method-assign]
    PytestRunner.run_tests = _in_two_rounds  # type: ignore[method-assign]
    return cli()


if __name__ == "__main__":
    sys.exit(main())
