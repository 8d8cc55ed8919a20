"""Test fixtures for the real Triton server: the launcher lives in `serving.triton_process` (the
benchmarks use it too); this adds `require_triton`, which turns a missing server into a skip or a
failure that says how to install it.

    from triton_server import randomised_copy, require_triton, start_tritonserver
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from serving.triton_process import (  # noqa: F401  (re-exported for the tests)
    SKIP_ENV,
    TritonInstall,
    TritonServer,
    TritonUnavailable,
    start_tritonserver,
)
from training.compaction import load_compact, load_plan, save_compact
from training.export.__main__ import export_run


def require_triton(venv: Path | None = None) -> TritonInstall:
    """The installation, a skip when ``PARSIMONY_SKIP_TRITON=1``, else a failure that says how to
    create the environment (a missing server must not pass silently)."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: tests against the real Triton server are skipped")
    try:
        return TritonInstall.locate(venv)
    except TritonUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


def randomised_copy(src: Path, dst: Path, seed: int, *, raw_outputs: bool = False) -> Path:
    """``src`` with its compact weights redrawn (He-normal convs, BN scales and shifts in [0.5, 1.5))
    and exported again: model.onnx and manifest.json from the real export path (the final graph,
    or with ``raw_outputs`` the raw one)."""
    shutil.copytree(src, dst)
    model = load_compact(dst / "compact")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * (2.0 / param[0].numel()) ** 0.5)
            else:
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
    save_compact(model, load_plan(dst / "compact"), dst / "compact")
    export_run(dst, raw_outputs=raw_outputs)
    return dst
