"""Small, honest latency measurements: median wall time after warm-up, PyTorch eager and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from parsimony import onnxrt
from training.timing import median_ms

__all__ = ["eager_ms", "example_batch", "median_ms", "ort_ms"]


def example_batch(image_size: tuple[int, int], batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, *image_size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def eager_ms(model: nn.Module, image_size: tuple[int, int], batch: int, **kw) -> float:
    model = model.eval()
    x = example_batch(image_size, batch)
    return median_ms(lambda: model(x), **kw)


def ort_ms(path: Path, image_size: tuple[int, int], batch: int, *, threads: int | None = None, **kw) -> float:
    """Median latency of ONNX Runtime over ``path`` (``threads`` None: ONNX Runtime's default)."""
    session = onnxrt.session(path, threads=threads or 0)
    feed = {session.get_inputs()[0].name: example_batch(image_size, batch).numpy().astype(np.float32)}
    return median_ms(lambda: session.run(None, feed), **kw)
