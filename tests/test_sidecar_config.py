"""The sidecar's configuration as a whole: unknown keys are errors in every section, enumerations are
checked, and the section parsers no longer import `outrider.sidecar.config` (ConfigError lives in a leaf)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from outrider.sidecar.config import ConfigError, load, parse, validate
from outrider.sidecar.config_error import ConfigError as LeafConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"pod": {"nmae": "x"}}, "pod: unknown key(s) ['nmae']"),
        ({"admin": {"prot": 1}}, "admin: unknown key(s) ['prot']"),
        ({"identity": {"sockett": "unix:///x"}}, "identity: unknown key(s) ['sockett']"),
        ({"inbound": {"isuer": "https://idp"}}, "inbound: unknown key(s) ['isuer']"),
        # The mistake of the issue: a typo that silently meant "mTLS off".
        ({"inbound": {"mtls": {"enabeld": True}}}, "inbound.mtls: unknown key(s) ['enabeld']"),
        ({"exchange": {"token_endpiont": "https://x"}}, "exchange: unknown key(s) ['token_endpiont']"),
        ({"egress": {"mdoe": "capture"}}, "egress: unknown key(s) ['mdoe']"),
        ({"telemetry": {"audti": "off"}}, "telemetry: unknown key(s) ['audti']"),
        ({"inbound": {"mtls": "yes"}}, "inbound.mtls must be a mapping"),
        ({"admin": {"port": True}}, "admin.port"),
        ({"admin": {"host": 5}}, "admin.host"),
        ({"pod": {"name": 3}}, "pod.name"),
        ({"egress": {"mode": "transparent"}}, "egress.mode: 'transparent' is not one of"),
        ({"exchange": {"auth": "mtls"}}, "exchange.auth: 'mtls' is not one of"),
        ({"telemetry": {"audit": "syslog"}}, "telemetry.audit: 'syslog' is not valid"),
        ({"telemetry": {"audit": "audit.jsonl"}}, "an absolute file path"),
        ({"telemetry": {"audit": "STDOUT"}}, "lower case"),
        ({"telemetry": {"audit": "/var/log/"}}, "telemetry.audit"),
        ({"telemetry": {"audit": 1}}, "telemetry.audit"),
        ({"inbund": {}}, "unknown sidecar config section(s) ['inbund']"),
    ],
)
def test_every_section_names_the_bad_key(raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert fragment in str(err.value)


@pytest.mark.parametrize("audit", ["stdout", "off", "/var/log/outrider/audit.jsonl", " /tmp/a.jsonl "])
def test_audit_destinations_allowed(audit: str) -> None:
    assert parse({"telemetry": {"audit": audit}}).telemetry.audit == audit.strip()


def test_audit_word_does_not_create_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUTRIDER_CONFIG", json.dumps({"telemetry": {"audit": "syslog"}}))
    with pytest.raises(ConfigError, match=r"telemetry\.audit"):
        load()
    assert list(tmp_path.iterdir()) == []


def test_mtls_enabled_still_parses() -> None:
    config = parse({"inbound": {"mtls": {"enabled": True, "allowed_trust_domains": ["example.org"]}}})
    assert config.inbound.mtls.enabled and config.inbound.mtls.allowed_trust_domains == ("example.org",)


def test_one_error_type_from_a_leaf_module() -> None:
    assert ConfigError is LeafConfigError
    # No section parser imports outrider.sidecar.config (the cycle conventions.md asks to remove).
    for path in sorted((REPO / "sidecar").glob("*/config.py")):
        tree = ast.parse(path.read_text())
        imported = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "outrider.sidecar.config" not in imported, path
        assert "outrider.sidecar.config_error" in imported, path


NON_FINITE = [float("inf"), float("-inf"), float("nan")]
INTEGER_KEYS = [
    ("admin", "port"),
    ("inbound", "port"),
    ("inbound", "max_body_bytes"),
    ("inbound", "token_cache_size"),
    ("egress", "port"),
    ("egress", "max_tunnels"),
    ("exchange", "cache_size"),
]


@pytest.mark.parametrize("value", NON_FINITE, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize(("section", "key"), INTEGER_KEYS)
def test_non_finite_numbers_for_integer_keys_are_config_errors(section: str, key: str, value: float) -> None:
    """YAML `.inf`/`.nan` (the webhook's `sidecar:` block) and JSON `Infinity`/`NaN` (OUTRIDER_CONFIG,
    which Python's json reads) crashed start-up and `outrider inject` with an OverflowError or
    ValueError traceback instead of an error naming the key."""
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        validate({section: {key: value}})


def test_infinity_in_outrider_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"inbound\.port"):
        load(env={"OUTRIDER_CONFIG": '{"inbound": {"port": Infinity}}'})
