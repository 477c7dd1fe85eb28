"""Values of the wrong type anywhere in a pod: what a YAML manifest given to `outrider inject` holds
(`value: 5` is an int, `name: [a]` a list; the API server's typed decoding never sees it). The
engine must answer with a refusal or an injection, never raise: the CLI printed a traceback and
the webhook answered "internal error" for such pods.
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from webhook_support import BASE_CONFIG, GOLDEN_DIR, load_fixture, pod_template, templated_fixture_names

from outrider.webhook.config import parse_config
from outrider.webhook.engine import inject

ODD_VALUES: list[Any] = [None, "1", 1, -1, 0, 1.5, True, False, [], {}, "", [None], [{}], {"name": 1}, ["a"]]
MUTANTS_PER_FIXTURE = 12


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _set(document: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


@pytest.mark.parametrize("name", templated_fixture_names())
def test_odd_value_types_anywhere_in_a_fixture_never_make_the_engine_raise(name: str) -> None:
    doc, labels, config = load_fixture(name)
    template = doc if doc["kind"] == "Pod" else pod_template(doc)
    pod = {"metadata": template.get("metadata"), "spec": template.get("spec")}
    rng = random.Random(name)  # the same mutants on every run
    for _ in range(MUTANTS_PER_FIXTURE):
        mutant = copy.deepcopy(pod)
        changed = []
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(list(_paths(mutant)))
            _set(mutant, path, copy.deepcopy(rng.choice(ODD_VALUES)))
            changed.append(path)
        result = inject(copy.deepcopy(mutant), labels, config)
        assert result.allowed or result.message, changed
        if result.patch:
            assert jsonpatch.apply_patch(mutant, result.patch) == result.pod, changed
            again = inject(result.pod, labels, config)
            assert again.allowed and again.patch == [], changed


def _outrider_inject(
    tmp_path: Path, manifest: str, config: dict[str, Any], labels: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pod.yaml").write_text(manifest)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "outrider.webhook.cli", "inject", "-f", str(tmp_path / "pod.yaml")]
    command += ["--config", str(tmp_path / "config.yaml"), "--namespace-labels", labels]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_an_unquoted_yaml_value_in_an_injected_pod_is_refused_clearly(tmp_path: Path) -> None:
    """A strict namespace re-checks an injected pod's sidecar config: `value: 5` (an int) crashed it."""
    strict = (GOLDEN_DIR / "already-injected-strict.yaml").read_text()
    config_env = strict.index("- name: OUTRIDER_CONFIG")
    value_start = strict.index("value:", config_env)
    value_end = strict.index("\n    ports:", value_start)
    manifest = strict[:value_start] + "value: 5" + strict[value_end:]
    for broken in (manifest, manifest.replace("- name: OUTRIDER_CONFIG", "- name: [OUTRIDER_CONFIG]")):
        result = _outrider_inject(tmp_path, broken, BASE_CONFIG, "outrider.dev/inject=strict")
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 1
        assert (
            "error: Pod/weather-mcp: metadata.annotations[outrider.dev/status] says the pod is injected"
            in (result.stderr)
        )


def test_a_pull_secret_whose_name_is_not_a_string_does_not_crash_inject(tmp_path: Path) -> None:
    manifest = """\
apiVersion: v1
kind: Pod
metadata: {name: p, annotations: {outrider.dev/inject: "true"}}
spec:
  imagePullSecrets: [{name: [regcred]}]
  containers: [{name: app, image: x, ports: [{containerPort: 8080}]}]
"""
    config = {**BASE_CONFIG, "image_pull_secrets": ["regcred"]}
    result = _outrider_inject(tmp_path, manifest, config, "outrider.dev/inject=enabled")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0
    spec = yaml.safe_load(result.stdout)["spec"]
    assert spec["imagePullSecrets"] == [{"name": ["regcred"]}, {"name": "regcred"}]


@pytest.mark.parametrize("entry", ["OUTRIDER_CONFIG", {}, {"value": "x"}, {"name": 5, "value": "x"}, None])
def test_an_injected_pods_odd_env_entries_never_make_the_strict_recheck_raise(entry: Any) -> None:
    """In process, so mutation testing sees it: entries that are not a named variable are skipped."""
    doc, labels, config = load_fixture("already-injected-strict")
    spec = doc["spec"]
    proxy = next(c for c in [*spec["initContainers"], *spec["containers"]] if c["name"] == "outrider-proxy")
    proxy["env"].insert(0, entry)
    result = inject(copy.deepcopy(doc), labels, config)
    assert result.allowed or result.message
    assert inject(copy.deepcopy(doc), labels, config) == result


@pytest.mark.parametrize("entry", ["regcred", None, 5, ["regcred"], {"name": ["regcred"]}])
def test_odd_pull_secret_entries_are_kept_and_ours_added(entry: Any) -> None:
    config = parse_config({**BASE_CONFIG, "image_pull_secrets": ["regcred"]})
    spec = {"imagePullSecrets": [entry], "containers": [{"name": "app", "image": "x"}]}
    pod = {"metadata": {"name": "p"}, "spec": spec}
    result = inject(copy.deepcopy(pod), {"outrider.dev/inject": "enabled"}, config)
    assert result.allowed, result.message
    assert result.pod["spec"]["imagePullSecrets"] == [entry, {"name": "regcred"}]
    assert jsonpatch.apply_patch(pod, result.patch) == result.pod
