"""Hand-computed checks of the per-task losses and of the multi-task weighting."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import MultiTaskLoss, task_loss
from training.tasks import TaskSpec

SEG = TaskSpec("seg", "segmentation", 2)
DEPTH = TaskSpec("depth", "depth", 1)
NORMAL = TaskSpec("normal", "normal", 3)
ATTR = TaskSpec("attr", "attributes", 2, ("Male", "Smiling"))


def _normals(vectors: list[list[float]]) -> torch.Tensor:
    """[1, 3, 1, W] from a list of W 3-vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 1, -1)


def test_segmentation_cross_entropy_ignores_minus_one_and_out_of_range() -> None:
    # pixels: logits (0,0)->0, (2,0)->1, junk->-1 (ignored), junk->2 (out of range, ignored)
    logits = torch.tensor([[0.0, 2.0, 50.0, -50.0], [0.0, 0.0, -50.0, 50.0]]).view(1, 2, 1, 4)
    target = torch.tensor([[[0, 1, -1, 2]]])
    expected = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert task_loss(SEG, logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_depth_l1_over_nonzero_ground_truth() -> None:
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    gt = torch.tensor([[2.0, 0.0], [1.0, 4.0]]).view(1, 1, 2, 2)
    # valid errors 1, 2, 0; the pixel with gt 0 (error 2) is excluded
    assert task_loss(DEPTH, pred, gt).item() == pytest.approx(1.0)


def test_normal_loss_normalises_prediction_and_skips_zero_ground_truth() -> None:
    pred = _normals([[0, 0, 1], [0, 0, 3], [1, 0, 1], [1, 0, 0]])
    gt = _normals([[0, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    expected = (0.0 + 1.0 + (1 - 1 / math.sqrt(2))) / 3
    assert task_loss(NORMAL, pred, gt).item() == pytest.approx(expected, rel=1e-6)


def test_attributes_bce_with_logits() -> None:
    logits = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0]])
    expected = (math.log(2) + math.log(1 + math.e**2)) / 2
    assert task_loss(ATTR, logits, target).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("task", "output", "target"),
    [
        (SEG, torch.randn(2, 2, 3, 3), torch.full((2, 3, 3), -1)),
        (DEPTH, torch.randn(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)),
        (NORMAL, torch.randn(2, 3, 3, 3), torch.zeros(2, 3, 3, 3)),
    ],
    ids=["segmentation", "depth", "normal"],
)
def test_batch_without_valid_pixel_gives_zero_loss_with_grad(
    task: TaskSpec, output: torch.Tensor, target: torch.Tensor
) -> None:
    output.requires_grad_(True)
    loss = task_loss(task, output, target)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert output.grad is not None and torch.all(output.grad == 0)


def test_mismatched_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        task_loss(DEPTH, torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2))


def _two_depth_tasks(big: float, small: float) -> tuple[tuple[TaskSpec, ...], dict, dict]:
    """Two depth tasks whose L1 losses are the constants ``big`` and ``small``."""
    tasks = (TaskSpec("a", "depth", 1), TaskSpec("b", "depth", 1))
    target = torch.ones(1, 1, 2, 2)
    outputs = {"a": target + big, "b": target + small}
    return tasks, outputs, {"a": target, "b": target}


def test_equal_weighting_is_the_sum_and_has_no_parameters() -> None:
    tasks, outputs, batch = _two_depth_tasks(3.0, 0.5)
    module = MultiTaskLoss(tasks)
    total, raw = module(outputs, batch)
    assert total.item() == pytest.approx(3.5)
    assert {k: v.item() for k, v in raw.items()} == pytest.approx({"a": 3.0, "b": 0.5})
    assert list(module.parameters()) == [] and module.log_vars == {}


def test_uncertainty_weighting_formula() -> None:
    tasks, outputs, batch = _two_depth_tasks(3.0, 0.5)
    module = MultiTaskLoss(tasks, weighting="uncertainty")
    assert module.log_vars == {"a": 0.0, "b": 0.0}
    with torch.no_grad():
        module.log_variances["a"].fill_(0.5)
        module.log_variances["b"].fill_(-0.3)
    total, raw = module(outputs, batch)
    expected = math.exp(-0.5) * 3.0 + 0.5 + math.exp(0.3) * 0.5 - 0.3
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert raw["a"].item() == pytest.approx(3.0) and raw["a"].grad_fn is None


def test_uncertainty_log_variances_move_towards_log_loss() -> None:
    tasks, outputs, batch = _two_depth_tasks(10.0, 0.1)
    module = MultiTaskLoss(tasks, weighting="uncertainty")
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        module(outputs, batch)[0].backward()
        module.all_reduce_grads()  # no-op without torch.distributed
        optimizer.step()
    # optimum s_t = log L_t: log 10 ≈ 2.3, log 0.1 ≈ -2.3
    assert module.log_vars["a"] > 1.0
    assert module.log_vars["b"] < -1.0


def test_unknown_weighting_lists_choices() -> None:
    with pytest.raises(ValueError, match="equal.*uncertainty"):
        MultiTaskLoss((DEPTH,), weighting="gradnorm")


def test_missing_task_output_is_named() -> None:
    with pytest.raises(KeyError, match="depth"):
        MultiTaskLoss((DEPTH,))({}, {"depth": torch.zeros(1, 1, 2, 2)})
