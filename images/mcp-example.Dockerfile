# syntax=docker/dockerfile:1.7
# An unchanged MCP server image for Outrider's in-cluster tests: the `mcp` SDK example server in
# examples/mcp-server and nothing of Outrider. Build from the repository root:
#   docker build -f images/mcp-example.Dockerfile -t mcp-example-server:dev .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG BUILD_IMAGE=python:3.11.11-slim-bookworm

FROM ${BUILD_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY examples/mcp-server/requirements.txt /opt/mcp-src/requirements.txt
RUN python -m venv /opt/mcp && /opt/mcp/bin/pip install --no-compile -r /opt/mcp-src/requirements.txt \
 && /opt/mcp/bin/python -m pip uninstall -y -q pip setuptools \
 && find /opt/mcp -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 PATH=/opt/mcp/bin:$PATH
COPY --from=build /opt/mcp /opt/mcp
COPY examples/mcp-server/server.py /opt/mcp-src/server.py
USER 1000:1000
EXPOSE 8080
CMD ["python", "/opt/mcp-src/server.py"]
