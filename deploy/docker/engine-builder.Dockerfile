# syntax=docker/dockerfile:1
# The engine builder: NVIDIA's TensorRT container (trtexec, TensorRT's Python API) plus parsimony's
# serve extra, so `python -m serving.convert RUN --format tensorrt` builds and installs a plan on the
# GPU that will serve it. deploy/engine-builder's Job installs the plan its trtexec step built with
# this image.
#
#   docker build -f deploy/docker/engine-builder.Dockerfile -t REGISTRY/parsimony-engine-builder:0.1.0 .
#
# Keep TENSORRT_IMAGE at the release (YY.MM) of the Triton image in deploy/k8s/base/triton.yaml:
# a plan only loads in the TensorRT version that built it. No PyTorch: the converter reads the
# export's tensor spec from its manifest (the contract package), and TensorRT comes with the base.
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:24.10-py3

FROM ${TENSORRT_IMAGE} AS wheels
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY parsimony parsimony
COPY serving serving
RUN pip wheel --wheel-dir /wheels '.[serve]'

FROM ${TENSORRT_IMAGE} AS engine-builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels 'parsimony[serve]' \
 && groupadd --system --gid 10001 parsimony \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin parsimony
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["python3", "-m", "serving.convert"]
