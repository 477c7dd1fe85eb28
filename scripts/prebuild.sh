#!/usr/bin/env bash
# What `make test` builds before its first suite, in two lanes so that a fresh machine waits less:
#   compile lane (foreground): scripts/build-upstream.sh all (etcd, kube-apiserver, SPIRE, kubeyaml, helm,
#                syft), then the images (scripts/build-images.sh build), then the node's own parts
#                (scripts/build-node.sh); the Go compiles keep both cores busy
#   fetch lane (background, while kube-apiserver compiles): what waits on the network or the disk, not on
#                the CPU: the node's Debian packages, the images' debootstrap bases, Keycloak from Maven
#                Central, and the Go modules of SPIRE, helm, syft, CoreDNS, the SPIFFE CSI driver and
#                spire-controller-manager
# Every step is one the compile lane would otherwise do itself, in the same cache, so a failed fetch
# costs only time: the compile lane fetches what is missing (and fails there, with its own message).
# With everything cached this takes a few seconds. Without root only build-upstream runs (the images
# and the node need root; their tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${OUTRIDER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outrider}"
PY="${PYTHON_BIN:-.venv/bin/python}"

log() { printf '[prebuild] %s\n' "$*" >&2; }

if [[ "$(id -u)" != 0 ]]; then
  scripts/build-upstream.sh all >/dev/null
  log "not root: the images and the one-node cluster are not built (their tests skip)"
  exit 0
fi

start=$SECONDS
mkdir -p "$CACHE"
fetch_log="$CACHE/prefetch.log"

fetch_lane() {
  local t
  step() {  # step NAME CMD...: one fetch, timed; a failure is reported and the lane goes on
    t=$SECONDS
    if "${@:2}"; then echo "[fetch] $1: done in $((SECONDS - t)) s"
    else echo "[fetch] $1: FAILED after $((SECONDS - t)) s (the compile lane will try again)"; fi
  }
  step "node packages (apt-get)" env OUTRIDER_NODE_DEPS=1 scripts/ensure-sysdeps.sh
  step "Go modules (SPIRE, helm, syft)" scripts/build-upstream.sh fetch
  step "Go modules (CoreDNS, SPIFFE CSI driver, spire-controller-manager)" scripts/build-node.sh fetch
  step "image bases (debootstrap)" scripts/build-images.sh bases
  if command -v mvn >/dev/null && [[ -x "$PY" ]]; then
    step "Keycloak (Maven Central)" "$PY" tests/exchange/keycloak.py
  else
    echo "[fetch] Keycloak: skipped (needs mvn and $PY; its tests fetch it themselves)"
  fi
  echo "[fetch-lane] finished"
}

# setsid: its own process group, so that a failing compile lane stops it (apt-get, debootstrap, go) too
PY="$PY" setsid -w bash -c "$(declare -f fetch_lane); fetch_lane" > "$fetch_log" 2>&1 &
fetch_pid=$!
trap 'kill -- -"$fetch_pid" 2>/dev/null || true' EXIT
log "fetching in the background (node packages, image bases, Go modules, Keycloak; $fetch_log)"

scripts/build-upstream.sh all >/dev/null

# (a finished lane stays a zombie until waited for, so its last line says whether it is still at work)
if ! grep -q '^\[fetch-lane\] finished' "$fetch_log"; then log "waiting for the background fetches ($fetch_log)"; fi
wait "$fetch_pid" || true
trap - EXIT
grep '^\[fetch\]' "$fetch_log" | sed 's/^\[fetch\]/[prebuild] fetched:/' >&2 || true
# the node's packages in the foreground too (a no-op when the fetch lane installed them; otherwise with
# apt-get's error on the console): tests/images runs the images' entrypoints with runc
OUTRIDER_NODE_DEPS=1 scripts/ensure-sysdeps.sh

NO_LOAD=1 scripts/build-images.sh build
scripts/build-node.sh >/dev/null
log "upstream parts, images and node parts ready in $((SECONDS - start)) s"
