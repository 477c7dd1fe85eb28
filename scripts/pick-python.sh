#!/usr/bin/env bash
# Prints a Python 3.11+ that every UID can run, for the project's virtualenv. Tests and the demo run
# app processes as UID 1000 and the sidecar as UID 15337 from that venv, so an interpreter under a
# private home (pyenv under /root, mode 700) cannot serve them, whatever PATH offers first.
#   scripts/pick-python.sh            # the interpreter's path on stdout, the reason on stderr
# Order: $PYTHON if set, then the python3.11+ on PATH, then the system's /usr/bin and /usr/local/bin.
# As root with none usable, installs Debian's python3 + python3-venv and tries again.
set -euo pipefail

log() { printf '[pick-python] %s\n' "$*" >&2; }

# world_reaches FILE BITS: every directory up to FILE's real path is searchable by others and FILE has
# the octal permission BITS for others (5 = r-x for an interpreter, 4 = r-- for a library file)
world_reaches() {
  local path dir
  path="$(readlink -f "$1" 2>/dev/null)" && [[ -e $path ]] || return 1
  (( (8#$(stat -c %a "$path") & 8#00$2) == 8#00$2 )) || return 1
  dir="$(dirname "$path")"
  while [[ $dir != / ]]; do
    (( 8#$(stat -c %a "$dir") & 8#001 )) || return 1
    dir="$(dirname "$dir")"
  done
}

# usable PY: Python 3.11+ with venv + ensurepip, and it and its standard library reachable by any UID
usable() {
  local py="$1" stdlib
  world_reaches "$py" 5 || return 1
  stdlib="$("$py" -c 'import sys, venv, ensurepip, sysconfig; assert sys.version_info >= (3, 11); print(sysconfig.get_path("stdlib"))' 2>/dev/null)" || return 1
  world_reaches "$stdlib/os.py" 4
}

candidates() {
  [[ -n ${PYTHON:-} ]] && command -v "$PYTHON" 2>/dev/null
  local name
  for name in python3.14 python3.13 python3.12 python3.11 python3; do
    type -a -P "$name" 2>/dev/null || true
  done
  for name in /usr/bin/python3 /usr/local/bin/python3 /usr/bin/python3.11 /usr/bin/python3.12 /usr/bin/python3.13; do
    [[ -e $name ]] && echo "$name"
  done
  return 0
}

pick() {
  local py
  while read -r py; do
    [[ -n $py ]] || continue
    if usable "$py"; then
      readlink -f "$py"
      return 0
    fi
    log "skipping $py: not Python 3.11+ with venv, or not runnable by other UIDs (its path is private)"
  done < <(candidates | awk '!seen[$0]++')
  return 1
}

pick 2>/dev/null && exit 0
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  log "no Python 3.11+ runnable by every UID found; installing Debian's python3 and python3-venv"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
  pick && exit 0
fi
pick || true
log "no usable Python: need Python 3.11+ with the venv module at a path every UID can reach"
log "(the tests run app processes as UID 1000 and the sidecar as UID 15337 from the project's .venv);"
log "install one (Debian: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3.11"
exit 2
