# syntax=docker/dockerfile:1.7
# The admission webhook image: `outrider webhook` as UID 65532, no shell tools beyond the base.
# It also answers `outrider check`, `outrider inject` and `outrider certs` (same code and dependencies).
# It carries the webhook package, the sidecar's configuration parsers it validates with (not the
# demo or the dev stand-ins), the dependencies in images/requirements/webhook.txt, no pip, no iptables.
# Build from the repository root:  docker build -f images/webhook.Dockerfile -t outrider-webhook:dev .
# Pin the bases by digest in release builds: --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:...
# (BUILD_IMAGE: where the virtualenv is made; the same Python as PYTHON_IMAGE, with venv/pip.)
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG BUILD_IMAGE=python:3.11.11-slim-bookworm

FROM ${BUILD_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# the dependencies first, in a layer of their own: a source change then rebuilds in seconds
COPY images/requirements/webhook.txt ./requirements.txt
RUN python -m venv /opt/outrider && /opt/outrider/bin/pip install --no-compile -r requirements.txt
COPY pyproject.toml ./
# outrider/ holds the namespace package and symlinks to the two folders below (docs/design.md)
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

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="outrider-webhook" \
      org.opencontainers.image.description="Outrider admission webhook: outrider webhook, check, inject, certs" \
      org.opencontainers.image.source="https://github.com/outrider-dev/outrider" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/outrider /opt/outrider
ENV PATH=/opt/outrider/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# distroless-style nonroot UID; the Deployment also sets runAsNonRoot and a read-only root FS
USER 65532:65532
EXPOSE 9443
ENTRYPOINT ["outrider"]
CMD ["webhook", "--in-cluster"]
