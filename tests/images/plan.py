"""What each production image is for: its commands, the modules they start from, its requirement set.

The image tests (file lists, SBOMs, requirement sets) all read this one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ImagePlan:
    name: str
    commands: tuple[str, ...]
    entries: tuple[str, ...]  # the modules its commands start in (outrider.webhook.cli always)
    requirements: Path
    # distributions that must not be installed in it (the other image's, the dev and test tools)
    absent: frozenset[str]
    # installed although its own commands never import them: the test-only image built on top of it
    # (images/testkit.Dockerfile, which has no pip) runs code that does
    for_testkit: frozenset[str] = frozenset()


DEV_TOOLS = frozenset(
    {
        "pytest",
        "pytest-asyncio",
        "pytest-timeout",
        "hypothesis",
        "mcp",
        "ruff",
        "mypy",
        "kubernetes-validate",
        "jsonschema",
        "types-pyyaml",
        "types-protobuf",
        "pip",
        "setuptools",
        "wheel",
        "uvicorn",
        "jsonpatch",
    }
)

SIDECAR = ImagePlan(
    name="sidecar",
    commands=("sidecar", "iptables"),
    entries=("outrider.webhook.cli", "outrider.sidecar.main", "outrider.sidecar.egress.iptables_cli"),
    requirements=ROOT / "images/requirements/sidecar.txt",
    absent=DEV_TOOLS | {"kubernetes-asyncio", "prometheus-client"},
    # the dev Workload API (sidecar/dev/workload_api.py) serves py-spiffe's generated messages; the
    # sidecar itself reads them with its own codec (sidecar/identity/workload_messages.py)
    for_testkit=frozenset({"spiffe"}),
)

WEBHOOK = ImagePlan(
    name="webhook",
    commands=("webhook", "check", "inject", "certs"),
    entries=(
        "outrider.webhook.cli",
        "outrider.webhook.server_cli",
        "outrider.webhook.check.cli",
        "outrider.webhook.offline",
        "outrider.webhook.certs",
    ),
    requirements=ROOT / "images/requirements/webhook.txt",
    absent=DEV_TOOLS | {"spiffe", "pyjwt", "dnspython", "coredis"},
)

PLANS = (SIDECAR, WEBHOOK)
