"""Each production image's requirement set is what its commands import: nothing missing, nothing extra.

The sets (images/requirements/*.txt) are shares of pyproject.toml's dependencies, so `pip install
outrider` keeps every command while each image installs only its own. Pure: the repository's code
and this virtualenv's installed metadata, no image build.
"""

from __future__ import annotations

import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.images.imports import closure, installed_with, owner, requirement_lines
from tests.images.plan import PLANS, ROOT, SIDECAR, WEBHOOK, ImagePlan


def _pyproject_dependencies() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {canonicalize_name(r.name): r for r in map(Requirement, data["project"]["dependencies"])}


def _imported_distributions(plan: ImagePlan) -> dict[str, str]:
    """distribution -> one import of it that the image's commands can reach."""
    _own, external = closure(plan.entries)
    found: dict[str, str] = {}
    for name in sorted(external):
        dist = owner(name)
        if dist is None and any(other.startswith(name + ".") for other in external):
            continue  # a namespace package (`from opentelemetry import trace`): its modules count
        assert dist is not None, f"{name} (imported by the {plan.name} image's code) is not installed here"
        found.setdefault(dist, name)
    return found


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_every_line_is_a_pyproject_dependency(plan: ImagePlan) -> None:
    deps = _pyproject_dependencies()
    for req in requirement_lines(plan.requirements):
        name = canonicalize_name(req.name)
        assert name in deps, f"{plan.requirements.name}: {req} is not in pyproject.toml's dependencies"
        assert req.specifier == deps[name].specifier, f"{req}: pyproject.toml says {deps[name]}"
        assert req.extras <= deps[name].extras, f"{req}: pyproject.toml says {deps[name]}"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_the_set_installs_everything_the_commands_import(plan: ImagePlan) -> None:
    installed = installed_with(requirement_lines(plan.requirements))
    missing = {d: via for d, via in _imported_distributions(plan).items() if d not in installed}
    assert not missing, f"the {plan.name} image would lack {missing} (distribution: an import of it)"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_every_line_is_needed(plan: ImagePlan) -> None:
    imported = _imported_distributions(plan)
    needed = installed_with(Requirement(d) for d in imported)
    needed |= plan.for_testkit
    extra = [str(r) for r in requirement_lines(plan.requirements) if canonicalize_name(r.name) not in needed]
    assert not extra, f"the {plan.name} image's commands never import {extra} (nor does anything they import)"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_nothing_of_the_other_image_or_the_dev_tools_comes_along(plan: ImagePlan) -> None:
    installed = installed_with(requirement_lines(plan.requirements))
    assert not (installed & plan.absent), sorted(installed & plan.absent)


def test_the_split_is_real() -> None:
    # the figures the images are lean by: kubernetes-asyncio (~48 MB) only in the webhook's set,
    # the SPIFFE Workload API client and the JWT/DNS libraries only in the sidecar's
    sidecar = installed_with(requirement_lines(SIDECAR.requirements))
    webhook = installed_with(requirement_lines(WEBHOOK.requirements))
    assert "kubernetes-asyncio" in webhook and "kubernetes-asyncio" not in sidecar
    assert {"spiffe", "pyjwt", "dnspython"} <= sidecar
    assert not ({"spiffe", "pyjwt", "dnspython"} & webhook)
    # and pyproject.toml still installs both for `pip install outrider`
    deps = set(_pyproject_dependencies())
    for plan in PLANS:
        assert {canonicalize_name(r.name) for r in requirement_lines(plan.requirements)} <= deps
