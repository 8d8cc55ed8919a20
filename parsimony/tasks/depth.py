"""Monocular depth in metres."""

from __future__ import annotations

from typing import Any

import numpy as np

from parsimony.tasks.base import Field, FieldValue, Kind, Picture, TaskInfo


class Depth(Kind):
    name = "depth"
    dense = True
    fixed_channels = 1
    unit = "metres"
    target = "float32 [1, H, W] metres, 0 = invalid"
    semantics = "depth in metres per pixel"
    fields = (Field("depth", "tensor", "[H, W] metres, clamped at 0"),)
    primary = "depth"

    def manifest_section(self, task: TaskInfo) -> dict[str, Any]:
        return super().manifest_section(task) | {
            "value_range": "non-negative metres expected (the head is unconstrained: clamp at 0); 0 = invalid in targets"}

    def postprocess(self, task: TaskInfo, raw: np.ndarray, dtype: np.dtype, probabilities: bool) -> dict[str, FieldValue]:
        return {"depth": np.maximum(raw[0], 0).astype(dtype, copy=False)}

    def field_shape(self, task: TaskInfo, field: str, image_size: tuple[int, int]) -> tuple[int, ...]:
        return tuple(image_size)

    def picture(self, task: TaskInfo, value: FieldValue) -> Picture:
        finite = value[np.isfinite(value)].astype(np.float64)
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        return Picture("scalar", value, f"{lo:.3g} to {hi:.3g} m", unit="m",
                       text={"depth_min_m": lo, "depth_max_m": hi})
