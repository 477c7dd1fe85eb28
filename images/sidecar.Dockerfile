# syntax=docker/dockerfile:1.7
# The sidecar image, used twice per injected pod: `outrider sidecar` (outrider-proxy, UID 15337) and
# `outrider iptables` (outrider-init, runs once with NET_ADMIN/NET_RAW and needs iptables binaries).
# Build from the repository root:  docker build -f images/sidecar.Dockerfile -t outrider:dev .
# Pin the base by digest in release builds: --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
# the dependencies first, in a layer of their own (empty stand-in packages): a source change then
# rebuilds in seconds instead of reinstalling every dependency
RUN mkdir outrider && touch README.md outrider/__init__.py \
 && python -m venv /opt/outrider && /opt/outrider/bin/pip install --no-compile . \
 && /opt/outrider/bin/pip uninstall -y -q outrider && rm -rf README.md outrider build ./*.egg-info
COPY README.md ./
# outrider/ holds the namespace package and symlinks to the two folders below (docs/design.md)
COPY outrider ./outrider
COPY webhook ./webhook
COPY sidecar ./sidecar
RUN /opt/outrider/bin/pip install --no-compile --no-deps . \
 && find /opt/outrider -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="outrider" \
      org.opencontainers.image.source="https://github.com/outrider-dev/outrider" \
      org.opencontainers.image.licenses="Apache-2.0"
# iptables (nft backend, with the legacy binaries for older nodes) for outrider-init only
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 15337 outrider && useradd --uid 15337 --gid 15337 --no-create-home --shell /usr/sbin/nologin outrider
COPY --from=build /opt/outrider /opt/outrider
ENV PATH=/opt/outrider/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# the only UID whose traffic the capture rules let out unredirected; outrider-init overrides to root
USER 15337:15337
EXPOSE 15001 15006 15020
ENTRYPOINT ["outrider"]
CMD ["sidecar"]
