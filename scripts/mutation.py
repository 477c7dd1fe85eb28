#!/usr/bin/env python3
"""Mutation testing of the modules that say yes or no (`make mutation`; issue 17).

mutmut 3 mutates one module at a time in a scratch copy of the working tree, with only the fast
tests that reach that module (no control plane, SPIRE, Keycloak or root/netns tests). mutmut's own
stats pass then runs, for each mutant, only the tests that executed the mutated function.

The packages are imported as `outrider.sidecar` / `outrider.webhook`; in the repository those are
symlinks to the top-level folders, so the scratch copy holds them as real folders under `outrider/`
(what mutmut mutates and the tests import), with the top-level names linking there.

Prints a per-module table (mutants, killed, survived, equivalent, no test, score, minutes) and writes it
between the markers in docs/testing.md. Survivors judged equivalent are listed, one line each with why,
in scripts/mutation-equivalent.txt; the score is killed (+ timed out) over the mutants some test reached,
leaving out the equivalent ones. Each module's survivors land in .mutation/<module>.survivors.txt.

    scripts/mutation.py                      # every module below
    scripts/mutation.py webhook/strict.py    # some of them
    MUTATION_CHILDREN=2 scripts/mutation.py  # parallel mutants (default: 2)
    scripts/mutation.py --table              # re-judge the doc's rows after editing the equivalent list
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing.md"
RUN = ROOT / "scripts" / "mutmut_run.py"  # `mutmut run`, each mutant's tests fastest first
BEGIN, END = "<!-- mutation-table:begin -->", "<!-- mutation-table:end -->"
LIST_BEGIN, LIST_END = "<!-- mutation-survivors:begin -->", "<!-- mutation-survivors:end -->"
MARKERS = "not controlplane and not spire and not keycloak and not root and not node"
# The "never crashes" fuzzers (300 Hypothesis examples each) pin no decision and would run in full for
# every surviving mutant; they stay in `make test`.
DESELECT = "not fuzz and not never_crash and not never_raises"
# Modules whose selection also runs `root` tests (throw-away network namespaces). iptables: whether
# `apply` repairs drift and `cleanup` removes everything is only observable against the real iptables
# (test_apply_and_cleanup_in_a_real_namespace, a few seconds). mutmut runs a mutant's tests fastest
# first and stops at the first failure, so only the mutants the pure tests leave alive pay for it.
# Elsewhere, module -> extra `-k` deselection of slow tests that kill nothing the quicker ones miss.
WITH_ROOT: frozenset[str] = frozenset({"sidecar/egress/iptables.py"})
SLOW: dict[str, str] = {
    # 21 s of Hypothesis per surviving mutant; test_the_annotation_can_never_widen and
    # test_the_narrowing_file_can_never_widen (test_egress_attacks_parsing.py) pin the same property
    "sidecar/egress/policy.py": "test_name_forms_agree or test_annotation_never_widens",
    # the schema check of each golden fixture's output (half the selection's time): test_golden
    # compares the same output, byte for byte, with the reviewed fixture, so a mutant that changes it
    # fails there; one that leaves it alone cannot make it invalid
    "webhook/engine.py": "test_output_is_valid_kubernetes",
}


def pytest_args(module: str) -> list[str]:
    markers = MARKERS.replace(" and not root", "") if module in WITH_ROOT else MARKERS
    deselect = DESELECT + (f" and not ({SLOW[module]})" if module in SLOW else "")
    return ["-p", "no:cacheprovider", "-m", markers, "-k", deselect]


W = "tests/webhook/"
E = "tests/egress/"
I = "tests/inbound/"  # noqa: E741
X = "tests/exchange/"
P = "tests/policy/"

# module -> the fast tests that reach it, in the order `make mutation` runs them: the two longest last
MODULES: dict[str, tuple[str, ...]] = {
    "webhook/annotations.py": (
        f"{W}test_webhook_units.py",
        f"{W}test_webhook_strict.py",
        f"{W}test_webhook_resource_and_checks.py",
    ),
    "webhook/strict.py": (f"{W}test_webhook_strict.py", f"{W}test_webhook_units.py"),
    "sidecar/egress/policy.py": (
        f"{E}test_egress_policy.py",
        f"{E}test_egress_attacks_parsing.py",
        f"{E}test_egress_reload.py",
        f"{E}test_egress_plan.py",
    ),
    "sidecar/inbound/auth.py": (f"{I}test_auth.py",),
    "sidecar/inbound/sessions.py": (f"{I}test_sessions_e2e.py",),
    "sidecar/inbound/holders.py": (
        f"{I}test_holders.py",
        f"{I}test_sessions_e2e.py",
        "tests/idp/test_dpop.py",
    ),
    "sidecar/exchange/oauth.py": (
        f"{X}test_oauth_core.py",
        f"{X}test_exchange.py",
        "tests/idp/test_profiles.py",
    ),
    # the identity-provider profiles: request building and error mapping (one row for the folder)
    "sidecar/exchange/profiles/*.py": (
        "tests/idp/test_profiles.py",
        f"{X}test_oauth_core.py",
        f"{X}test_exchange.py",
    ),
    "sidecar/policy/engine.py": (f"{P}test_policy_units.py",),
    # the in-process gate tests only: the real inbound path (tests/inbound/test_policy_e2e.py) costs
    # seconds per mutant and would take the module alone past 20 minutes
    "sidecar/policy/gate.py": (f"{P}test_gate.py",),
    "sidecar/egress/iptables.py": (f"{E}test_egress_iptables_rules.py",),
    # the files that kill: inject() on pods (units, strict, patch paths, resource and checks), then the
    # golden fixtures (refusal texts, warnings); mutmut runs a mutant's tests fastest first and stops at
    # the first failure, so the fixtures cost only the mutants the unit tests leave alive. Left out:
    # meshes and sidecar mounts (a 2 s Hypothesis test per surviving mutant; on a 40-mutant sample the
    # four the unit files missed were refusal texts and warnings, which the golden fixtures pin). The
    # four unit files alone: 0.33 s per mutant (2 children) against 0.55 s for the old seven files.
    "webhook/engine.py": (
        f"{W}test_webhook_units.py",
        f"{W}test_webhook_strict.py",
        f"{W}test_webhook_patch_paths.py",
        f"{W}test_webhook_resource_and_checks.py",
        f"{W}test_webhook_injected_content.py",
        f"{W}test_webhook_native_sidecar_mcp.py",
        f"{W}test_webhook_golden.py",
        f"{W}test_webhook_odd_types.py",
    ),
}


@dataclass(frozen=True)
class Score:
    module: str
    total: int
    killed: int  # killed + timed out (a mutant that hangs the tests is caught)
    survived: int  # survivors not listed as equivalent
    equivalent: int  # survivors listed in EQUIVALENT_FILE
    no_tests: int
    minutes: float

    @property
    def score(self) -> float:
        judged = self.total - self.no_tests - self.equivalent
        return 100.0 * self.killed / judged if judged else 0.0

    def row(self) -> str:
        return (
            f"| `{self.module}` | {self.total} | {self.killed} | {self.survived} | {self.equivalent} "
            f"| {self.no_tests} | {self.score:.1f} % | {self.minutes:.1f} |"
        )

    @classmethod
    def from_row(cls, line: str, equivalent: set[str]) -> Score:
        """A row of the table, its survivors re-judged against the equivalent list (from `.mutation/`)."""
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        module = cells[0].strip("`")
        total, killed, survived, same, no_tests = (int(c) for c in cells[1:6])
        names = _survivor_names(module)
        if len(names) == survived + same:  # the survivors file is this row's: judge again
            same = sum(1 for n in names if n in equivalent)
            survived = len(names) - same
        return cls(module, total, killed, survived, same, no_tests, float(cells[-1]))


HEADER = (
    "| module | mutants | killed | survived | equivalent | no test | score | minutes |\n"
    "|---|---|---|---|---|---|---|---|"
)
EQUIVALENT_FILE = ROOT / "scripts" / "mutation-equivalent.txt"


def equivalent_mutants() -> dict[str, str]:
    """`mutant name  # why` lines: survivors judged equivalent (no input tells them apart)."""
    found: dict[str, str] = {}
    if EQUIVALENT_FILE.exists():
        for line in EQUIVALENT_FILE.read_text().splitlines():
            name, _, why = line.partition("#")
            if name.strip():
                found[name.strip()] = why.strip()
    return found


def _report_path(module: str) -> Path:
    return ROOT / ".mutation" / (module.replace("/", "_").replace("*", "all") + ".survivors.txt")


def _survivor_names(module: str) -> list[str]:
    path = _report_path(module)
    if not path.exists():
        return []
    return [
        line.partition(":")[0]
        for line in path.read_text().splitlines()
        if line.endswith(": survived") and not line.startswith(" ")
    ]


def _toml_list(items: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


PACKAGES = ("sidecar", "webhook")  # top-level folders that `outrider/` links to


def _scratch_copy(dest: Path) -> None:
    """The working tree as git sees it (tracked and new files, not the venv or caches), with the
    packages as real folders under `outrider/`.

    In the repository `outrider/sidecar` and `outrider/webhook` are symlinks to the top-level folders.
    mutmut names a mutant after its path and the tests import `outrider.sidecar...`, so the code must
    live at `outrider/sidecar/...` in the copy (mutmut walks no symlinks); the top-level names become
    links to those folders, so a test that reads a file by its repository path still finds it.
    """
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listing:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if src.is_symlink() or not src.is_file():
            continue  # outrider/{sidecar,webhook} links, or deleted but still in the index
        top, _, rest = rel.partition("/")
        target = dest / "outrider" / rel if top in PACKAGES and rest else dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    for name in PACKAGES:
        (dest / name).symlink_to(Path("outrider") / name, target_is_directory=True)


def _prepare(scratch: Path, module: str, tests: tuple[str, ...]) -> None:
    """A `[tool.mutmut]` section that mutates `module` only, and mutmut's copy of the tree."""
    # everything else tests may read (examples, manifests, docs...), as relative top-level names;
    # mutmut copies `outrider/` (the source path) and `tests/` itself
    top = sorted({p.name for p in scratch.iterdir()} - {"outrider", "tests", *PACKAGES})
    assert all(name and "/" not in name and name not in (".", "..") for name in top), top
    config = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["outrider"]',
            f"only_mutate = {_toml_list(['outrider/' + module])}",
            f"also_copy = {_toml_list(top)}",
            f"pytest_add_cli_args = {_toml_list(pytest_args(module))}",
            f"pytest_add_cli_args_test_selection = {_toml_list(tests)}",
            "use_git_change_detection = false",
            # workers fork from a process that never ran a test: the sidecar tests leave gRPC threads
            # behind (OTLP exporter, Workload API client), and a child forked from such a process hangs
            'process_isolation = "forkserver"',
            "",
        ]
    )
    with (scratch / "pyproject.toml").open("a") as fh:
        fh.write(config)
    mutants = scratch / "mutants"
    mutants.mkdir()
    for name in PACKAGES:
        (mutants / name).symlink_to(Path("outrider") / name, target_is_directory=True)


_SHOW = """
import sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
for name in sys.argv[1:]:
    try:
        diff = get_diff_for_mutant(name)
    except Exception as exc:  # a mutant mutmut cannot show (e.g. "no tests" bookkeeping)
        diff = f"({type(exc).__name__})"
    sys.stdout.write("\\0" + name + "\\n" + diff + "\\n")
"""


def _env() -> dict[str, str]:
    # PYTHONPATH could put the checkout (the unmutated code) before mutmut's copy
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1"}


def run_module(module: str, tests: tuple[str, ...], children: int, keep: bool) -> Score:
    scratch = Path(tempfile.mkdtemp(prefix=f"outrider-mutation-{os.getpid()}-"))
    try:
        _scratch_copy(scratch)
        _prepare(scratch, module, tests)
        mutmut = Path(sys.executable).parent / "mutmut"
        log = scratch / "mutmut.log"
        started = time.monotonic()
        with log.open("w") as out:
            subprocess.run(
                # mutmut's own `run`, with each mutant's tests fastest first and in two rounds
                [sys.executable, str(RUN), "run", "--max-children", str(children)],
                cwd=scratch,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
                env=_env(),
            )
        minutes = (time.monotonic() - started) / 60
        subprocess.run([str(mutmut), "export-cicd-stats"], cwd=scratch, capture_output=True, check=False)
        stats_path = scratch / "mutants" / "mutmut-cicd-stats.json"
        if not stats_path.exists():
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"mutmut produced no results for {module}; its log ends with:\n{tail}")
        stats = json.loads(stats_path.read_text())
        survivors = subprocess.run(
            [str(mutmut), "results"], cwd=scratch, capture_output=True, text=True, check=False
        ).stdout
        report = _report_path(module)
        report.parent.mkdir(exist_ok=True)
        listed = [line.strip() for line in survivors.splitlines() if line.strip()]
        # One process for every diff (`mutmut show` per survivor costs a second or two each).
        shown = subprocess.run(
            [sys.executable, "-c", _SHOW, *(line.partition(":")[0] for line in listed)],
            cwd=scratch,
            capture_output=True,
            text=True,
            check=False,
            env=_env(),
        ).stdout
        diffs = dict(part.split("\n", 1) for part in shown.split("\0")[1:])
        with report.open("w") as fh:
            for line in listed:
                diff = diffs.get(line.partition(":")[0], "").splitlines()
                fh.write(f"{line}\n" + "".join(f"    {d}\n" for d in diff if d[:2] in ("- ", "+ ")))
        if keep:
            print(f"[mutation] kept {scratch}")
        equivalent = equivalent_mutants()
        same = sum(1 for name in _survivor_names(module) if name in equivalent)
        # a run stopped early (Ctrl-C, or a time limit) leaves mutants "not checked": the row counts
        # the checked ones only, and says so
        outcomes = ("killed", "survived", "no_tests", "skipped", "suspicious", "timeout", "segfault")
        checked = sum(int(stats.get(k, 0)) for k in outcomes)
        if checked < stats["total"]:
            print(f"[mutation] {module}: stopped with {checked} of {stats['total']} mutants checked")
        return Score(
            module,
            checked,
            stats["killed"] + stats["timeout"],
            stats["survived"] - same,
            same,
            stats["no_tests"],
            minutes,
        )
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)


def write_doc(scores: list[Score], minutes: float) -> None:
    """Rewrite the table between the markers: this run's rows, earlier rows re-judged, the total."""
    equivalent = set(equivalent_mutants())
    text = DOC.read_text() if DOC.exists() else f"# Testing\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    table, _, tail = rest.partition(END)
    rows: dict[str, Score] = {}
    for line in table.splitlines():
        if line.startswith("| `"):
            score = Score.from_row(line, equivalent)
            rows[score.module] = score
    for score in scores:
        rows[score.module] = score
    ordered = [rows[m] for m in MODULES if m in rows]
    total = sum(r.minutes for r in ordered)
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    last = (
        f"Last run {stamp}: {len(scores)} module(s) in {minutes:.1f} min (`nice -n 10`, "
        f"{os.environ.get('MUTATION_CHILDREN', '2')} children)."
    )
    if not scores:  # --table: only re-judged, the last run stays what it was
        _, found, said = table.partition(" Last run ")
        last = "Last run " + said.strip() if found else last
    body = (
        f"\n{HEADER}\n"
        + "\n".join(r.row() for r in ordered)
        + f"\n\nSum of the rows: {total:.1f} min for {len(ordered)} of {len(MODULES)} modules. {last}\n"
    )
    text = head + BEGIN + body + END + tail
    if LIST_BEGIN in text and LIST_END in text:
        before, _, rest = text.partition(LIST_BEGIN)
        _, _, after = rest.partition(LIST_END)
        text = (
            before
            + LIST_BEGIN
            + "\n"
            + _survivor_list(ordered, rest.partition(LIST_END)[0])
            + LIST_END
            + after
        )
    DOC.write_text(text)


def _module_prefix(module: str) -> str:
    """How a module's mutants are named: `webhook/engine.py` -> `webhook.engine.`,
    `sidecar/exchange/profiles/*.py` -> `sidecar.exchange.profiles.`."""
    return module.removesuffix(".py").removesuffix("*").replace("/", ".").rstrip(".") + "."


def _survivor_list(rows: list[Score], listed: str = "") -> str:
    """Every survivor of the rows' last runs: the equivalent ones with why, then the others. A module
    whose survivors file is not here (run on another machine or checkout) keeps its lines from
    `listed`, the list as docs/testing.md holds it now."""
    equivalent = equivalent_mutants()
    same: list[str] = []
    left: list[str] = []
    for row in rows:
        if not _report_path(row.module).exists():
            prefix = "`" + _module_prefix(row.module)
            for line in listed.splitlines():
                if line.startswith("| " + prefix):
                    same.append(line)
                elif line.startswith("- " + prefix):
                    left.append(line)
            continue
        for name in _survivor_names(row.module):
            short = name.removeprefix("outrider.")
            if name in equivalent:
                same.append(f"| `{short}` | {equivalent[name]} |")
            else:
                left.append(f"- `{short}`")
    out = "\n| equivalent mutant | why no test can kill it |\n|---|---|\n" + "\n".join(same) + "\n"
    if left:
        out += "\nNot killed and not judged equivalent (see the notes below):\n\n" + "\n".join(left) + "\n"
    return out


def _root_test_needs() -> str:
    """Why the `root` tests of a WITH_ROOT module would skip here ("" when they can run)."""
    if os.geteuid() != 0:
        return "not root"
    absent = [tool for tool in ("iptables", "ip6tables", "ip") if shutil.which(tool) is None]
    return f"{', '.join(absent)} not installed" if absent else ""


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="scripts/mutation.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--keep", action="store_true", help="keep each module's scratch copy")
    parser.add_argument("--table", action="store_true", help="only re-judge the doc's rows (no run)")
    args = parser.parse_args(argv)
    if args.table:  # re-judge the rows in docs/testing.md against the equivalent list
        write_doc([], 0.0)
        return 0
    keep = args.keep
    wanted = args.modules or list(MODULES)
    unknown = [m for m in wanted if m not in MODULES]
    if unknown:
        print(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    if not (Path(sys.executable).parent / "mutmut").exists():
        print(
            "mutmut is not installed in this environment: run `make mutation` (it installs it)",
            file=sys.stderr,
        )
        return 2
    missing = _root_test_needs()
    for module in (m for m in wanted if m in WITH_ROOT and missing):
        # its real-namespace test would skip in every mutant: the mutants only it kills would show as
        # survivors (a fresh machine without iptables did exactly that)
        print(
            f"[mutation] warning: {module}'s real-namespace test will skip ({missing}); its row will "
            "show survivors that test kills. `make mutation` as root installs iptables (make sysdeps).",
            file=sys.stderr,
        )
    children = int(os.environ.get("MUTATION_CHILDREN", "2"))
    started = time.monotonic()
    scores: list[Score] = []
    print(HEADER, flush=True)
    for module in wanted:
        score = run_module(module, MODULES[module], children, keep)
        scores.append(score)
        print(score.row(), flush=True)
        write_doc(scores, (time.monotonic() - started) / 60)
    print(
        f"[mutation] {len(scores)} module(s) in {(time.monotonic() - started) / 60:.1f} min; "
        f"survivors in .mutation/*.survivors.txt; table in {DOC.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
