# syntax=docker/dockerfile:1
# The prediction gateway, `python -m serving.server` (gRPC 50051, HTTP 8080 with /healthz, /readyz, /metrics).
#
#   docker build -f deploy/docker/gateway.Dockerfile -t REGISTRY/parsimony-gateway:0.1.0 .
#
# Slim: python's slim base and the serve extra only (`pip install '.[serve]'`: the contract package,
# ONNX Runtime, gRPC, FastAPI/uvicorn, the Triton client; no PyTorch, which the gateway never imports,
# a test checks it). Only parsimony/ and serving/ are copied, so the wheel holds no training code.
# Runs as uid 10001 with nothing written outside /tmp, so Kubernetes can mount the root file system
# read-only. Built with BuildKit (Docker 23+ or `docker buildx build`); the context is the repository
# root, filtered by its .dockerignore.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheels
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY parsimony parsimony
COPY serving serving
RUN pip wheel --wheel-dir /wheels '.[serve]'

FROM ${PYTHON_IMAGE} AS gateway
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels 'parsimony[serve]' \
 && groupadd --system --gid 10001 parsimony \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin parsimony
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["python", "-m", "serving.server"]
CMD ["--repository", "/models"]
