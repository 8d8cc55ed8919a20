"""Surface normals: a unit vector per pixel."""

from __future__ import annotations

import numpy as np

from parsimony.tasks.base import Field, FieldValue, Kind, Picture, TaskInfo


class Normal(Kind):
    name = "normal"
    dense = True
    fixed_channels = 3
    target = "float32 [3, H, W] unit vectors, all-0 = invalid"
    semantics = "unit vectors (L2-normalised in the graph), camera frame x right, y down, z forward"
    fields = (Field("normal", "tensor", "[3, H, W] unit vectors, camera frame (x right, y down, z forward)"),)
    primary = "normal"

    def postprocess(self, task: TaskInfo, raw: np.ndarray, dtype: np.dtype, probabilities: bool) -> dict[str, FieldValue]:
        return {"normal": raw.astype(dtype, copy=False)}

    def field_shape(self, task: TaskInfo, field: str, image_size: tuple[int, int]) -> tuple[int, ...]:
        return (3, *image_size)

    def picture(self, task: TaskInfo, value: FieldValue) -> Picture:
        mean = value.reshape(3, -1).astype(np.float64).mean(axis=1)
        return Picture("vector", value, f"mean direction x {mean[0]:+.2f}, y {mean[1]:+.2f}, z {mean[2]:+.2f}")
