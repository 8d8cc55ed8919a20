"""Semantic boundaries: where one object or class meets another, a few pixels wide."""

from __future__ import annotations

import numpy as np

from parsimony.tasks.base import Field, FieldValue, Kind, Picture, TaskInfo, class_shares, sigmoid

THRESHOLD = 0.5  # probability at or above which a pixel is an edge (logit >= 0)
EDGE = 255  # an edge pixel in the edge map; background is 0


class Edges(Kind):
    name = "edges"
    dense = True
    fixed_channels = 1
    target = "float32 [1, H, W] in {0, 1} (1 = boundary), -1 = ignore"
    semantics = f"logits, sigmoid gives the boundary probability; an edge where it is >= {THRESHOLD}"
    fields = (
        Field("edge_map", "tensor", f"[H, W] uint8, {EDGE} on boundaries (probability >= {THRESHOLD}), 0 elsewhere",
              dtype="uint8"),
        Field("probabilities", "tensor", "[H, W] boundary probability", optional=True),
    )
    primary = "edge_map"

    def postprocess(self, task: TaskInfo, raw: np.ndarray, dtype: np.dtype, probabilities: bool) -> dict[str, FieldValue]:
        logits = raw[0]
        out: dict[str, FieldValue] = {"edge_map": np.where(logits >= 0, np.uint8(EDGE), np.uint8(0))}
        if probabilities:
            out["probabilities"] = sigmoid(logits).astype(dtype, copy=False)
        return out

    def field_shape(self, task: TaskInfo, field: str, image_size: tuple[int, int]) -> tuple[int, ...]:
        return tuple(image_size)

    def picture(self, task: TaskInfo, value: FieldValue) -> Picture:
        labels = ("background", "boundary")
        classes = (value >= EDGE // 2).astype(np.uint8)
        return Picture("classes", classes, f"{class_shares(classes, labels, top=2)}", labels=labels,
                       text={"classes": list(labels)})
