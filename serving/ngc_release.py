"""The NVIDIA NGC release the GPU serving stack is pinned to, named once.

A TensorRT plan loads only in the TensorRT version that built it, so the Triton image that serves
plans (deploy/k8s/base/triton.yaml), the TensorRT image that builds them (deploy/engine-builder,
deploy/docker/engine-builder.Dockerfile) and the ``tensorrt`` Python extra (pyproject.toml) must
come from one release. Those files cannot import Python, so they repeat the values below and a test
(tests/test_engine_builder.py) fails when any of them disagrees. To move to another release,
change it here, then in those files, and look up its TensorRT version in NVIDIA's release notes
for the Triton container.
"""

from __future__ import annotations

NGC_RELEASE = "24.10"
TENSORRT_VERSION = "10.5.0"  # the TensorRT of NGC_RELEASE's Triton and TensorRT containers
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE}-py3"
TENSORRT_IMAGE = f"nvcr.io/nvidia/tensorrt:{NGC_RELEASE}-py3"
TENSORRT_REQUIREMENT = "tensorrt>=10.5,<10.6"  # the pyproject extra: any patch release of TENSORRT_VERSION


def same_release(installed: str, pinned: str = TENSORRT_VERSION) -> bool:
    """Whether TensorRT ``installed`` builds plans that ``pinned`` loads: same major and minor."""
    return installed.split(".")[:2] == pinned.split(".")[:2]
