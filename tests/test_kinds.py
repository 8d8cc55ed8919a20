"""Every task kind has one owner on the training side, consistent with its contract: the same
kinds, metric names the accumulator really reports, directions for the compared metrics, heads
that exist and fit the kind's layout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from parsimony.tasks import kind_names
from training import kinds
from training.baselines import trivial_names
from training.data.transforms import resize_target
from training.models import available_heads
from training.models.heads import head_arch
from training.tasks import DENSE_KINDS, TASK_KINDS, TaskSpec

SPECS = {
    "segmentation": TaskSpec("seg", "segmentation", 3, ("a", "b", "c")),
    "depth": TaskSpec("depth", "depth", 1),
    "normal": TaskSpec("normal", "normal", 3),
    "attributes": TaskSpec("attr", "attributes", 2, ("Male", "Smiling")),
    "edges": TaskSpec("edges", "edges", 1),
}


def test_training_knows_every_contract_kind() -> None:
    assert kinds.names() == kind_names() == TASK_KINDS
    assert set(SPECS) == set(TASK_KINDS)
    assert DENSE_KINDS == {"segmentation", "depth", "normal", "edges"}
    with pytest.raises(ValueError, match="training does not know"):
        kinds.kind("panoptic")


def test_trivial_baselines_are_named_per_kind() -> None:
    tasks = (*SPECS.values(), TaskSpec("seg2", "segmentation", 2))
    assert trivial_names(tasks) == "majority class, mean depth, mean normal, majority attributes, all background"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_metric_names_primary_and_directions(name: str) -> None:
    task, owner = SPECS[name], kinds.kind(name)
    reported = tuple(owner.metric(task).compute())
    assert owner.metric_names(task) == reported
    assert owner.primary in reported
    assert set(owner.delta_metric_names(task)) <= set(reported)
    assert set(owner.table_metric_names(task)) <= set(reported)
    for metric in {owner.primary, *owner.delta_metric_names(task), *owner.table_metric_names(task)}:
        assert owner.direction(metric) in (1, -1)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_heads_exist_and_fit_the_layout(name: str) -> None:
    owner = kinds.kind(name)
    assert owner.heads and set(owner.heads) <= set(available_heads(name))
    assert all(head_arch(h).dense == owner.dense for h in owner.heads)


def test_bilinear_resize_of_a_target() -> None:
    smooth = SimpleNamespace(resize_mode="bilinear")  # a mode no kind uses yet
    ramp = torch.arange(4.0).view(1, 1, 4).expand(1, 2, 4)
    out = resize_target(ramp, (2, 8), smooth)
    assert out.shape == (1, 2, 8) and out[0, 0].tolist() == [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]
