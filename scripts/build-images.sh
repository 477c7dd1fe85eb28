#!/usr/bin/env bash
# `make images`: Outrider's images built without Docker or a registry, on a locally made base.
#   1. base   : debootstrap Debian bookworm (+ python3, python3-venv, python-is-python3, iptables),
#               cached as a rootfs tarball keyed by suite + packages, imported as localhost/outrider-base
#   2. images : `buildah bud` of images/sidecar.Dockerfile, images/webhook.Dockerfile (unchanged, the
#               same files users build with Docker) and images/mcp-example.Dockerfile (the MCP SDK
#               example server, nothing of Outrider in it), each with --build-arg PYTHON_IMAGE=<base>
#   3. load   : docker-archive -> `ctr -n k8s.io images import` into the node's containerd, only when
#               a containerd answers on CONTAINERD_ADDRESS (otherwise the images are built and kept)
# Usage: scripts/build-images.sh [build|push|names]
# Env: IMAGE_REPO (localhost/outrider-dev), IMAGE_TAG (project version), CONTAINERD_ADDRESS,
#      OUTRIDER_CACHE (~/.cache/outrider), NO_LOAD=1 to skip the containerd import.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${OUTRIDER_CACHE:-$HOME/.cache/outrider}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)"
IMAGE_REPO="${IMAGE_REPO:-localhost/outrider-dev}"
IMAGE_TAG="${IMAGE_TAG:-$VERSION}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_PACKAGES="python3,python3-venv,python-is-python3,iptables,ca-certificates"
BASE_IMAGE="localhost/outrider-base:$SUITE"
# base rootfs tarballs, buildah's own storage and stamps; image archives go to $IMGDIR, where
# `make node` re-imports every *.tar at start-up (docs/node.md), so a restarted node keeps them
WORK="$CACHE/image-build"
STORE="$WORK/buildah"
IMGDIR="$CACHE/images"
NODE_DIR="${OUTRIDER_NODE_DIR:-/var/lib/outrider-node}"
CONTAINERD_ADDRESS="${CONTAINERD_ADDRESS:-}"

SIDECAR_IMAGE="$IMAGE_REPO/outrider:$IMAGE_TAG"
WEBHOOK_IMAGE="$IMAGE_REPO/outrider-webhook:$IMAGE_TAG"
MCP_IMAGE="$IMAGE_REPO/mcp-example-server:$IMAGE_TAG"

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f s", b-a}'; }
bah() { buildah --storage-driver vfs --root "$STORE/storage" --runroot "$STORE/run" "$@"; }

names() {
  printf 'sidecar=%s\nwebhook=%s\nmcp=%s\nbase=%s\n' "$SIDECAR_IMAGE" "$WEBHOOK_IMAGE" "$MCP_IMAGE" "$BASE_IMAGE"
}

need_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]} (apt-get install ${missing[*]})"
  log "installing ${missing[*]} with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- 1. the base: a rootfs tarball keyed by everything that shapes it ---------------------------
base_key() { printf '%s|%s|%s|v1' "$SUITE" "$BASE_PACKAGES" "$MIRROR" | sha256sum | cut -c1-12; }

build_base_tar() {
  local key tar tmp t0
  key="$(base_key)"; tar="$WORK/base-$SUITE-$key.tar"
  if [[ -s "$tar" ]]; then echo "$tar"; return; fi
  [[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
  mkdir -p "$WORK"; tmp="$(mktemp -d "$WORK/rootfs.XXXXXX")"
  t0="$(now)"
  log "debootstrap $SUITE (+ ${BASE_PACKAGES//,/ }) from $MIRROR: a few minutes, once"
  if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$tmp" "$MIRROR" \
      > "$WORK/debootstrap.log" 2>&1; then
    tail -20 "$WORK/debootstrap.log" >&2; rm -rf "$tmp"; die "debootstrap failed (log: $WORK/debootstrap.log)"
  fi
  cat > "$tmp/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
  # an image, not a machine: no caches, no logs, no device nodes (the runtime provides /dev)
  rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/* "$tmp"/var/log/* \
         "$tmp"/dev/* "$tmp"/proc/* "$tmp"/sys/* "$tmp"/run/* "$tmp"/tmp/*
  tar -C "$tmp" --numeric-owner -cf "$tar.part" . && mv "$tar.part" "$tar"
  rm -rf "$tmp"
  log "base rootfs $(du -h "$tar" | cut -f1) in $(since "$t0") -> $tar"
  echo "$tar"
}

# This machine's extra CA certificates (a TLS-inspecting egress proxy in front of PyPI): the local
# base trusts them and points pip at the system store, as the host does. Only the local base gets
# them; the Dockerfiles and a release base are untouched.
EXTRA_CA_DIR="${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
extra_cas() { find "$EXTRA_CA_DIR" -maxdepth 1 -name '*.crt' -type f 2>/dev/null | sort; }
image_key() { { base_key; echo apt-clean-v1; extra_cas | xargs -r cat; } | sha256sum | cut -c1-12; }

import_base() {
  local tar="$1" key c ca
  key="$(image_key)"
  if [[ "$(bah inspect --type image --format '{{index .ImageAnnotations "dev.outrider.base-key"}}' \
        "$BASE_IMAGE" 2>/dev/null)" == "$key" ]]; then
    log "base $BASE_IMAGE is current ($key)"; return
  fi
  log "importing the base rootfs as $BASE_IMAGE"
  c="$(bah from --quiet scratch)"
  bah add --quiet "$c" "$tar" / >/dev/null
  # as in Debian's official container images: apt keeps no package caches in image layers
  cat > "$WORK/docker-clean" <<'EOF2'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF2
  bah add --quiet "$c" "$WORK/docker-clean" /etc/apt/apt.conf.d/docker-clean >/dev/null
  if [[ -n "$(extra_cas)" ]]; then
    log "  adding this machine's CA certificates from $EXTRA_CA_DIR: $(extra_cas | xargs -r -n1 basename | tr '\n' ' ')"
    for ca in $(extra_cas); do bah add --quiet "$c" "$ca" /usr/local/share/ca-certificates/ >/dev/null; done
    bah run --isolation chroot "$c" -- update-ca-certificates >/dev/null 2>&1
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$WORK/pip.conf"
    bah add --quiet "$c" "$WORK/pip.conf" /etc/pip.conf >/dev/null
  fi
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 --annotation "dev.outrider.base-key=$key" \
    --label "org.opencontainers.image.title=outrider-base" "$c"
  bah commit --quiet --rm "$c" "$BASE_IMAGE" >/dev/null
}

# --- 2. the images ------------------------------------------------------------------------------
# What a build of <Dockerfile> reads: the Dockerfile, its ignore file, the base, and every file the
# ignore file lets into the context (its `!` lines), by path and content (symlinks by target).
context_key() {  # context_key <Dockerfile>
  local file="$1" ign="$ROOT/$1.dockerignore" paths=()
  [[ -f "$ign" ]] && mapfile -t paths < <(sed -n 's#^!\(.*\)#\1#p' "$ign" | sed 's#/$##')
  {
    image_key; cat "$ROOT/$file" "$ign" 2>/dev/null
    (cd "$ROOT" && find "${paths[@]}" \( -name __pycache__ -prune \) -o \( -type f ! -name '*.pyc' -print \) \
        -o \( -type l -print \) 2>/dev/null | LC_ALL=C sort | while read -r f; do
          if [[ -L "$f" ]]; then printf 'L %s %s\n' "$f" "$(readlink "$f")"
          else printf 'F %s %s\n' "$f" "$(sha256sum < "$f" | cut -c1-64)"; fi
        done)
  } | sha256sum | cut -c1-16
}

bud() {  # bud <Dockerfile> <tag>
  local file="$1" tag="$2" t0 ignore key stamp
  t0="$(now)"
  # nothing the build reads has changed since the last build of this tag: skip buildah entirely
  # (even a fully cached `buildah bud` costs minutes with the vfs driver)
  key="$(context_key "$file")"; stamp="$WORK/built/${tag//[\/:]/_}"
  if [[ "$(cat "$stamp" 2>/dev/null)" == "$key $(bah inspect --type image --format '{{.FromImageID}}' "$tag" 2>/dev/null)" ]]; then
    log "  $tag is current (sources unchanged since its build, $key)"; return
  fi
  ignore=()
  [[ -f "$ROOT/$file.dockerignore" ]] && ignore=(--ignorefile "$ROOT/$file.dockerignore")
  log "building $tag from $file"
  # --network host: pip reaches PyPI directly (no CNI config of the node's is touched);
  # --layers: unchanged steps come from the cache, so a warm rebuild costs seconds.
  bah bud --quiet --layers --network host --isolation chroot --format docker "${ignore[@]}" \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" -f "$ROOT/$file" -t "$tag" "$ROOT" >/dev/null \
    || die "buildah bud of $file failed"
  mkdir -p "$WORK/built"
  echo "$key $(bah inspect --type image --format '{{.FromImageID}}' "$tag")" > "$stamp"
  log "  $tag: $(image_size "$tag") in $(since "$t0")"
}

archive_of() { echo "$IMGDIR/outrider-image-$(basename "${1//:/-}").docker.tar"; }

save() {  # save <tag>...: a docker archive per image (kept: make node re-imports them at start-up)
  local tag archive id
  mkdir -p "$IMGDIR"
  for tag in "$@"; do
    archive="$(archive_of "$tag")"
    id="$(bah inspect --type image --format '{{.FromImageID}}' "$tag")"
    [[ -s "$archive" && "$(cat "$archive.id" 2>/dev/null)" == "$id" ]] && continue
    rm -f "$archive"
    bah push --quiet "$tag" "docker-archive:$archive.part:$tag" >/dev/null && mv "$archive.part" "$archive"
    echo "$id" > "$archive.id"
  done
}

image_size() { bah images --format '{{.Size}}' "$1" | head -1; }

# --- 3. load into the node's containerd ---------------------------------------------------------
containerd_address() {
  if [[ -n "$CONTAINERD_ADDRESS" ]]; then echo "$CONTAINERD_ADDRESS"; return; fi
  local f
  for f in "$NODE_DIR/run/containerd.sock" /run/containerd/containerd.sock; do
    [[ -S "$f" ]] && { echo "$f"; return; }
  done
  echo "$NODE_DIR/run/containerd.sock"
}

load() {  # load <tag>...
  local addr id tag archive stamp t0
  addr="$(containerd_address)"
  if [[ "${NO_LOAD:-0}" == 1 ]]; then log "NO_LOAD=1: images built, not loaded"; return; fi
  if ! ctr --address "$addr" version >/dev/null 2>&1; then
    log "no containerd answers on $addr: images built, not loaded (set CONTAINERD_ADDRESS, or run make node)"
    return
  fi
  for tag in "$@"; do
    id="$(bah inspect --type image --format '{{.FromImageID}}' "$tag")"
    stamp="$WORK/loaded/$(printf '%s' "$addr" | sha256sum | cut -c1-8)-${tag//[\/:]/_}"
    if [[ "$(cat "$stamp" 2>/dev/null)" == "$id" ]] \
        && [[ -n "$(ctr --address "$addr" -n k8s.io images ls -q "name==$tag" 2>/dev/null)" ]]; then
      log "  $tag already in containerd"; continue
    fi
    t0="$(now)"; archive="$(archive_of "$tag")"
    ctr --address "$addr" -n k8s.io images import "$archive" >/dev/null \
      || die "ctr images import of $tag failed"
    mkdir -p "$(dirname "$stamp")"; echo "$id" > "$stamp"
    log "  loaded $tag into containerd ($addr) in $(since "$t0")"
  done
}

build() {
  local t0; t0="$(now)"
  need_tools
  mkdir -p "$STORE" "$IMGDIR" "$WORK"
  import_base "$(build_base_tar)"
  bud images/sidecar.Dockerfile "$SIDECAR_IMAGE"
  bud images/webhook.Dockerfile "$WEBHOOK_IMAGE"
  bud images/mcp-example.Dockerfile "$MCP_IMAGE"
  save "$SIDECAR_IMAGE" "$WEBHOOK_IMAGE" "$MCP_IMAGE"
  load "$SIDECAR_IMAGE" "$WEBHOOK_IMAGE" "$MCP_IMAGE"
  log "done in $(since "$t0"):"
  names | sed 's/^/[images]   /' >&2
}

push() {  # for users: buildah push to IMAGE_REPO (credentials: buildah login / REGISTRY_AUTH_FILE)
  local tag
  [[ "$IMAGE_REPO" != localhost/* ]] || die "set IMAGE_REPO to a registry you can push to (e.g. ghcr.io/you)"
  # the example MCP server too: docs/install.md deploys it in step 5
  for tag in "$SIDECAR_IMAGE" "$WEBHOOK_IMAGE" "$MCP_IMAGE"; do
    bah inspect --type image "$tag" >/dev/null 2>&1 || die "$tag is not built: run make images IMAGE_REPO=$IMAGE_REPO"
    log "pushing $tag"
    bah push "$tag" "docker://$tag"
  done
}

case "${1:-build}" in
  build) build ;;
  push) push ;;
  names) names ;;
  key) context_key "${2:?usage: $0 key images/NAME.Dockerfile}" ;;
  load) load "$SIDECAR_IMAGE" "$WEBHOOK_IMAGE" "$MCP_IMAGE" ;;
  *) die "usage: $0 [build|push|names|load|key FILE]" ;;
esac
