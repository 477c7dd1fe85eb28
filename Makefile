# Outrider — every target installs what it needs by itself (virtualenv, Debian packages, cached Go builds).
SHELL := bash
# The venv's interpreter must be runnable by every UID (tests run apps as UID 1000, the sidecar as 15337):
# scripts/pick-python.sh picks one (PYTHON=... to choose; it is checked the same way).
PYTHON ?=
VENV := .venv
BIN := $(VENV)/bin
BASE_PYTHON := $(shell PYTHON='$(PYTHON)' scripts/pick-python.sh 2>/dev/null)
STAMP := $(VENV)/.installed-$(shell { cat pyproject.toml; echo '$(BASE_PYTHON)'; } | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: help venv sysdeps lint fmt typecheck test test-fast demo certs controlplane spire \
        mutation bench bench-webhook bench-proxy bench-telemetry bench-egress bench-policy bench-idp bench-memory bench-capacity kind-e2e clean \
        images images-push node-e2e node node-down node-test

help:
	@echo "make test        lint + mypy + the whole test suite (builds/caches real upstream parts)"
	@echo "make demo        the end-to-end Outrider story on this machine"
	@echo "make node        a real one-node Kubernetes with SPIRE on this machine (root; docs/node.md)"
	@echo "make node-down   remove it and restore the host"
	@echo "make images      build the sidecar, webhook, example MCP and testkit images + SBOMs (buildah, syft; no Docker)"
	@echo "make node-e2e    Outrider as real pods on the one-node cluster: the in-cluster test module"
	@echo "make mutation    mutation testing of the decision modules (slow; MODULES=... to pick; docs/testing.md)"
	@echo "make lint|fmt|typecheck|certs|controlplane|spire|bench|kind-e2e|node-test|images-push"

$(STAMP): pyproject.toml
	@test -n '$(BASE_PYTHON)' || PYTHON='$(PYTHON)' scripts/pick-python.sh >/dev/null
	@if test -e $(BIN)/python && test "$$(readlink -f $(BIN)/python)" != '$(BASE_PYTHON)'; then \
	  echo "[make] $(VENV) runs $$(readlink -f $(BIN)/python), not $(BASE_PYTHON); recreating it"; rm -rf $(VENV); fi
	@test -x $(BIN)/python || { echo "[make] creating $(VENV) from $(BASE_PYTHON)"; '$(BASE_PYTHON)' -m venv $(VENV); }
	@echo "[make] installing outrider and its dev dependencies into $(VENV)"
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP)

sysdeps:
	@scripts/ensure-sysdeps.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: venv
	$(BIN)/mypy

controlplane:
	@scripts/build-upstream.sh controlplane

spire:
	@scripts/build-upstream.sh spire

# The whole suite, then Outrider as real pods on the real one-node cluster (tests/node, then
# tests/cluster through node-e2e, which takes a node it brought up down again).
test: venv sysdeps lint typecheck
	@# Everything the suites run is built first, with its progress shown, never inside a test's fixture under
	@# a 600 s timeout (a fresh machine timed out there twice): the upstream parts, the images (tests/images
	@# runs their entrypoints with runc) and the one-node cluster's own parts (kubelet, CoreDNS, the SPIFFE
	@# CSI driver, spire-controller-manager...). scripts/prebuild.sh fetches what is network- or disk-bound
	@# (node packages, image bases, Go modules, Keycloak) while Go compiles. Without root only the upstream
	@# parts are built and the image and node tests skip.
	@scripts/prebuild.sh
	$(BIN)/pytest -m "not node" $(PYTEST_ARGS)
	$(BIN)/pytest -m node tests/node $(PYTEST_ARGS)
	@scripts/node-e2e.sh

test-fast: venv
	$(BIN)/pytest -m "not controlplane and not spire and not keycloak and not root and not kubeyaml and not node" $(PYTEST_ARGS)

# Mutation testing (mutmut 3) of the modules that decide allow/deny; not part of `make test` (it is slow).
# MODULES="webhook/strict.py sidecar/egress/policy.py" runs some of them; the table goes to docs/testing.md.
MODULES ?=
mutation: venv sysdeps
	@$(BIN)/python -c 'import mutmut' 2>/dev/null || $(BIN)/python -m pip install -q 'mutmut>=3.8,<4'
	nice -n 10 $(BIN)/python scripts/mutation.py $(MODULES)

certs: venv
	$(BIN)/outrider certs --out certs

demo: venv sysdeps
	$(BIN)/outrider demo $(if $(SPIRE),--spire,)

# matplotlib draws the capacity curves into docs/: a benchmark tool, never a runtime dependency.
BENCH_PLOTS := $(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install -q 'matplotlib>=3.8'

bench: venv sysdeps
	@$(BENCH_PLOTS)
	$(BIN)/python bench/run_all.py

bench-memory: venv
	$(BIN)/python bench/bench_memory.py

bench-capacity: venv
	@$(BENCH_PLOTS)
	$(BIN)/python bench/bench_capacity.py

bench-webhook: venv
	$(BIN)/python bench/bench_webhook.py

bench-proxy: venv
	$(BIN)/python bench/bench_proxy.py --telemetry both

bench-telemetry: venv
	$(BIN)/python bench/bench_telemetry.py
	$(BIN)/python bench/bench_telemetry.py --proxy

bench-idp: venv
	$(BIN)/python bench/bench_idp.py

bench-egress: venv sysdeps
	$(BIN)/python bench/bench_egress.py

bench-policy: venv sysdeps
	$(BIN)/python bench/bench_policy.py

node: venv
	@OUTRIDER_NODE_DEPS=1 scripts/ensure-sysdeps.sh
	@$(BIN)/python -m localnode up

node-down: venv
	@$(BIN)/python -m localnode down

node-test: venv
	@OUTRIDER_NODE_DEPS=1 scripts/ensure-sysdeps.sh
	@if [ "$$(id -u)" = 0 ]; then scripts/build-node.sh >/dev/null; fi
	$(BIN)/pytest -m node tests/node $(PYTEST_ARGS)

kind-e2e: venv
	@scripts/kind-e2e.sh

# IMAGE_REPO (default localhost/outrider-dev) and IMAGE_TAG (default: the project version) name the images
images:
	@scripts/build-images.sh build

images-push:
	@scripts/build-images.sh push

node-e2e: venv sysdeps
	@OUTRIDER_NODE_DEPS=1 scripts/ensure-sysdeps.sh
	@scripts/node-e2e.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
