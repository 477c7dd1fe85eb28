# syntax=docker/dockerfile:1.7
# Test-only: the sidecar image plus the dev stand-ins the in-cluster tests run as pods (the dev IdP,
# the dev Workload API; tests/cluster). Never installed by the manifests or the chart, never pushed.
# Built by scripts/build-images.sh after the sidecar image:
#   docker build -f images/testkit.Dockerfile --build-arg SIDECAR_IMAGE=outrider:dev -t outrider-testkit:dev .
ARG SIDECAR_IMAGE=outrider:dev

FROM ${SIDECAR_IMAGE}
USER 0:0
COPY sidecar/dev /tmp/outrider-dev
# into the installed outrider.sidecar package, wherever the base's Python keeps it
RUN site="$(python -c 'import os, outrider.sidecar as s; print(os.path.dirname(s.__file__))')" \
 && cp -r /tmp/outrider-dev "$site/dev" && rm -rf /tmp/outrider-dev \
 && find "$site/dev" -name '__pycache__' -prune -exec rm -rf {} +
LABEL org.opencontainers.image.title="outrider-testkit" \
      org.opencontainers.image.description="Outrider's sidecar image plus its dev stand-ins: tests only"
USER 15337:15337
