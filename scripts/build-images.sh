#!/usr/bin/env bash
# `make images`: Outrider's images built without Docker or a registry, on a locally made base.
#   1. bases  : debootstrap Debian bookworm (+ python3, python3-venv, python-is-python3, ca-certificates),
#               slimmed as Debian's own container images are (no man pages, docs, locales), cached as
#               a rootfs tarball keyed by suite + packages; imported twice: localhost/outrider-base-build
#               (makes the virtualenvs) and localhost/outrider-base (runs them: python3-venv and pip's
#               wheels purged)
#   2. images : `buildah bud` of images/sidecar.Dockerfile, images/webhook.Dockerfile (unchanged, the
#               same files users build with Docker), images/mcp-example.Dockerfile (the MCP SDK example
#               server, nothing of Outrider in it) and images/testkit.Dockerfile (tests only: the
#               sidecar image + the dev IdP/Workload API the in-cluster tests run as pods)
#   3. save   : a docker-archive per image, and beside it its SBOM (CycloneDX and SPDX JSON, from
#               anchore's syft, built by scripts/build-upstream.sh syft): <archive>.cdx.json, .spdx.json
#   4. load   : `ctr -n k8s.io images import` into the node's containerd, only when a containerd
#               answers on CONTAINERD_ADDRESS (otherwise the images are built and kept)
# Usage: scripts/build-images.sh [build|push|names|load|archives|prune|bases]  (prune: drop build layers
#        nothing uses any more; build does it itself; bases: only the base tarballs of step 1)
# Env: IMAGE_REPO (localhost/outrider-dev), IMAGE_TAG (project version), CONTAINERD_ADDRESS,
#      OUTRIDER_CACHE (~/.cache/outrider), OUTRIDER_IMAGE_CACHE (base tarballs and buildah's storage,
#      ~7 GB; default $OUTRIDER_CACHE/image-build), OUTRIDER_IMAGE_DIR (archives + SBOMs, which
#      `make node` imports at start-up; default $OUTRIDER_CACHE/images), NO_LOAD=1 to skip the
#      containerd import, SBOM=0 to skip the SBOMs (no Go toolchain for syft),
#      CRYPTOGRAPHY_OPENSSL=bundled to install cryptography's wheel (its own OpenSSL inside) instead of
#      compiling it on the base's OpenSSL (default system; see images/sidecar.Dockerfile and
#      docs/capacity.md).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${OUTRIDER_CACHE:-$HOME/.cache/outrider}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)"
IMAGE_REPO="${IMAGE_REPO:-localhost/outrider-dev}"
IMAGE_TAG="${IMAGE_TAG:-$VERSION}"
SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_PACKAGES="python3,python3-venv,python-is-python3,ca-certificates"
# what only the build base keeps: `python -m venv` with pip (the runtime base runs a finished venv)
BUILD_ONLY_PACKAGES="python3-venv python3.11-venv python3-pip-whl python3-setuptools-whl"
BASE_IMAGE="localhost/outrider-base:$SUITE"
BUILD_BASE_IMAGE="localhost/outrider-base-build:$SUITE"
# base rootfs tarballs, buildah's own storage and stamps; image archives go to $IMGDIR, where
# `make node` re-imports every *.tar at start-up (docs/node.md), so a restarted node keeps them
WORK="${OUTRIDER_IMAGE_CACHE:-$CACHE/image-build}"
STORE="$WORK/buildah"
IMGDIR="${OUTRIDER_IMAGE_DIR:-$CACHE/images}"
NODE_DIR="${OUTRIDER_NODE_DIR:-/var/lib/outrider-node}"
CONTAINERD_ADDRESS="${CONTAINERD_ADDRESS:-}"

SIDECAR_IMAGE="$IMAGE_REPO/outrider:$IMAGE_TAG"
WEBHOOK_IMAGE="$IMAGE_REPO/outrider-webhook:$IMAGE_TAG"
MCP_IMAGE="$IMAGE_REPO/mcp-example-server:$IMAGE_TAG"
TESTKIT_IMAGE="$IMAGE_REPO/outrider-testkit:$IMAGE_TAG"
ALL_IMAGES=("$SIDECAR_IMAGE" "$WEBHOOK_IMAGE" "$MCP_IMAGE" "$TESTKIT_IMAGE")

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f s", b-a}'; }
bah() { buildah --storage-driver vfs --root "$STORE/storage" --runroot "$STORE/run" "$@"; }

names() {
  printf 'sidecar=%s\nwebhook=%s\nmcp=%s\ntestkit=%s\nbase=%s\n' \
    "$SIDECAR_IMAGE" "$WEBHOOK_IMAGE" "$MCP_IMAGE" "$TESTKIT_IMAGE" "$BASE_IMAGE"
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

# progress <label> <log> <command...>: runs a long command with its output in <log>; prints buildah's
# STEP lines as they come and, while one step runs long, a heartbeat with the log's last line.
STEP_LINE='^(\[[0-9]+/[0-9]+\] )?STEP [0-9]'
progress() {
  local label="$1" logf="$2" pid t0 seen=0 last_beat rc line n
  shift 2
  t0="$(now)"; last_beat=$SECONDS
  "$@" > "$logf" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    n="$(grep -cE "$STEP_LINE" "$logf" 2>/dev/null || true)"
    if (( n > seen )); then
      grep -E "$STEP_LINE" "$logf" | sed -n "$((seen + 1)),${n}p" | cut -c1-110 | sed "s/^/[images]   $label: /" >&2
      seen=$n; last_beat=$SECONDS
    elif (( SECONDS - last_beat >= 20 )); then
      line="$(grep -aE '[A-Za-z]{3,}' "$logf" 2>/dev/null | tail -1 | tr -cd ' -~' | cut -c1-90 || true)"
      log "  $label: still running ($(since "$t0"))${line:+: $line}"
      last_beat=$SECONDS
    fi
  done
  rc=0; wait "$pid" || rc=$?
  return "$rc"
}

# --- 1. the bases: rootfs tarballs keyed by everything that shapes them --------------------------
base_key() { printf '%s|%s|%s|%s|slim-v2' "$SUITE" "$BASE_PACKAGES" "$BUILD_ONLY_PACKAGES" "$MIRROR" \
  | sha256sum | cut -c1-12; }

# As Debian's own container images (debuerreotype's slimify): dpkg keeps no man pages, docs (but the
# copyright files, which the SBOM reads licences from), info pages or translations, now or later.
slimify() {  # slimify <rootfs>
  local fs="$1"
  mkdir -p "$fs/etc/dpkg/dpkg.cfg.d"
  cat > "$fs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
SLIM
  find "$fs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$fs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$fs"/usr/share/man/* "$fs"/usr/share/groff/* "$fs"/usr/share/info/* "$fs"/usr/share/locale/* \
         "$fs"/usr/share/lintian/* "$fs"/usr/share/linda/*
}

pack() {  # pack <rootfs> <tar>: an image, not a machine: no caches, logs or device nodes
  [[ -n "$1" && -d "$1/usr" ]] || die "pack: $1 is not a root filesystem"
  rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/var/log/* \
         "$1"/dev/* "$1"/proc/* "$1"/sys/* "$1"/run/* "$1"/tmp/* "$1"/var/cache/debconf/*-old
  tar -C "$1" --numeric-owner -cf "$2.part" . && mv "$2.part" "$2"
}

build_base_tars() {  # prints the build base's tarball, then the runtime base's
  local key build_tar run_tar tmp t0
  key="$(base_key)"; build_tar="$WORK/base-build-$SUITE-$key.tar"; run_tar="$WORK/base-$SUITE-$key.tar"
  if [[ -s "$build_tar" && -s "$run_tar" ]]; then printf '%s\n%s\n' "$build_tar" "$run_tar"; return; fi
  [[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
  mkdir -p "$WORK"; tmp="$(mktemp -d "$WORK/rootfs.XXXXXX")"
  t0="$(now)"
  log "debootstrap $SUITE (+ ${BASE_PACKAGES//,/ }) from $MIRROR: a few minutes, once"
  if ! progress debootstrap "$WORK/debootstrap.log" \
      debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$tmp" "$MIRROR"; then
    tail -20 "$WORK/debootstrap.log" >&2; rm -rf "$tmp"; die "debootstrap failed (log: $WORK/debootstrap.log)"
  fi
  cat > "$tmp/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SOURCES
  slimify "$tmp"
  pack "$tmp" "$build_tar"
  # the runtime base: the same system without what only making a virtualenv needs
  # shellcheck disable=SC2086
  chroot "$tmp" dpkg --purge $BUILD_ONLY_PACKAGES > "$WORK/purge.log" 2>&1 \
    || { tail -20 "$WORK/purge.log" >&2; rm -rf "$tmp"; die "dpkg --purge in the runtime base failed"; }
  pack "$tmp" "$run_tar"
  rm -rf "$tmp"
  log "bases: build $(du -h "$build_tar" | cut -f1), runtime $(du -h "$run_tar" | cut -f1) in $(since "$t0")"
  printf '%s\n%s\n' "$build_tar" "$run_tar"
}

# This machine's extra CA certificates (a TLS-inspecting egress proxy in front of PyPI): the local
# bases trust them and point pip at the system store, as the host does. Only the local bases get
# them; the Dockerfiles and a release base are untouched.
EXTRA_CA_DIR="${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"
extra_cas() { find "$EXTRA_CA_DIR" -maxdepth 1 -name '*.crt' -type f 2>/dev/null | sort; }
image_key() { { base_key; echo "$1"; echo apt-clean-v1; extra_cas | xargs -r cat; } | sha256sum | cut -c1-12; }

import_base() {  # import_base <tar> <image>
  local tar="$1" image="$2" key c ca
  key="$(image_key "$image")"
  if [[ "$(bah inspect --type image --format '{{index .ImageAnnotations "dev.outrider.base-key"}}' \
        "$image" 2>/dev/null)" == "$key" ]]; then
    log "base $image is current ($key)"; return
  fi
  log "importing $(basename "$tar") as $image"
  c="$(bah from --quiet scratch)"
  bah add --quiet "$c" "$tar" / >/dev/null
  # as in Debian's official container images: apt keeps no package caches in image layers
  cat > "$WORK/docker-clean" <<'CLEAN'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CLEAN
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
    --label "org.opencontainers.image.title=$(basename "${image%%:*}")" "$c"
  bah commit --quiet --rm "$c" "$image" >/dev/null
}

# --- 2. the images ------------------------------------------------------------------------------
# The inputs of one Dockerfile: itself, its .dockerignore, the build arguments with the image IDs
# they name, and every file of the build context its .dockerignore lets in (its `!path` lines).
# Over-inclusive on purpose (a whole folder where the ignore file trims it): a false change costs
# a layer-cached bud, a missed one would ship a stale image.
inputs_key() {  # inputs_key <Dockerfile> <build-arg>...
  local file="$1" arg image path
  shift
  {
    cat "$ROOT/$file" "$ROOT/$file.dockerignore" 2>/dev/null
    for arg in "$@"; do
      image="${arg#*=}"
      printf '%s %s\n' "$arg" "$(bah inspect --type image --format '{{.FromImageID}}' "$image" 2>/dev/null || true)"
    done
    while read -r path; do
      path="${path#!}"; path="${path%/}"
      [[ -e "$ROOT/$path" || -L "$ROOT/$path" ]] || continue
      (cd "$ROOT" && find "$path" \( -name __pycache__ -prune \) -o \( -type f -not -name '*.pyc' -printf '%p %m\n' \) \
        -o \( -type l -printf '%p -> %l\n' \) | LC_ALL=C sort)
      (cd "$ROOT" && find "$path" -name __pycache__ -prune -o -type f -not -name '*.pyc' -print0 \
        | LC_ALL=C sort -z | xargs -0 -r sha256sum)
    done < <(grep -E '^!' "$ROOT/$file.dockerignore" 2>/dev/null)
  } | sha256sum | cut -c1-16
}

bud() {  # bud <Dockerfile> <tag> [K=V...]: the build arguments beyond the two bases
  local file="$1" tag="$2" t0 ignore logf key stamp kv build_args args=()
  shift 2
  t0="$(now)"
  build_args=("PYTHON_IMAGE=$BASE_IMAGE" "BUILD_IMAGE=$BUILD_BASE_IMAGE" "$@")
  for kv in "${build_args[@]}"; do args+=(--build-arg "$kv"); done
  # unchanged inputs and the image still there: nothing to do (a fully layer-cached `bud` still
  # costs minutes with vfs, which copies whole root filesystems for every stage)
  key="$(inputs_key "$file" "${build_args[@]}")"
  stamp="$WORK/stamps/${tag//[\/:]/_}"
  if [[ "$(cut -d' ' -f1 "$stamp" 2>/dev/null)" == "$key" ]] \
      && [[ "$(bah inspect --type image --format '{{.FromImageID}}' "$tag" 2>/dev/null)" == "$(cut -d' ' -f2 "$stamp")" ]]; then
    log "$tag is current (inputs $key)"; return
  fi
  ignore=()
  [[ -f "$ROOT/$file.dockerignore" ]] && ignore=(--ignorefile "$ROOT/$file.dockerignore")
  logf="$WORK/bud-$(basename "$file" .Dockerfile).log"
  log "building $tag from $file"
  # --network host: pip reaches PyPI directly (no CNI config of the node's is touched);
  # --layers: unchanged steps come from the cache (a source change does not reinstall dependencies).
  progress "$(basename "$file" .Dockerfile)" "$logf" \
    bah bud --layers --network host --isolation chroot --format docker "${ignore[@]}" "${args[@]}" \
      -f "$ROOT/$file" -t "$tag" "$ROOT" \
    || { tail -30 "$logf" >&2; die "buildah bud of $file failed (log: $logf)"; }
  mkdir -p "$WORK/stamps"
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
    rm -f "$archive" "$archive.id"
    bah push --quiet "$tag" "docker-archive:$archive.part:$tag" >/dev/null && mv "$archive.part" "$archive"
    echo "$id" > "$archive.id"
  done
}

# --- 3. the SBOMs: syft reads each archive's files (dpkg's status, Python's dist-info) -------------
syft_bin() {
  local dir
  dir="$("$ROOT/scripts/build-upstream.sh" syft 2>"$WORK/syft-build.log" | tail -1)" \
    || { tail -20 "$WORK/syft-build.log" >&2; die "building syft failed (log: $WORK/syft-build.log; SBOM=0 skips the SBOMs)"; }
  echo "$dir/syft"
}

sboms() {  # sboms <tag>...: <archive>.cdx.json (CycloneDX) and <archive>.spdx.json (SPDX) beside it
  local syft tag archive id t0
  if [[ "${SBOM:-1}" == 0 ]]; then log "SBOM=0: no SBOMs written"; return; fi
  syft="$(syft_bin)"
  for tag in "$@"; do
    archive="$(archive_of "$tag")"; id="$(cat "$archive.id")"
    [[ -s "$archive.cdx.json" && -s "$archive.spdx.json" && "$(cat "$archive.sbom.id" 2>/dev/null)" == "$id" ]] \
      && continue
    t0="$(now)"
    SYFT_CHECK_FOR_APP_UPDATE=false "$syft" scan --quiet "docker-archive:$archive" \
      --source-name "${tag%:*}" --source-version "${tag##*:}" \
      -o "cyclonedx-json=$archive.cdx.json.part" -o "spdx-json=$archive.spdx.json.part" \
      || die "syft failed on $archive"
    mv "$archive.cdx.json.part" "$archive.cdx.json"; mv "$archive.spdx.json.part" "$archive.spdx.json"
    echo "$id" > "$archive.sbom.id"
    log "  SBOM of $tag in $(since "$t0"): $(basename "$archive").cdx.json, .spdx.json"
  done
}

image_size() { bah images --format '{{.Size}}' "$1" | head -1; }

archives() {  # name=archive path, one per image; the SBOMs are <archive>.cdx.json and .spdx.json
  printf 'sidecar=%s\nwebhook=%s\nmcp=%s\ntestkit=%s\n' "$(archive_of "$SIDECAR_IMAGE")" \
    "$(archive_of "$WEBHOOK_IMAGE")" "$(archive_of "$MCP_IMAGE")" "$(archive_of "$TESTKIT_IMAGE")"
}

sizes() {
  local tag
  for tag in "$@"; do
    log "  $(printf '%-52s %4s MB archive, %s' "$tag" "$(( $(stat -c %s "$(archive_of "$tag")") / 1000000 ))" \
      "$(archive_of "$tag")")"
  done
}

# --- 4. load into the node's containerd ---------------------------------------------------------
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
    # what containerd holds under the tag, by image ID (not a stamp of ours: a node restarted from
    # other archives, or another tree's `make images`, can put an older image under the same tag)
    if [[ "$(loaded_id "$addr" "$tag")" == "$id" ]]; then
      log "  $tag already in containerd"; continue
    fi
    t0="$(now)"; archive="$(archive_of "$tag")"
    ctr --address "$addr" -n k8s.io images import "$archive" >/dev/null \
      || die "ctr images import of $tag failed"
    [[ "$(loaded_id "$addr" "$tag")" == "$id" ]] \
      || die "containerd holds another image than $archive under $tag after the import"
    log "  loaded $tag into containerd ($addr) in $(since "$t0")"
  done
}

loaded_id() {  # loaded_id <address> <tag>: the image ID (config digest) containerd holds for <tag>
  local digest
  digest="$(ctr --address "$1" -n k8s.io images ls "name==$2" 2>/dev/null | awk 'NR == 2 {print $3}')"
  [[ -n "$digest" ]] || return 0
  ctr --address "$1" -n k8s.io content get "$digest" 2>/dev/null | python3 -c '
import json, sys
try:
    print(json.load(sys.stdin).get("config", {}).get("digest", "").removeprefix("sha256:"))
except ValueError:
    pass'
}

# --- 5. keep the store small: vfs copies a whole root filesystem per layer, so every source change
# used to leave ~300 MB per image behind (33 GB after a day of builds). Kept: the tagged images, the
# layers under them, and every image the last `bud` of each Dockerfile used or made (the layer cache
# of the build stages, which no tagged image descends from). Working containers are only left by a
# build that died half-way; none is in use while we hold the lock.
prune() {
  local ids before
  bah rm --all >/dev/null 2>&1 || true
  before="$(du -sm "$STORE" 2>/dev/null | cut -f1)"
  mapfile -t ids < <(python3 - "$STORE/storage" "$WORK"/bud-*.log <<'PY'
import json, re, sys
store, logs = sys.argv[1], sys.argv[2:]
images = json.load(open(f"{store}/vfs-images/images.json"))
parent = {l["id"]: l.get("parent") for l in json.load(open(f"{store}/vfs-layers/layers.json"))}
used = set()
for path in logs:
    used.update(re.findall(r"^--> (?:Using cache )?([0-9a-f]{11,64})$", open(path).read(), re.M))
keep_layers = set()
for image in images:
    if image.get("names") or any(image["id"].startswith(u) for u in used):
        layer = image.get("layer")
        while layer and layer not in keep_layers:
            keep_layers.add(layer)
            layer = parent.get(layer)
for image in images:
    if not image.get("names") and image.get("layer") not in keep_layers:
        print(image["id"])
PY
  )
  [[ ${#ids[@]} -eq 0 ]] && return
  bah rmi "${ids[@]}" >/dev/null 2>&1 || bah rmi --prune >/dev/null 2>&1 || true
  log "pruned ${#ids[@]} unused build layers: ${before:-?} MB -> $(du -sm "$STORE" | cut -f1) MB in $STORE"
}

build() {
  local t0 tars; t0="$(now)"
  need_tools
  mkdir -p "$STORE" "$IMGDIR" "$WORK"
  # one build per store at a time (a second `make images` waits rather than corrupting the first)
  exec 9>"$WORK/.lock"
  flock -n 9 || { log "another build holds $WORK/.lock: waiting"; flock 9; }
  bah rm --all >/dev/null 2>&1 || true
  log "[1/4] bases"
  mapfile -t tars < <(build_base_tars)
  [[ ${#tars[@]} -eq 2 ]] || die "the base tarballs were not made"
  import_base "${tars[0]}" "$BUILD_BASE_IMAGE"
  import_base "${tars[1]}" "$BASE_IMAGE"
  log "[2/4] images (buildah bud; a cold build installs every dependency from PyPI)"
  bud images/sidecar.Dockerfile "$SIDECAR_IMAGE" "CRYPTOGRAPHY_OPENSSL=${CRYPTOGRAPHY_OPENSSL:-system}"
  bud images/webhook.Dockerfile "$WEBHOOK_IMAGE"
  bud images/mcp-example.Dockerfile "$MCP_IMAGE"
  bud images/testkit.Dockerfile "$TESTKIT_IMAGE" "SIDECAR_IMAGE=$SIDECAR_IMAGE"
  log "[3/4] archives and SBOMs in $IMGDIR"
  save "${ALL_IMAGES[@]}"
  sboms "${ALL_IMAGES[@]}"
  prune
  log "[4/4] load"
  load "${ALL_IMAGES[@]}"
  log "done in $(since "$t0"):"
  sizes "${ALL_IMAGES[@]}"
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
  archives) archives ;;
  load) load "${ALL_IMAGES[@]}" ;;
  prune) mkdir -p "$WORK"; exec 9>"$WORK/.lock"; flock 9; prune ;;
  # only step 1's debootstrap (network and disk): scripts/prebuild.sh runs it while Go compiles
  bases) need_tools; mkdir -p "$WORK"; exec 9>"$WORK/.lock"; flock 9; build_base_tars >/dev/null ;;
  *) die "usage: $0 [build|push|names|archives|load|prune|bases]" ;;
esac
