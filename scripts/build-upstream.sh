#!/usr/bin/env bash
# Builds the real upstream components Outrider's tests run against (kube-apiserver, etcd,
# SPIRE server/agent) from the Go module proxy into a version-keyed cache outside the repo.
#
#   scripts/build-upstream.sh controlplane   # kube-apiserver + etcd
#   scripts/build-upstream.sh spire          # spire-server + spire-agent + oidc-discovery-provider
#   scripts/build-upstream.sh spire-oidc     # only SPIRE's oidc-discovery-provider (same SPIRE module)
#   scripts/build-upstream.sh kubeyaml       # kubectl's own YAML reader as a stdin->JSON tool (tests)
#   scripts/build-upstream.sh helm           # helm v3 (the chart's lint/template/install tests)
#   scripts/build-upstream.sh syft           # anchore's syft: the SBOM of each image `make images` builds
#   scripts/build-upstream.sh all
#   scripts/build-upstream.sh fetch          # only resolve/download the modules of SPIRE, helm and syft
#                                            # (scripts/prebuild.sh runs it while kube-apiserver compiles)
#
# Prints the bin directory on its last line. A second run with the cache present costs ~0 s.
set -euo pipefail

K8S_VERSION="${OUTRIDER_K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${OUTRIDER_ETCD_VERSION:-v3.6.16}"
SPIRE_VERSION="${OUTRIDER_SPIRE_VERSION:-v1.13.3}"
HELM_VERSION="${OUTRIDER_HELM_VERSION:-v3.19.0}"
SYFT_VERSION="${OUTRIDER_SYFT_VERSION:-v1.57.2}"
# The sigs.k8s.io/yaml that k8s.io/apimachinery of K8S_VERSION requires (checked after resolving).
SIGS_YAML_VERSION="${OUTRIDER_SIGS_YAML_VERSION:-v1.6.0}"
CACHE="${OUTRIDER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outrider}"
export GOFLAGS="-mod=mod"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
# The compiler and linker collect garbage less often: ~10 % less CPU on a cold build (`go build -a std`
# here: 60 s user against 64-68 s at the default 100) for a few hundred MB more memory per process.
export GOGC="${GOGC:-400}"

log() { printf '[build-upstream] %s\n' "$*" >&2; }

need_go() {
  command -v go >/dev/null || { log "Go is required (https://go.dev/dl) and was not found on PATH"; exit 2; }
}

# resolve WORK FN: runs FN (writes WORK/go.mod and `go get`s the tool's modules) once per work dir; a
# second caller (the fetch lane of scripts/prebuild.sh and the build itself) waits for the first
resolve() {
  local work="$1" fn="$2"
  mkdir -p "$work"
  (
    flock 9
    [[ -f "$work/.resolved" ]] && exit 0
    "$fn" "$work"
    touch "$work/.resolved"
  ) 9>"$work/.lock"
}

# build_tool NAME VERSION_DIR MODULE_SETUP_FN PACKAGE...
build_kube_apiserver() {
  local out="$CACHE/kubernetes-$K8S_VERSION"
  if [[ -x "$out/bin/kube-apiserver" ]]; then log "kube-apiserver $K8S_VERSION cached in $out/bin"; return; fi
  need_go
  local work="$out/src"; mkdir -p "$work" "$out/bin"
  local staging="v0.${K8S_VERSION#v1.}"
  log "kube-apiserver $K8S_VERSION: fetching k8s.io/kubernetes module (large, first time only)"
  local gomod
  gomod="$(cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "module outrider.local/controlplane"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    # every k8s.io/<staging> module that k8s.io/kubernetes replaces with ./staging/... gets the matching v0.N.M
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } > "$work/go.mod"
  log "kube-apiserver: $(grep -c '^replace' "$work/go.mod") staging modules pinned to $staging; resolving dependencies"
  (cd "$work" && go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" >&2)
  log "kube-apiserver: compiling (several minutes on 2 cores, first time only)"
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${staging#v0.}" -o "$out/bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver)
  log "kube-apiserver: built $out/bin/kube-apiserver"
}

build_etcd() {
  local out="$CACHE/etcd-$ETCD_VERSION"
  if [[ -x "$out/bin/etcd" ]]; then log "etcd $ETCD_VERSION cached in $out/bin"; return; fi
  need_go
  local work="$out/src"; mkdir -p "$work" "$out/bin"
  printf 'module outrider.local/etcd\n\ngo 1.24\n' > "$work/go.mod"
  log "etcd $ETCD_VERSION: resolving go.etcd.io/etcd/server/v3"
  (cd "$work" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2)
  log "etcd: compiling"
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/bin/etcd" go.etcd.io/etcd/server/v3)
  log "etcd: built $out/bin/etcd"
}

resolve_spire() {
  printf 'module outrider.local/spire\n\ngo 1.24\n' > "$1/go.mod"
  log "SPIRE $SPIRE_VERSION: resolving modules"
  (cd "$1" && go get -tool "github.com/spiffe/spire/cmd/spire-server@$SPIRE_VERSION" "github.com/spiffe/spire/cmd/spire-agent@$SPIRE_VERSION" >&2)
}

build_spire() {
  local out="$CACHE/spire-$SPIRE_VERSION"
  if [[ -x "$out/bin/spire-server" && -x "$out/bin/spire-agent" ]]; then log "SPIRE $SPIRE_VERSION cached in $out/bin"; return; fi
  need_go
  command -v gcc >/dev/null || { log "SPIRE needs cgo (sqlite): install gcc (apt-get install -y gcc)"; exit 2; }
  local work="$out/src"; mkdir -p "$out/bin"
  resolve "$work" resolve_spire
  for c in spire-server spire-agent; do
    log "SPIRE: compiling $c (cgo, a few minutes first time only)"
    (cd "$work" && CGO_ENABLED=1 go build -trimpath -ldflags "-s -w" -o "$out/bin/$c" "github.com/spiffe/spire/cmd/$c")
  done
  log "SPIRE: built $out/bin"
}

# SPIRE's own OIDC discovery provider (support/oidc-discovery-provider in the same module and version):
# it publishes the trust domain's JWT signing keys and an OIDC discovery document, which is what Entra
# federated credentials and Okta's client JWKS URL fetch. Its own work dir, so that it can be built
# while a spire-server/agent build runs (they never write the same go.mod).
resolve_spire_oidc() {
  printf 'module outrider.local/spire-oidc\n\ngo 1.24\n' > "$1/go.mod"
  log "SPIRE oidc-discovery-provider $SPIRE_VERSION: resolving modules"
  (cd "$1" && go get -tool "github.com/spiffe/spire/support/oidc-discovery-provider@$SPIRE_VERSION" >&2)
}

build_spire_oidc() {
  local out="$CACHE/spire-$SPIRE_VERSION"
  if [[ -x "$out/bin/oidc-discovery-provider" ]]; then log "SPIRE oidc-discovery-provider $SPIRE_VERSION cached in $out/bin"; return; fi
  need_go
  local work="$out/src-oidc"; mkdir -p "$out/bin"
  resolve "$work" resolve_spire_oidc
  log "SPIRE: compiling oidc-discovery-provider"
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/bin/oidc-discovery-provider" "github.com/spiffe/spire/support/oidc-discovery-provider")
  log "SPIRE: built $out/bin/oidc-discovery-provider"
}

resolve_helm() {
  printf 'module outrider.local/helm\n\ngo 1.24\n' > "$1/go.mod"
  log "helm $HELM_VERSION: resolving helm.sh/helm/v3"
  (cd "$1" && go get -tool "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2)
}

build_helm() {
  local out="$CACHE/helm-$HELM_VERSION"
  if [[ -x "$out/bin/helm" ]]; then log "helm $HELM_VERSION cached in $out/bin"; return; fi
  need_go
  local work="$out/src"; mkdir -p "$out/bin"
  resolve "$work" resolve_helm
  # as helm's Makefile does: the Kubernetes version `helm template`/`lint` assume is client-go's
  local minor; minor="$(cd "$work" && go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)"
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  local pkg; for pkg in pkg/chartutil pkg/lint/rules; do
    ld+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$minor"
  done
  log "helm: compiling (assumes Kubernetes 1.$minor)"
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$out/bin/helm.tmp" helm.sh/helm/v3/cmd/helm)
  mv "$out/bin/helm.tmp" "$out/bin/helm"
  log "helm: built $out/bin/helm"
}

# syft: the SBOM generator (CycloneDX/SPDX from an image archive's files, Python and Debian catalogers).
resolve_syft() {
  printf 'module outrider.local/syft\n\ngo 1.24\n' > "$1/go.mod"
  log "syft $SYFT_VERSION: resolving github.com/anchore/syft (a few minutes, once)"
  (cd "$1" && go get -tool "github.com/anchore/syft/cmd/syft@$SYFT_VERSION" >&2)
}

build_syft() {
  local out="$CACHE/syft-$SYFT_VERSION"
  if [[ -x "$out/bin/syft" ]]; then log "syft $SYFT_VERSION cached in $out/bin"; return; fi
  need_go
  local work="$out/src"; mkdir -p "$out/bin"
  resolve "$work" resolve_syft
  # as syft's goreleaser config does: the version it prints and writes into every SBOM's tool metadata
  log "syft: compiling"
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${SYFT_VERSION#v}" \
    -o "$out/bin/syft.tmp" github.com/anchore/syft/cmd/syft)
  mv "$out/bin/syft.tmp" "$out/bin/syft"
  log "syft: built $out/bin/syft"
}

# kubeyaml: apimachinery's NewYAMLOrJSONDecoder (what kubectl reads manifests with) behind stdin.
# Keyed by the Kubernetes version and the helper's source, so an edit rebuilds it.
KUBEYAML_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/kubeyaml"
kubeyaml_dir() { echo "$CACHE/kubeyaml-$K8S_VERSION-$(sha256sum "$KUBEYAML_SRC/main.go" | cut -c1-12)"; }

build_kubeyaml() {
  local src_dir="$KUBEYAML_SRC"
  local out; out="$(kubeyaml_dir)"
  if [[ -x "$out/bin/kubeyaml" ]]; then log "kubeyaml ($K8S_VERSION) cached in $out/bin"; return; fi
  need_go
  local work="$out/src"; mkdir -p "$work" "$out/bin"
  local staging="v0.${K8S_VERSION#v1.}"
  cp "$src_dir/main.go" "$work/main.go"
  printf 'module outrider.local/kubeyaml\n\ngo 1.24\n' > "$work/go.mod"
  log "kubeyaml: resolving k8s.io/apimachinery@$staging and sigs.k8s.io/yaml@$SIGS_YAML_VERSION"
  (cd "$work" && go get "k8s.io/apimachinery@$staging" "sigs.k8s.io/yaml@$SIGS_YAML_VERSION" >&2)
  local resolved; resolved="$(cd "$work" && go list -m -f '{{.Version}}' sigs.k8s.io/yaml)"
  if [[ "$resolved" != "$SIGS_YAML_VERSION" ]]; then
    log "kubeyaml: apimachinery $staging needs sigs.k8s.io/yaml $resolved, not $SIGS_YAML_VERSION; set OUTRIDER_SIGS_YAML_VERSION"
    exit 2
  fi
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/bin/kubeyaml" .)
  log "kubeyaml: built $out/bin/kubeyaml"
}

# fetch: the modules of what `all` compiles after kube-apiserver, for what is not built yet
fetch_all() {
  need_go
  local s="$CACHE/spire-$SPIRE_VERSION"
  [[ -x "$s/bin/spire-server" && -x "$s/bin/spire-agent" ]] || resolve "$s/src" resolve_spire
  [[ -x "$s/bin/oidc-discovery-provider" ]] || resolve "$s/src-oidc" resolve_spire_oidc
  [[ -x "$CACHE/helm-$HELM_VERSION/bin/helm" ]] || resolve "$CACHE/helm-$HELM_VERSION/src" resolve_helm
  [[ -x "$CACHE/syft-$SYFT_VERSION/bin/syft" ]] || resolve "$CACHE/syft-$SYFT_VERSION/src" resolve_syft
}

case "${1:-all}" in
  controlplane) build_etcd; build_kube_apiserver; echo "$CACHE/kubernetes-$K8S_VERSION/bin:$CACHE/etcd-$ETCD_VERSION/bin" ;;
  spire) build_spire; build_spire_oidc; echo "$CACHE/spire-$SPIRE_VERSION/bin" ;;
  spire-oidc) build_spire_oidc; echo "$CACHE/spire-$SPIRE_VERSION/bin" ;;
  kubeyaml) build_kubeyaml; echo "$(kubeyaml_dir)/bin" ;;
  helm) build_helm; echo "$CACHE/helm-$HELM_VERSION/bin" ;;
  syft) build_syft; echo "$CACHE/syft-$SYFT_VERSION/bin" ;;
  all) build_etcd; build_kube_apiserver; build_spire; build_spire_oidc; build_kubeyaml; build_helm; build_syft ;;
  fetch) fetch_all ;;
  *) log "usage: $0 controlplane|spire|spire-oidc|kubeyaml|helm|syft|all|fetch"; exit 2 ;;
esac
