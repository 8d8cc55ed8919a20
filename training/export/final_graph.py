"""The final graph: pre- and post-processing inside the exported model, so that the graph answers
with what the gateway returns and a client of ONNX Runtime or Triton needs no Python around it.

Input ``image`` (`parsimony.spec.image_input_spec`):

- ``uint8 [N, H, W, C]`` (the default): pixels as image decoders return them. The graph
  transposes them to ``[N, C, H, W]``, casts to float32 and divides by 255, then the model
  normalises as always (``(x - mean) / std``, `MultiTaskModel.normalize`), so the graph on pixels
  ``p`` computes exactly what the PyTorch model computes on ``p / 255``.
- ``float32 [N, C, H, W]`` in [0, 1] (``float_input``): the raw graph's input, for callers whose
  images are not 8-bit.

Outputs (`parsimony.tasks.final_io_spec`, in its order): per task every field of its answer in
every dtype the contract offers it in (`parsimony.tasks.Kind.graph_outputs`) and the head's raw
output ``TASK_raw``; e.g. ``seg`` (class map, uint8 up to 256 classes, else int32),
``seg_probabilities`` and ``seg_probabilities_fp16``, ``seg_raw`` (logits), ``depth`` and
``depth_fp16``, ``normal``, ``attr`` (probabilities), ``edges`` (0/255 uint8) and
``edges_probabilities``. Each training kind computes its fields from the raw output
(`training.kinds.TrainingKind.final_outputs`); `FinalOutputs` casts them to each output's dtype
(float16 copies are a Cast at the end of the graph). ONNX Runtime (and Triton's ONNX Runtime
backend) runs only the nodes the requested outputs need, so outputs nobody asks for (probabilities,
float16 copies, logits) cost nothing.

A raw graph (``raw_outputs``) is the graph exported before the final one existed: float32
``[N, C, H, W]`` input, one output per task named by the task (its head's raw output).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from parsimony.spec import ModelIOSpec
from parsimony.tasks import RAW, GraphOutput, final_io_spec
from training.export.spec import io_spec
from training.kinds import kind_of
from training.models.config import ModelConfig

PIXEL_MAX = 255.0  # uint8 pixels p are the model's images p / PIXEL_MAX
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8, "int32": torch.int32,
                "int64": torch.int64}


def graph_spec(config: ModelConfig, image_size: tuple[int, int], *, raw_outputs: bool = False,
               float_input: bool = False) -> tuple[ModelIOSpec, tuple[GraphOutput, ...]]:
    """The tensor spec of the graph exported from a model built from ``config`` at ``image_size``
    (H, W), and what each output of a final graph is (empty for a raw graph, whose input is float32
    whatever ``float_input`` says)."""
    if raw_outputs:
        return io_spec(config, image_size), ()
    return final_io_spec(config.tasks, image_size, config.encoder.in_channels,
                         input_dtype="float32" if float_input else "uint8", raw=True)


def input_dtype(spec: ModelIOSpec) -> str:
    """The dtype of the graph's image input."""
    (image,) = spec.inputs
    return image.dtype


def model_input(image: Tensor) -> Tensor:
    """What the model sees of a graph input: uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]``
    divided by 255 (transposed first: moving bytes is cheaper than moving floats); float32
    ``[N, C, H, W]`` as it is."""
    if image.dtype == torch.uint8:
        return image.permute(0, 3, 1, 2).to(torch.float32) / PIXEL_MAX
    return image


def sample_input(spec: ModelIOSpec, batch: int, seed: int) -> Tensor:
    """A fixed-seed batch from the whole domain of the graph's input: uniform uint8 pixels, or
    uniform [0, 1) floats."""
    (image,) = spec.inputs
    generator = torch.Generator().manual_seed(seed)
    shape = image.concrete_shape(batch)
    if image.dtype == "uint8":
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch.rand(shape, generator=generator, dtype=torch.float32)


class FinalOutputs(nn.Module):
    """A float32 CPU eval-mode copy of a `MultiTaskModel` that takes the graph's image input and
    returns ``outputs`` (a final graph's `GraphOutput` list) as a tuple, in order.

    The copy keeps ``torch.onnx.export`` (which restores the *wrapper's* training flag afterwards)
    from ever switching the caller's model back to training mode.
    """

    def __init__(self, model: nn.Module, outputs: tuple[GraphOutput, ...]) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).cpu().float()
        self.outputs = outputs
        self.tasks = {t.name: t for t in self.model.config.tasks}
        missing = sorted({o.task for o in outputs} - set(self.tasks))
        if missing:
            raise ValueError(f"outputs of tasks {missing} requested, the model has {sorted(self.tasks)}")
        self.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        raw = self.model(model_input(image))
        fields = {name: kind_of(task).final_outputs(task, raw[name]) for name, task in self.tasks.items()}
        result = []
        for out in self.outputs:
            value = raw[out.task] if out.field == RAW else fields[out.task][out.field]
            dtype = TORCH_DTYPES[out.dtype]
            result.append(value if value.dtype == dtype else value.to(dtype))  # no no-op Casts in the graph
        return tuple(result)
