"""Replaying an in-place update as a CUDA graph.

The proximal step is a few hundred small kernels (a reduction and a multiply per parameter slice):
on a GPU it costs the time to launch them from Python, about 6 ms for the dilated ResNet-50, not
the time to run them (its weights are read and written once, well under a millisecond). Captured
once as a CUDA graph, the same kernels replay with one launch. The update must work in place on
tensors whose addresses do not change (the model's parameters) and take its per-call inputs from
device tensors (`lr`, `stepped`), which are refreshed before each replay without synchronising.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger("training")
WARMUP_CALLS = 2  # eager calls before the capture (allocator and kernel caches settle)


class CapturedUpdate:
    """``update(lr, stepped)``, eager for the first calls, then captured and replayed.

    ``body(lr, stepped)`` receives 0-dim device tensors: the learning rate (float64) and whether the
    optimizer step was taken (bool). If the capture fails (an operation CUDA graphs do not allow),
    the update stays eager and says so once.
    """

    def __init__(self, body: Callable[[Tensor, Tensor], None], device: torch.device) -> None:
        self.body = body
        self.lr = torch.zeros((), dtype=torch.float64, device=device)
        self.stepped = torch.ones((), dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_calls = 0
        self.failed = False

    def __call__(self, lr: float, stepped: Tensor | None = None) -> None:
        self.lr.fill_(lr)
        if stepped is None:
            self.stepped.fill_(True)
        else:
            self.stepped.copy_(stepped, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
        elif self.failed or self.eager_calls < WARMUP_CALLS:
            self._eager()
        else:
            self._capture_and_replay()

    def _eager(self) -> None:
        self.eager_calls += 1
        side = torch.cuda.Stream()  # as torch.cuda.graph asks: warm up off the default stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.body(self.lr, self.stepped)
        torch.cuda.current_stream().wait_stream(side)

    def _capture_and_replay(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads (the data loader's pinning thread) may use CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.body(self.lr, self.stepped)
        except RuntimeError as exc:
            self.failed = True
            log.warning("the proximal step could not be captured as a CUDA graph (%s); it stays eager", exc)
            self._eager()
            return
        self.graph = graph
        graph.replay()  # the capture recorded the kernels without running them
