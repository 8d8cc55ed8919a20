# syntax=docker/dockerfile:1
# The trainer: `torchrun -m training.run` on GPU nodes (the PyTorchJob in deploy/k8s/training): the
# contract package and training/ with the train extra (`pip install '.[train]'`), no serving code.
#
#   docker build -f deploy/docker/trainer.Dockerfile -t REGISTRY/parsimony-trainer:0.1.0 .
#
# PyTorch's default CUDA wheels carry their own CUDA, cuDNN and NCCL libraries, so a slim base is
# enough: the node's driver is mounted by the NVIDIA container toolkit. The torch pin follows the
# Makefile's TORCH_SPEC; its default wheel is built for CUDA 13.0 and needs an NVIDIA driver of the
# 580 series or newer on the node. With an older driver `--device cuda` stops with torch's reason
# and `--device auto` trains on the CPU, logging why; pick a wheel for an older CUDA
# (--build-arg TORCH_SPEC=... with PyTorch's matching index) for such nodes. Runs as uid 10001; runs and checkpoints go to a mounted volume (/runs),
# scratch files to /tmp.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheels
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN printf '%s\n' $TORCH_SPEC > /constraints.txt
COPY pyproject.toml README.md ./
COPY parsimony parsimony
COPY training training
RUN pip wheel --wheel-dir /wheels --constraint /constraints.txt '.[train]' $TORCH_SPEC

FROM ${PYTHON_IMAGE} AS trainer
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels 'parsimony[train]' \
 && groupadd --system --gid 10001 parsimony \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin parsimony
COPY configs /app/configs
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /app
ENTRYPOINT ["torchrun"]
CMD ["--standalone", "--nproc_per_node=gpu", "-m", "training.run", "--config", "configs/demo.yaml", "--out", "/runs/demo"]
