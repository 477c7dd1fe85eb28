# syntax=docker/dockerfile:1.7
# The sidecar image, used twice per injected pod: `outrider sidecar` (outrider-proxy, UID 15337) and
# `outrider iptables` (outrider-init, runs once with NET_ADMIN/NET_RAW and needs iptables binaries).
# It carries only those two commands: the sidecar package without its demo and dev stand-ins
# (sidecar/demo, sidecar/dev), the CLI entry point without the webhook's modules, the dependencies in
# images/requirements/sidecar.txt, no pip, no build tools (docs/install.md, "What is in each image").
# Build from the repository root:  docker build -f images/sidecar.Dockerfile -t outrider:dev .
# Pin the bases by digest in release builds: --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:...
# (BUILD_IMAGE: where the virtualenv is made; the same Python as PYTHON_IMAGE, with venv/pip.)
# CRYPTOGRAPHY_OPENSSL: `system` (the default) compiles cryptography here against the base's OpenSSL,
# the one Python's `ssl` already maps, which makes every sidecar ~5.5 MB smaller (idle RSS;
# docs/capacity.md) and leaves OpenSSL's security updates to the base's packages. It needs Debian's
# Rust toolchain (rustc-web, cargo-web), OpenSSL and Python headers, and crates.io, in the build stage
# only (~3 minutes more on a cold build). `bundled` installs cryptography's PyPI wheel instead, which
# carries its own OpenSSL linked statically: for a build machine that cannot reach crates.io.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG BUILD_IMAGE=python:3.11.11-slim-bookworm

FROM ${BUILD_IMAGE} AS build
ARG CRYPTOGRAPHY_OPENSSL=system
# with `system`: the cryptography release compiled (its sdist needs crates from crates.io; 46.0.3 is
# the newest whose crates this project's build machines could fetch, and satisfies `cryptography>=42`)
ARG CRYPTOGRAPHY_SYSTEM_VERSION=46.0.3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN case "$CRYPTOGRAPHY_OPENSSL" in \
      bundled) ;; \
      system) apt-get update \
        && apt-get install -y --no-install-recommends rustc-web cargo-web gcc libc6-dev libssl-dev pkg-config \
        && { python -c 'import os, sysconfig; assert os.path.exists(sysconfig.get_path("include") + "/Python.h")' \
             || apt-get install -y --no-install-recommends python3-dev; } \
        && rm -rf /var/lib/apt/lists/* ;; \
      *) echo "CRYPTOGRAPHY_OPENSSL must be bundled or system, not '$CRYPTOGRAPHY_OPENSSL'" >&2; exit 1 ;; \
    esac
# the dependencies first, in a layer of their own: a source change then rebuilds in seconds (a wheel
# built from cryptography's sdist also installs its test suite as a top-level `tests`: removed)
COPY images/requirements/sidecar.txt ./requirements.txt
RUN python -m venv /opt/outrider \
 && if [ "$CRYPTOGRAPHY_OPENSSL" = system ]; then set -- --no-binary cryptography "cryptography==$CRYPTOGRAPHY_SYSTEM_VERSION"; fi \
 && /opt/outrider/bin/pip install --no-compile "$@" -r requirements.txt \
 && if [ "$CRYPTOGRAPHY_OPENSSL" = system ]; then \
      site="$(/opt/outrider/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"; \
      if grep -q '^tests/' "$site"/cryptography-*.dist-info/RECORD; then rm -rf "$site/tests"; fi; \
    fi
COPY pyproject.toml ./
# outrider/ holds the namespace package and symlinks to the two folders below (docs/design.md); the
# build context holds only the files this image runs (sidecar.Dockerfile.dockerignore)
COPY outrider ./outrider
COPY webhook ./webhook
COPY sidecar ./sidecar
# --no-deps: the requirement set above is this image's share of pyproject.toml's dependencies;
# then pip and setuptools leave the virtualenv (nothing installs packages at run time). A one-line
# README stands in for the repository's as the package description, so a docs edit never rebuilds.
RUN echo 'Outrider: https://github.com/outrider-dev/outrider' > README.md \
 && /opt/outrider/bin/pip install --no-compile --no-deps . \
 && /opt/outrider/bin/python -m pip uninstall -y -q pip setuptools \
 && find /opt/outrider -name '__pycache__' -prune -exec rm -rf {} +
# Bytecode for everything in the virtualenv, compiled once here (~20 MB): without it each sidecar
# compiles aiohttp, cryptography, h2, ... and its own modules at every start, ~0.3 s more CPU and an
# ~8 MB higher start-up peak (VmHWM) than idle, which a memory limit must cover (docs/capacity.md).
# unchecked-hash: the image never changes, so the sources' timestamps are not consulted. A module
# written for a newer Python (coredis ships one for 3.12's `type` statement) does not compile and is
# never imported here: compileall lists it and the build goes on.
RUN /opt/outrider/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/outrider/lib \
 || echo "compileall: the modules above are for another Python version; they are never imported"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="outrider" \
      org.opencontainers.image.description="Outrider sidecar: outrider sidecar (outrider-proxy) and outrider iptables (outrider-init)" \
      org.opencontainers.image.source="https://github.com/outrider-dev/outrider" \
      org.opencontainers.image.licenses="Apache-2.0"
# iptables (nft backend, with the legacy binaries for older nodes) for outrider-init only
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 15337 outrider && useradd --uid 15337 --gid 15337 --no-create-home --shell /usr/sbin/nologin outrider
COPY --from=build /opt/outrider /opt/outrider
# The standard library's bytecode, which python:*-slim bases ship without: with PYTHONDONTWRITEBYTECODE
# (and a read-only UID) every sidecar would compile the ~200 stdlib modules it imports at each start,
# which costs start-up CPU and leaves ~1.2 MB more idle RSS (docs/capacity.md). Where the base already
# has it (Debian's python3 package compiles on install), compileall finds it current and writes nothing.
RUN python -m compileall -q -j 0 -x '/(test|tests|idlelib|tkinter|turtledemo|ensurepip|lib2to3|site-packages)/' \
      "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
ENV PATH=/opt/outrider/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# the only UID whose traffic the capture rules let out unredirected; outrider-init overrides to root
USER 15337:15337
EXPOSE 15001 15006 15020
ENTRYPOINT ["outrider"]
CMD ["sidecar"]
