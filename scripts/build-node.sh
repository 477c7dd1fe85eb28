#!/usr/bin/env bash
# Builds the upstream parts of the one-node cluster (`make node`) into the same version-keyed cache as
# scripts/build-upstream.sh: kubelet, kube-controller-manager, kube-scheduler, kube-proxy and kubectl
# (one `go build` from the k8s.io/kubernetes module kube-apiserver comes from), the pause binary,
# CoreDNS, the SPIFFE CSI driver, the CSI node-driver-registrar and spire-controller-manager.
#
#   scripts/build-node.sh            # build what is missing; prints one NAME=PATH line per binary
#   scripts/build-node.sh fetch      # only resolve/download the add-ons' modules (scripts/prebuild.sh)
#
# A second run with the cache present costs ~0 s. Build times go to $CACHE/build-times.log.
set -euo pipefail

K8S_VERSION="${OUTRIDER_K8S_VERSION:-v1.34.4}"
COREDNS_VERSION="${OUTRIDER_COREDNS_VERSION:-v1.12.4}"
SPIFFE_CSI_VERSION="${OUTRIDER_SPIFFE_CSI_VERSION:-v0.2.6}"
SCM_VERSION="${OUTRIDER_SCM_VERSION:-v0.6.4}"
REGISTRAR_VERSION="${OUTRIDER_REGISTRAR_VERSION:-v2.17.0}"
CACHE="${OUTRIDER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outrider}"
HERE="$(cd "$(dirname "$0")" && pwd)"
export GOFLAGS="-mod=mod"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOGC="${GOGC:-400}"  # as scripts/build-upstream.sh: ~10 % less compiler CPU

log() { printf '[build-node] %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null || { log "$1 is required and was not found on PATH ($2)"; exit 2; }; }

# timed NAME CMD...: runs CMD in the background, printing a progress line every 30 s, and records its time
timed() {
  local name="$1"; shift
  local start=$SECONDS
  "$@" &
  local pid=$!
  while ! wait_for "$pid" 30; do log "$name: still compiling ($((SECONDS - start)) s)"; done
  wait "$pid"
  printf '%s %s %ss\n' "$(date -u +%FT%TZ)" "$name" "$((SECONDS - start))" >> "$CACHE/build-times.log"
  log "$name: done in $((SECONDS - start)) s"
}
wait_for() { # wait_for PID SECONDS: true once PID has exited
  local i
  for ((i = 0; i < $2; i++)); do kill -0 "$1" 2>/dev/null || return 0; sleep 1; done
  return 1
}

# Two builds of the same component at once only waste the 2 cores: wait for a running build-upstream.sh
wait_other_builds() {
  local start=$SECONDS
  while pgrep -f 'scripts/build-upstream[.]sh' >/dev/null; do
    log "waiting for a running scripts/build-upstream.sh to finish ($((SECONDS - start)) s; see /tmp/logs/build-upstream.log)"
    sleep 30
  done
}

build_kube() {
  local out="$CACHE/kubernetes-$K8S_VERSION" cmds=(kubelet kube-controller-manager kube-scheduler kube-proxy kubectl)
  local missing=() c
  for c in "${cmds[@]}"; do [[ -x "$out/bin/$c" ]] || missing+=("$c"); done
  if [[ ${#missing[@]} -eq 0 ]]; then log "kube node components $K8S_VERSION cached in $out/bin"; return; fi
  need go "https://go.dev/dl"
  # kube-apiserver prepares the module (go.mod with every staging module pinned) and warms the build cache
  [[ -x "$out/bin/kube-apiserver" ]] || wait_other_builds
  "$HERE/build-upstream.sh" controlplane >/dev/null
  local work="$out/node-src" staging="v0.${K8S_VERSION#v1.}"
  mkdir -p "$work"
  if [[ ! -f "$work/go.mod" ]]; then
    sed 's#^module .*#module outrider.local/node#' "$out/src/go.mod" > "$work/go.mod"
    cp "$out/src/go.sum" "$work/go.sum"
  fi
  log "kube: resolving ${missing[*]}"
  local pkgs=()
  for c in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c@$K8S_VERSION"); done
  (cd "$work" && go get "${pkgs[@]}" >"$work/go-get.log" 2>&1) || { cat "$work/go-get.log" >&2; exit 1; }
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${staging#v0.}"
  for c in "${missing[@]}"; do
    log "kube: compiling $c (shares the compile with kube-apiserver)"
    timed "$c" bash -c "cd '$work' && CGO_ENABLED=0 go build -trimpath -ldflags '$ldflags' -o '$out/bin/$c' k8s.io/kubernetes/cmd/$c"
  done
}

build_pause() {
  local out="$CACHE/kubernetes-$K8S_VERSION/bin/pause"
  if [[ -x "$out" ]]; then log "pause cached as $out"; return; fi
  need gcc "apt-get install -y gcc libc6-dev"
  local dir
  dir="$(cd "$CACHE/kubernetes-$K8S_VERSION/src" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  log "pause: gcc -static $dir/build/pause/linux/pause.c"
  gcc -Os -static -DVERSION="$K8S_VERSION-outrider" -o "$out" "$dir/build/pause/linux/pause.c"
  strip "$out"
}

# resolve_tool NAME VERSION MODULE PACKAGE: its work dir's go.mod and modules, once (a second caller,
# the fetch lane of scripts/prebuild.sh or the build, waits for the first)
resolve_tool() {
  local name="$1" version="$2" module="$3" pkg="$4"
  local src="$CACHE/$name-$version/src"
  mkdir -p "$src"
  (
    flock 9
    [[ -f "$src/.resolved" ]] && exit 0
    printf 'module outrider.local/%s\n\ngo 1.24\n' "$name" > "$src/go.mod"
    log "$name $version: resolving $module"
    (cd "$src" && go get "$module@$version" "$pkg@$version" >go-get.log 2>&1) || { cat "$src/go-get.log" >&2; exit 1; }
    touch "$src/.resolved"
  ) 9>"$src/.lock"
}

# go_tool NAME VERSION MODULE PACKAGE: a plain `go build` of one upstream module at one tag
go_tool() {
  local name="$1" version="$2" module="$3" pkg="$4"
  local out="$CACHE/$name-$version"
  if [[ -x "$out/bin/$name" ]]; then log "$name $version cached in $out/bin"; return; fi
  need go "https://go.dev/dl"
  mkdir -p "$out/bin"
  resolve_tool "$@"
  log "$name: compiling (first time only)"
  timed "$name" bash -c "cd '$out/src' && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o '$out/bin/$name' '$pkg'"
}

# The registrar is not on the module proxy: build it from its GitHub source (vendored dependencies).
# OUTRIDER_REGISTRAR_SRC is a git directory holding the tag (the repository or a mirror of it).
build_registrar() {
  local name=csi-node-driver-registrar out="$CACHE/csi-node-driver-registrar-$REGISTRAR_VERSION"
  if [[ -x "$out/bin/$name" ]]; then log "$name $REGISTRAR_VERSION cached in $out/bin"; return; fi
  local src="${OUTRIDER_REGISTRAR_SRC:-/work/.mirror/kubernetes-csi+node-driver-registrar/repo}"
  if ! git -C "$src" rev-parse -q --verify "$REGISTRAR_VERSION^{commit}" >/dev/null 2>&1; then
    log "$name: no git source with tag $REGISTRAR_VERSION at $src (set OUTRIDER_REGISTRAR_SRC to a clone"
    log "  of https://github.com/kubernetes-csi/node-driver-registrar); the node uses localnode/registrar.py,"
    log "  which serves the same kubelet plugin-registration protocol"
    return 0
  fi
  mkdir -p "$out/src" "$out/bin"
  git -C "$src" archive "$REGISTRAR_VERSION" | tar -x -C "$out/src"
  log "$name: compiling $REGISTRAR_VERSION (vendored dependencies)"
  timed "$name" bash -c "cd '$out/src' && CGO_ENABLED=0 GOFLAGS=-mod=vendor go build -trimpath -ldflags '-s -w -X main.version=$REGISTRAR_VERSION' -o '$out/bin/$name' ./cmd/$name"
}

ADDONS=(
  "coredns $COREDNS_VERSION github.com/coredns/coredns github.com/coredns/coredns"
  "spiffe-csi-driver $SPIFFE_CSI_VERSION github.com/spiffe/spiffe-csi github.com/spiffe/spiffe-csi/cmd/spiffe-csi-driver"
  "spire-controller-manager $SCM_VERSION github.com/spiffe/spire-controller-manager github.com/spiffe/spire-controller-manager/cmd"
)

build_addons() {
  local a
  for a in "${ADDONS[@]}"; do go_tool $a; done  # word-split on purpose: NAME VERSION MODULE PACKAGE
  build_registrar
}

fetch_addons() {
  local a name version
  need go "https://go.dev/dl"
  for a in "${ADDONS[@]}"; do
    read -r name version _ <<<"$a"
    [[ -x "$CACHE/$name-$version/bin/$name" ]] || resolve_tool $a
  done
}

mkdir -p "$CACHE"
case "${1:-all}" in
  addons) build_addons; exit 0 ;;
  fetch) fetch_addons; exit 0 ;;
  kube) build_kube; build_pause; exit 0 ;;
  all) build_addons; build_kube; build_pause ;;
  *) log "usage: $0 [all|addons|kube|fetch]"; exit 2 ;;
esac
wait_other_builds
spire_bin="$("$HERE/build-upstream.sh" spire | tail -1)"
k8s="$CACHE/kubernetes-$K8S_VERSION/bin"
for c in kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy kubectl pause; do echo "$c=$k8s/$c"; done
echo "etcd=$("$HERE/build-upstream.sh" controlplane | tail -1 | cut -d: -f2)/etcd"
echo "coredns=$CACHE/coredns-$COREDNS_VERSION/bin/coredns"
echo "spiffe-csi-driver=$CACHE/spiffe-csi-driver-$SPIFFE_CSI_VERSION/bin/spiffe-csi-driver"
echo "spire-controller-manager=$CACHE/spire-controller-manager-$SCM_VERSION/bin/spire-controller-manager"
registrar="$CACHE/csi-node-driver-registrar-$REGISTRAR_VERSION/bin/csi-node-driver-registrar"
if [[ -x "$registrar" ]]; then echo "csi-node-driver-registrar=$registrar"; fi
echo "spire-server=$spire_bin/spire-server"
echo "spire-agent=$spire_bin/spire-agent"
echo "scm-crds=$(cd "$CACHE/spire-controller-manager-$SCM_VERSION/src" && go list -m -f '{{.Dir}}' github.com/spiffe/spire-controller-manager)/config/crd/bases"
