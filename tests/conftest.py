"""Shared fixtures: small trained-and-exported runs that serving, client and deployment tests start from.

Each is trained once per test session by the real ``training.run`` (tiny encoder, a few samples,
the regulariser on) and ends, like every run, with ``model.onnx``, ``manifest.json`` and
``compact/``. λ is kept small enough that the outputs still depend on the image (a serving test
that mixed up batch rows must fail); tests of channel removal build their own sparse runs.
Treat them as read-only: copy before modifying.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from training.run import main as run_main

_COMMON = ["--encoder", "tiny", "--image-size", "32", "48", "--train-samples", "24", "--val-samples", "8",
           "--batch-size", "8", "--lr", "0.003", "--epochs", "2", "--lam", "1"]


def _train(tmp_path_factory, name: str, dataset: str) -> Path:
    out = tmp_path_factory.mktemp("exported") / name
    assert run_main(["--dataset", dataset, *_COMMON, "--out", str(out)]) == 0
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    return out


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory) -> Path:
    """synthetic-scenes: segmentation (7 classes), depth and normal outputs at 32×48."""
    return _train(tmp_path_factory, "scenes", "synthetic-scenes")


@pytest.fixture(scope="session")
def exported_faces_run(tmp_path_factory) -> Path:
    """synthetic-faces: part segmentation plus binary attributes (a [batch, A] logits output) at 32×48."""
    return _train(tmp_path_factory, "faces", "synthetic-faces")
