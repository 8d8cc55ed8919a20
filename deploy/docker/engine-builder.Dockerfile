# syntax=docker/dockerfile:1
# The engine builder: NVIDIA's TensorRT container (trtexec, TensorRT's Python API) plus parsimony, so
# `python -m serving.convert RUN --format tensorrt` builds and installs a plan on the GPU that will
# serve it. deploy/engine-builder's Job installs the plan its trtexec step built with this image.
#
#   docker build -f deploy/docker/engine-builder.Dockerfile -t REGISTRY/parsimony-engine-builder:0.1.0 .
#
# Keep TENSORRT_IMAGE at the release (YY.MM) of the Triton image in deploy/k8s/base/triton.yaml:
# a plan only loads in the TensorRT version that built it. torch is the CPU build (the converter only
# reads the export's tensor spec with it).
ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:24.10-py3

FROM ${TENSORRT_IMAGE} AS wheels
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip wheel --wheel-dir /wheels --index-url "$TORCH_INDEX" $TORCH_SPEC \
 && printf '%s\n' $TORCH_SPEC > /constraints.txt
COPY pyproject.toml README.md ./
COPY training training
COPY serving serving
RUN pip wheel --wheel-dir /wheels --find-links /wheels --constraint /constraints.txt .

FROM ${TENSORRT_IMAGE} AS engine-builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels parsimony \
 && groupadd --system --gid 10001 parsimony \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin parsimony
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["python3", "-m", "serving.convert"]
