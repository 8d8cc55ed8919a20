"""Task vocabulary shared by data sets, models, losses, metrics and export.

A task is identified by its name (the key in a sample dict and in a model's output dict) and has a
kind, which fixes its target layout, loss, metrics and output semantics. `TaskSpec` and the kinds'
contract (target and output layouts, one module per kind) live in `parsimony.tasks`; what training
does with each kind (loss, metrics, baseline, heads, augmentation) in `training.kinds`.

| kind           | target in a sample                           | model output            |
|----------------|----------------------------------------------|-------------------------|
| `segmentation` | int64 ``[H, W]`` class index, -1 = ignore     | logits ``[N, C, H, W]`` |
| `depth`        | float32 ``[1, H, W]`` metres, 0 = invalid     | ``[N, 1, H, W]`` metres |
| `normal`       | float32 ``[3, H, W]`` unit, all-0 = invalid   | unit ``[N, 3, H, W]``   |
| `attributes`   | float32 ``[A]`` in {0, 1}                     | logits ``[N, A]``       |
| `edges`        | float32 ``[1, H, W]`` in {0, 1}, -1 = ignore  | logits ``[N, 1, H, W]`` |

Every sample also carries ``"image"``: float32 ``[3, H, W]`` with values in [0, 1]; the model
normalises internally.
"""

from __future__ import annotations

from parsimony.tasks import TaskSpec, kind, kind_names, select_tasks

__all__ = ["DENSE_KINDS", "TASK_KINDS", "TaskKind", "TaskSpec", "select_tasks"]

TaskKind = str  # a name in TASK_KINDS
TASK_KINDS: tuple[str, ...] = kind_names()
DENSE_KINDS: frozenset[str] = frozenset(name for name in TASK_KINDS if kind(name).dense)
