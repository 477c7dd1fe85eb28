#!/usr/bin/env bash
# Installs the Debian packages Outrider's tests and demo use (iptables, iproute2, ...) when missing.
# Without root it only reports what is missing: the tests that need them then skip with a reason.
set -euo pipefail
need=()
command -v iptables >/dev/null || need+=(iptables)
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
command -v unzip >/dev/null || need+=(unzip)
command -v pgrep >/dev/null || need+=(procps)
command -v setpriv >/dev/null || need+=(util-linux)
command -v redis-server >/dev/null || need+=(redis-server)
# `make node` (OUTRIDER_NODE_DEPS=1): containerd + runc, the CNI plugins, gcc for the pause binary
if [[ "${OUTRIDER_NODE_DEPS:-0}" == 1 ]]; then
  command -v containerd >/dev/null || need+=(containerd)
  command -v runc >/dev/null || need+=(runc)
  [[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
  command -v gcc >/dev/null || need+=(gcc libc6-dev)
  [[ -x /bin/busybox ]] || need+=(busybox-static)
fi
[[ ${#need[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "[sysdeps] missing ${need[*]}; not root, so not installing (tests needing them will skip)" >&2
  exit 0
fi
echo "[sysdeps] installing ${need[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
