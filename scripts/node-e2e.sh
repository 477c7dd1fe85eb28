#!/usr/bin/env bash
# `make node-e2e`: Outrider as real pods on the one-node cluster of `make node`.
#   node up (if needed) -> make images (built and imported into the node's containerd)
#   -> the in-cluster test module tests/cluster (installs Outrider from manifests/overlays/node as
#      the README says, SPIRE registration, the dev IdP and egress targets as pods, then every check)
#   -> figures (pod start latency injected vs not, sidecar memory idle / after 1,000 calls) and wall time.
# Env: PYTEST_ARGS (extra pytest arguments), OUTRIDER_E2E_KEEP=1 keeps the test namespaces,
# OUTRIDER_KEEP_NODE=1 keeps a node this run brought up (by default it is taken down again, with
# `make node-down`, so the machine is left as it was found).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/.venv/bin"
NODE_DIR="${OUTRIDER_NODE_DIR:-/var/lib/outrider-node}"
START=$SECONDS
rc=0
log() { printf '[node-e2e] %s\n' "$*" >&2; }

cd "$ROOT"
if [[ ! -d "$ROOT/localnode" ]]; then
  log "this checkout has no localnode package (make node): cannot bring the node up"; exit 2
fi
t=$SECONDS
if "$BIN/python" -m localnode status >/dev/null 2>&1; then
  log "the node is up"
else
  log "bringing the node up (make node)"
  if [[ "${OUTRIDER_KEEP_NODE:-0}" != 1 ]]; then
    trap 'st=$?; log "taking the node down again (OUTRIDER_KEEP_NODE=1 keeps it)"; "$BIN/python" -m localnode down || st=1; exit $st' EXIT
  fi
  "$BIN/python" -m localnode up
fi
node_s=$((SECONDS - t))

t=$SECONDS
log "building and loading the images (make images)"
CONTAINERD_ADDRESS="$NODE_DIR/run/containerd.sock" scripts/build-images.sh build
images_s=$((SECONDS - t))

t=$SECONDS
export KUBECONFIG="${KUBECONFIG:-$NODE_DIR/kubeconfig}" OUTRIDER_CLUSTER_E2E=1
log "running the in-cluster test module against $KUBECONFIG"
rc=0
# shellcheck disable=SC2086
"$BIN/pytest" tests/cluster -v -s -p no:cacheprovider ${PYTEST_ARGS:-} || rc=$?
tests_s=$((SECONDS - t))
log "wall time: node ${node_s} s, images ${images_s} s, tests ${tests_s} s, total $((SECONDS - START)) s"
exit $rc
