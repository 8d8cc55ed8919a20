# syntax=docker/dockerfile:1
# The model bundle: the model_repository/ that `python -m serving.convert` filled, plus the init step
# (sync-models.py) that copies it into the shared model repository volume when a Triton or gateway
# pod starts (deploy/k8s/base: init container `sync-models`). A new model version is a new tag.
#
#   docker build -f deploy/docker/models.Dockerfile -t REGISTRY/parsimony-models:0.1.0 .
#
# Same pinned base as the gateway, so nodes share its layers.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS models
COPY deploy/docker/sync-models.py /usr/local/bin/sync-models.py
COPY model_repository /bundle
ENV PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
ENTRYPOINT ["python", "/usr/local/bin/sync-models.py", "/bundle"]
CMD ["/models"]
