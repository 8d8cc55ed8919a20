"""Binary attributes of the whole image (e.g. face attributes)."""

from __future__ import annotations

import numpy as np

from parsimony.tasks.base import Field, FieldValue, Kind, Picture, TaskInfo, sigmoid


class Attributes(Kind):
    name = "attributes"
    dense = False
    labels_key = "attribute_names"
    target = "float32 [A] in {0, 1}"
    semantics = "logits, sigmoid gives the probability"
    fields = (Field("probabilities", "map", "{attribute name: probability}"),)
    primary = "probabilities"

    def postprocess(self, task: TaskInfo, raw: np.ndarray, dtype: np.dtype, probabilities: bool) -> dict[str, FieldValue]:
        scores = sigmoid(raw, np.float64)
        names = task.labels or tuple(str(i) for i in range(raw.shape[0]))
        return {"probabilities": dict(zip(names, scores.tolist(), strict=True))}

    def field_shape(self, task: TaskInfo, field: str, image_size: tuple[int, int]) -> tuple[int, ...]:
        return (task.channels,)

    def picture(self, task: TaskInfo, value: FieldValue) -> Picture:
        ordered = {name: value[name] for name in task.labels if name in value} | dict(value)
        return Picture("scores", ordered, ", ".join(f"{k} {v:.2f}" for k, v in ordered.items()))
