"""Test fixtures for the real Triton server: the launcher lives in `serving.triton_process` (the
benchmarks use it too); this adds `require_triton`, which turns a missing server into a skip or a
failure that says how to install it.

    from triton_server import require_triton, start_tritonserver
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.triton_process import (  # noqa: F401  (re-exported for the tests)
    SKIP_ENV,
    TritonInstall,
    TritonServer,
    TritonUnavailable,
    start_tritonserver,
)


def require_triton(venv: Path | None = None) -> TritonInstall:
    """The installation, a skip when ``PARSIMONY_SKIP_TRITON=1``, else a failure that says how to
    create the environment (a missing server must not pass silently)."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: tests against the real Triton server are skipped")
    try:
        return TritonInstall.locate(venv)
    except TritonUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
