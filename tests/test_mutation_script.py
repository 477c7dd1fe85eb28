"""scripts/mutation.py's survivor list in docs/testing.md, when only some modules were run here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mutation.py"


@pytest.fixture
def mutation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("outrider_mutation_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    equivalent = tmp_path / "equivalent.txt"
    equivalent.write_text(
        "outrider.webhook.engine.x_apply__mutmut_7  # fresh reason\n"
        "outrider.sidecar.exchange.profiles.okta.x_f__mutmut_1  # kept reason\n"
    )
    monkeypatch.setattr(module, "EQUIVALENT_FILE", equivalent)
    return module


def _score(mutation: ModuleType, name: str) -> object:
    return mutation.Score(name, 10, 8, 1, 1, 0, 1.0)


def test_a_module_not_run_here_keeps_its_listed_survivors(mutation: ModuleType, tmp_path: Path) -> None:
    """Running one module on a checkout without the others' survivors files must not drop their lines."""
    reports = tmp_path / ".mutation"
    reports.mkdir()
    (reports / "webhook_engine.py.survivors.txt").write_text(
        "outrider.webhook.engine.x_apply__mutmut_7: survived\n"
        "outrider.webhook.engine.x_apply__mutmut_9: survived\n"
    )
    listed = (
        "| equivalent mutant | why no test can kill it |\n|---|---|\n"
        "| `webhook.engine.x_old__mutmut_1` | stale: the engine was run again |\n"
        "| `sidecar.exchange.profiles.okta.x_f__mutmut_1` | kept reason |\n"
        "| `sidecar.policy.gate.x_g__mutmut_2` | a module not among the rows |\n"
        "- `sidecar.exchange.profiles.entra_obo.x_h__mutmut_3`\n"
    )
    rows = [_score(mutation, "sidecar/exchange/profiles/*.py"), _score(mutation, "webhook/engine.py")]
    out = mutation._survivor_list(rows, listed)
    assert "| `sidecar.exchange.profiles.okta.x_f__mutmut_1` | kept reason |" in out
    assert "- `sidecar.exchange.profiles.entra_obo.x_h__mutmut_3`" in out
    assert "| `webhook.engine.x_apply__mutmut_7` | fresh reason |" in out
    assert "- `webhook.engine.x_apply__mutmut_9`" in out
    assert "x_old__mutmut_1" not in out  # the module that ran here is listed from its new run only
    assert "x_g__mutmut_2" not in out  # a module not among the rows


def test_module_prefixes_are_how_mutants_are_named(mutation: ModuleType) -> None:
    assert mutation._module_prefix("webhook/engine.py") == "webhook.engine."
    assert mutation._module_prefix("sidecar/exchange/profiles/*.py") == "sidecar.exchange.profiles."
