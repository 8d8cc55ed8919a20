"""The tensor spec of a model built from a `ModelConfig`.

Everything about tensor specs (names, dtypes, shapes, the check of a graph against its spec) is
`parsimony.spec`, re-exported here; what each task's output is comes from its kind
(`parsimony.tasks.model_io_spec`). This module only adds `io_spec`, which reads a model config.
"""

from __future__ import annotations

from parsimony.errors import SpecError, SpecMismatch
from parsimony.spec import (
    BATCH_DIM,
    DTYPES,
    DYNAMIC,
    INPUT_NAME,
    NAME_PATTERN,
    DType,
    ModelIOSpec,
    TensorSpec,
    load_onnx,
    validate_name,
)
from parsimony.tasks import model_io_spec
from training.models.config import ModelConfig

__all__ = ["BATCH_DIM", "DTYPES", "DYNAMIC", "INPUT_NAME", "NAME_PATTERN", "DType", "ModelIOSpec", "SpecError",
           "SpecMismatch", "TensorSpec", "io_spec", "load_onnx", "validate_name"]


def io_spec(model_config: ModelConfig, image_size: tuple[int, int]) -> ModelIOSpec:
    """The spec of a model built from ``model_config`` and exported at ``image_size`` (H, W)."""
    return model_io_spec(model_config.tasks, image_size, model_config.encoder.in_channels)
