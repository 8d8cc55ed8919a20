"""Shared fixtures: small trained-and-exported runs that serving, client and deployment tests start from.

Each is trained once per test session by the real ``training.run`` (tiny encoder, a few samples,
the regulariser on) and ends, like every run, with ``model.onnx`` (the final graph: pixels in,
answers out), ``manifest.json`` and ``compact/``; the ``_raw`` variants are copies exported again
as raw graphs (``--raw-outputs``: float32 images in, each task's head output out), for the tests
of serving raw graphs. λ is kept small enough that the outputs still depend on the image (a
serving test that mixed up batch rows must fail); tests of channel removal build their own sparse
runs. Treat them as read-only: copy before modifying.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from training.export.__main__ import export_run
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


def _raw(tmp_path_factory, run: Path) -> Path:
    copy = tmp_path_factory.mktemp("exported-raw") / run.name
    shutil.copytree(run, copy)
    export_run(copy, raw_outputs=True)
    return copy


@pytest.fixture(scope="session")
def exported_raw_run(exported_run, tmp_path_factory) -> Path:
    """`exported_run` exported as a raw graph."""
    return _raw(tmp_path_factory, exported_run)


@pytest.fixture(scope="session")
def exported_raw_faces_run(exported_faces_run, tmp_path_factory) -> Path:
    """`exported_faces_run` exported as a raw graph."""
    return _raw(tmp_path_factory, exported_faces_run)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``): on
    shared 2-core machines OpenMP spin-waits dominate tiny convolutions."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
