#!/usr/bin/env bash
# `make kind-e2e`: Outrider on a real (kind) cluster, for machines with Docker.
#   kind cluster -> docker build + kind load of the images (the same Dockerfiles and names as
#   `make images`) -> SPIRE (server, agent, SPIFFE CSI driver, controller manager)
#   -> the in-cluster test module tests/cluster, the SAME one `make node-e2e` runs on the one-node
#      cluster (it installs Outrider from manifests/overlays/node as the README says)
#   -> the example MCP server (manifests/overlays/kind + manifests/examples) becomes Ready injected.
# Env: CLUSTER (outrider-e2e), KIND_NODE_IMAGE, KEEP_CLUSTER=1 to leave the cluster running.
set -euo pipefail

CLUSTER="${CLUSTER:-outrider-e2e}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.34.0}"
SPIRE_CHART_VERSION="${SPIRE_CHART_VERSION:-0.27.0}"
SPIRE_CRDS_CHART_VERSION="${SPIRE_CRDS_CHART_VERSION:-0.5.0}"
TRUST_DOMAIN="${TRUST_DOMAIN:-cluster.local}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KCTX="kind-$CLUSTER"

log() { printf '[kind-e2e] %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null || { log "$1 is required: $2"; exit 2; }; }
k() { kubectl --context "$KCTX" "$@"; }

need docker "https://docs.docker.com/engine/install/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need helm "https://helm.sh/docs/intro/install/"
docker info >/dev/null 2>&1 || { log "the Docker engine is not running"; exit 2; }

cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    log "FAILED; state for debugging:"
    k get pods -A -o wide || true
    k -n outrider-system logs -l app.kubernetes.io/name=outrider-webhook --tail=50 || true
    k -n mcp-demo describe pods || true
  fi
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  else log "cluster kept: kubectl --context $KCTX ..."; fi
  exit $rc
}
trap cleanup EXIT

if ! kind get clusters | grep -qx "$CLUSTER"; then
  log "creating kind cluster $CLUSTER ($KIND_NODE_IMAGE)"
  kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --wait 120s
fi

log "building images"
eval "$("$ROOT/scripts/build-images.sh" names)"   # sidecar=... webhook=... mcp=... testkit=... (IMAGE_REPO, IMAGE_TAG)
docker build -q -f "$ROOT/images/webhook.Dockerfile" -t "$webhook" "$ROOT" >/dev/null
docker build -q -f "$ROOT/images/sidecar.Dockerfile" -t "$sidecar" "$ROOT" >/dev/null
docker build -q -f "$ROOT/images/mcp-example.Dockerfile" -t "$mcp" "$ROOT" >/dev/null
# tests only: the sidecar image + the dev IdP the in-cluster tests run as a pod
docker build -q -f "$ROOT/images/testkit.Dockerfile" --build-arg "SIDECAR_IMAGE=$sidecar" -t "$testkit" "$ROOT" >/dev/null
kind load docker-image --name "$CLUSTER" "$webhook" "$sidecar" "$mcp" "$testkit"

log "installing SPIRE (server, agent, SPIFFE CSI driver, controller manager)"
helm repo add spiffe https://spiffe.github.io/helm-charts-hardened/ --force-update >/dev/null
helm --kube-context "$KCTX" upgrade --install spire-crds spiffe/spire-crds \
  --version "$SPIRE_CRDS_CHART_VERSION" -n spire-server --create-namespace --wait
helm --kube-context "$KCTX" upgrade --install spire spiffe/spire \
  --version "$SPIRE_CHART_VERSION" -n spire-server \
  --set global.spire.trustDomain="$TRUST_DOMAIN" --set global.spire.clusterName="$CLUSTER" \
  --set spire-server.controllerManager.watchClassless=true --wait --timeout 5m

log "running the in-cluster test module (tests/cluster) against kind"
KUBECONFIG_FILE="$(mktemp)"; kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG_FILE"
KUBECONFIG="$KUBECONFIG_FILE" KUBECTL="$(command -v kubectl)" OUTRIDER_CLUSTER_E2E=1 \
  OUTRIDER_TRUST_DOMAIN="$TRUST_DOMAIN" "$ROOT/.venv/bin/pytest" "$ROOT/tests/cluster" -v -s -p no:cacheprovider
rm -f "$KUBECONFIG_FILE"

log "installing Outrider (manifests/overlays/kind)"
k apply --server-side -k "$ROOT/manifests/overlays/kind"
k -n outrider-system rollout status deploy/outrider-webhook --timeout 180s
log "waiting for the webhook to patch its caBundle"
for _ in $(seq 60); do
  [[ -n "$(k get mutatingwebhookconfiguration outrider -o jsonpath='{.webhooks[0].clientConfig.caBundle}')" ]] && break
  sleep 2
done
[[ -n "$(k get mutatingwebhookconfiguration outrider -o jsonpath='{.webhooks[0].clientConfig.caBundle}')" ]] \
  || { log "caBundle never set"; exit 1; }

log "registering injected pods with SPIRE (ClusterSPIFFEID for the outrider-proxy container)"
log "deploying the example MCP server into a labelled namespace"
k apply --server-side -k "$ROOT/manifests/examples"
k -n mcp-demo rollout status deploy/mcp-everything --timeout 300s

pod="$(k -n mcp-demo get pods -l app.kubernetes.io/name=mcp-everything -o jsonpath='{.items[0].metadata.name}')"
containers="$(k -n mcp-demo get pod "$pod" -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}')"
log "pod $pod containers: $containers"
[[ " $containers " == *" outrider-proxy "* && " $containers " == *" outrider-init "* ]] \
  || { log "the pod was not injected"; exit 1; }
k -n mcp-demo wait --for=condition=Ready "pod/$pod" --timeout 120s
k -n mcp-demo get pod "$pod" -o jsonpath='{.metadata.annotations.outrider\.dev/status}'; echo
log "PASS: the injected MCP server pod is Ready"
