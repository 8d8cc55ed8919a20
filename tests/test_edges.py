"""The edges kind on the training side, checked by hand: the class-balanced loss, the counts and
F-measures at fixed thresholds (and the best one), the all-background baseline, the ignore label;
and the synthetic-scenes boundary target it trains on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from parsimony.manifest import Manifest
from parsimony.tasks.edges import THRESHOLD
from training.baselines import evaluate_predictor, fit_trivial
from training.data import DatasetSpec, build_dataset
from training.data import render as render_lib
from training.data.synthetic import preview
from training.data.synthetic_scenes import primary_hits, render_scene, sample_scene
from training.data.transforms import hflip_sample, resize_sample, scale_crop_sample
from training.kinds import kind
from training.kinds.edges import THRESHOLDS, EdgeMetric
from training.losses import MultiTaskLoss, task_loss
from training.metrics import delta_metric_names, metric_direction, primary_metric
from training.models import available_heads, create_model
from training.run import main
from training.tasks import TaskSpec

EDGES = TaskSpec("edges", "edges", 1)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scenes-edges.yaml"


def _logits(probabilities: list[float]) -> torch.Tensor:
    """``[1, 1, 1, W]`` logits whose sigmoids are ``probabilities``."""
    p = torch.tensor(probabilities, dtype=torch.float64)
    return torch.log(p / (1 - p)).float().view(1, 1, 1, -1)


def _target(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(1, 1, 1, -1)


# Five valid pixels (targets 1, 1, 1, 0, 0) and one ignored pixel predicted a sure boundary.
PROBABILITIES = [0.9, 0.62, 0.38, 0.213, 0.7, 0.99]
TARGET = [1.0, 1.0, 1.0, 0.0, 0.0, -1.0]


def _counts_at(metric: EdgeMetric, threshold: float) -> list[int]:
    return metric.counts[:, THRESHOLDS.index(threshold)].tolist()


# --- metrics ------------------------------------------------------------------------------------


def test_counts_and_f_measures_hand_computed() -> None:
    metric = EdgeMetric()
    metric.update(_logits(PROBABILITIES), _target(TARGET))
    # TP, FP, FN: at 0.5 the pixels 0.9, 0.62 (boundaries) and 0.7 (background) are predicted
    assert _counts_at(metric, 0.5) == [2, 1, 1]
    assert _counts_at(metric, 0.22) == [3, 1, 0]  # 0.38 joins; 0.213 does not yet
    assert _counts_at(metric, 0.21) == [3, 2, 0]  # now 0.213 does
    assert _counts_at(metric, 0.01) == [3, 2, 0]
    assert _counts_at(metric, 0.75) == [1, 0, 2]
    assert _counts_at(metric, 0.99) == [0, 0, 3]  # the ignored 0.99 pixel counts nowhere
    result = metric.compute()
    assert result["precision"] == pytest.approx(200 / 3)
    assert result["recall"] == pytest.approx(200 / 3)
    assert result["f"] == pytest.approx(200 / 3)
    # best F = 2·3 / (2·3 + 1 + 0) = 6/7 at every threshold in (0.213, 0.38]; the lowest is reported
    assert result["ods_f"] == pytest.approx(600 / 7)
    assert result["ods_threshold"] == 0.22


def test_fixed_threshold_is_the_gateways() -> None:
    assert THRESHOLD == 0.5 and 0.5 in THRESHOLDS and len(THRESHOLDS) == 99
    metric = EdgeMetric()  # logit exactly 0 is probability 0.5: a boundary, as the gateway says
    metric.update(torch.zeros(1, 1, 1, 2), _target([1.0, 0.0]))
    assert _counts_at(metric, 0.5) == [1, 1, 0] and _counts_at(metric, 0.51) == [0, 0, 1]


def test_counts_accumulate_over_the_set_and_sum_across_ranks() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 6, 7, generator=g) * 3
    target = torch.randint(-1, 2, (4, 1, 6, 7), generator=g).float()
    whole, first, second = EdgeMetric(), EdgeMetric(), EdgeMetric()
    whole.update(logits, target)
    first.update(logits[:1], target[:1])
    second.update(logits[1:], target[1:])
    for mine, theirs in zip(first.state(), second.state(), strict=True):
        mine += theirs  # what all_reduce(SUM) does
    assert torch.equal(first.counts, whole.counts) and first.compute() == whole.compute()
    # ODS is the best F of the summed counts, not an average of per-image bests
    tp, fp, fn = whole.counts.double()
    assert whole.compute()["ods_f"] == pytest.approx(float((200 * tp / (2 * tp + fp + fn)).max()))


def test_zero_by_zero_is_zero_and_an_empty_set_is_nan() -> None:
    no_boundaries = EdgeMetric()  # no target boundary and none predicted: 0/0 everywhere
    no_boundaries.update(torch.full((1, 1, 2, 2), -5.0), torch.zeros(1, 1, 2, 2))
    result = no_boundaries.compute()
    assert [result[k] for k in ("precision", "recall", "f", "ods_f")] == [0.0] * 4
    ignored = EdgeMetric()
    ignored.update(torch.full((1, 1, 2, 2), 5.0), torch.full((1, 1, 2, 2), -1.0))
    assert all(math.isnan(v) for v in ignored.compute().values())


def test_layout_is_checked() -> None:
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        EdgeMetric().update(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3))


def test_directions_primary_and_delta() -> None:
    assert primary_metric("edges") == "ods_f"
    assert all(metric_direction("edges", m) == 1 for m in ("precision", "recall", "f", "ods_f"))
    with pytest.raises(ValueError):
        metric_direction("edges", "ods_threshold")  # a setting, not better or worse
    assert delta_metric_names(EDGES) == ("ods_f",)
    assert kind("edges").metric_names(EDGES) == tuple(EdgeMetric().compute())


# --- loss ---------------------------------------------------------------------------------------


def test_class_balanced_bce_hand_computed_and_ignore() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0, 50.0]).view(1, 1, 1, 4).requires_grad_(True)
    target = _target([1.0, 0.0, 0.0, -1.0])
    # 3 valid pixels, 1 boundary: boundaries weigh 2/3 (the background share), background 1/3
    expected = (2 / 3 * math.log(2) + 1 / 3 * math.log(1 + math.e**2) + 1 / 3 * math.log(1 + math.e**-1)) / 3
    loss = task_loss(EDGES, logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[0, 0, 0, 3] == 0  # the ignored pixel
    assert logits.grad[0, 0, 0, 0] == pytest.approx(2 / 3 * (0.5 - 1) / 3)  # w · (σ(x) − y) / N


def test_loss_without_valid_pixel_is_zero_with_grad() -> None:
    logits = torch.randn(1, 1, 2, 2, requires_grad=True)
    loss = task_loss(EDGES, logits, torch.full((1, 1, 2, 2), -1.0))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_loss_refuses_a_mismatched_layout() -> None:
    with pytest.raises(ValueError, match="edges"):
        task_loss(EDGES, torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4))


# --- baseline -----------------------------------------------------------------------------------


def test_trivial_baseline_is_all_background_with_zero_metrics() -> None:
    batches = [{"image": torch.zeros(1, 3, 1, 4), "edges": _target([1.0, 0.0, -1.0, 1.0])}]
    predictor = fit_trivial((EDGES,), batches)
    out = predictor(torch.zeros(2, 3, 5, 6))["edges"]
    assert out.shape == (2, 1, 5, 6) and torch.all(out == -10.0)
    result = evaluate_predictor(predictor, batches, (EDGES,))["edges"]
    assert [result[k] for k in ("precision", "recall", "f", "ods_f")] == [0.0] * 4
    assert result["ods_threshold"] == 0.01  # every threshold ties at F = 0
    with pytest.raises(ValueError, match="no valid edges target"):
        fit_trivial((EDGES,), [{"edges": torch.full((1, 1, 2, 2), -1.0)}])


# --- heads and augmentation ---------------------------------------------------------------------


def test_model_uses_the_dense_heads_and_trains() -> None:
    assert available_heads("edges") == ("aspp", "light")
    torch.manual_seed(0)
    model = create_model(encoder="tiny", tasks=(EDGES, TaskSpec("depth", "depth", 1)))
    assert [h.arch for h in model.config.heads] == ["light", "light"]
    images = torch.rand(2, 3, 32, 48)
    out = model(images)
    assert out["edges"].shape == (2, 1, 32, 48)
    batch = {"edges": (torch.rand(2, 1, 32, 48) > 0.9).float(), "depth": torch.rand(2, 1, 32, 48) + 1}
    total, raw = MultiTaskLoss(model.config.tasks)(out, batch)
    total.backward()
    assert math.isfinite(raw["edges"].item()) and model.heads["edges"].classifier.weight.grad.abs().sum() > 0


def test_augmentation_keeps_the_map_binary() -> None:
    edges = torch.tensor([[0.0, 1.0, 1.0, 0.0, -1.0, 0.0]] * 4).view(1, 4, 6)
    sample = {"image": torch.rand(3, 4, 6), "edges": edges}
    assert torch.equal(hflip_sample(sample, (EDGES,))["edges"], edges.flip(-1))
    resized = resize_sample(sample, (EDGES,), (7, 11))["edges"]
    assert resized.shape == (1, 7, 11) and set(resized.unique().tolist()) == {-1.0, 0.0, 1.0}
    zoomed = scale_crop_sample(sample, (EDGES,), 1.5, 0.0, 0.0)["edges"]
    assert set(zoomed.unique().tolist()) <= {-1.0, 0.0, 1.0}  # no division by the zoom, unlike depth


# --- the synthetic-scenes target ----------------------------------------------------------------


def test_boundaries_mark_both_sides_of_class_and_object_changes() -> None:
    classes = np.array([[0, 0, 3, 3, 3], [0, 0, 3, 3, 3]])
    objects = np.array([[-1, -1, 0, 0, 1], [-1, -1, 0, 0, 1]])  # two objects of class 3
    expected = [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    edges = render_lib.boundaries(classes, objects)
    assert edges.dtype == np.float32 and edges.shape == (1, 2, 5) and edges[0].tolist() == expected
    assert render_lib.boundaries(classes)[0].tolist() == [[0, 1, 1, 0, 0]] * 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scene_edges_follow_classes_and_objects(seed: int) -> None:
    h, w = 72, 96
    clean = render_scene(np.random.default_rng(seed), (h, w), invalid_pixels=False)
    scene = sample_scene(np.random.default_rng(seed), w)
    _, _, hit = primary_hits(scene, render_lib.camera_rays(scene.camera.axes, scene.camera.focal, h, w))
    np.testing.assert_array_equal(clean["edges"], render_lib.boundaries(clean["segmentation"], hit))
    assert 0.02 < clean["edges"].mean() < 0.4
    seg = clean["segmentation"]
    across = seg[:, 1:] != seg[:, :-1]
    assert (clean["edges"][0][:, 1:][across] == 1).all() and (clean["edges"][0][:, :-1][across] == 1).all()
    out = render_scene(np.random.default_rng(seed), (h, w))
    invalid = out["segmentation"] == -1
    np.testing.assert_array_equal(out["edges"][0] == -1, invalid)
    np.testing.assert_array_equal(out["edges"][0][~invalid], clean["edges"][0][~invalid])
    np.testing.assert_array_equal(out["image"], clean["image"])  # same picture with or without holes


def test_scenes_offer_edges_by_name_only(tmp_path) -> None:
    spec = dict(num_samples=2, image_size=(48, 64), options={"cache": False})
    _, default = build_dataset("synthetic-scenes", "train", DatasetSpec(**spec))
    assert "edges" not in [t.name for t in default.tasks]
    names = ("segmentation", "depth", "normal", "edges")
    dataset, info = build_dataset("synthetic-scenes", "train", DatasetSpec(tasks=names, augment=True, **spec))
    assert info.tasks[3] == EDGES
    target = dataset[0]["edges"]
    assert target.dtype == torch.float32 and target.shape == (1, 48, 64)
    assert set(target.unique().tolist()) <= {-1.0, 0.0, 1.0}
    path = tmp_path / "edges.png"
    preview(dataset, 2, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_edge_metric_and_loss_on_cuda_match_cpu() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 16, 20, generator=g) * 4
    target = torch.randint(-1, 2, (3, 1, 16, 20), generator=g).float()
    cpu, gpu = EdgeMetric(), EdgeMetric()
    cpu.update(logits, target)
    gpu.update(logits.cuda(), target.cuda())
    assert torch.equal(gpu.counts.cpu(), cpu.counts) and gpu.compute() == cpu.compute()
    assert task_loss(EDGES, logits.cuda(), target.cuda()).item() == pytest.approx(task_loss(EDGES, logits, target).item())


# --- end to end ---------------------------------------------------------------------------------


def test_four_task_config_trains_compacts_and_exports(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    tiny = ["--epochs", "1", "--train-samples", "16", "--val-samples", "8", "--image-size", "32", "48",
            "--batch-size", "8", "--lam", "0.5", "--sparsity-cooldown", "0"]
    assert main(["--config", str(CONFIG), *tiny, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["tasks"]) == ["segmentation", "depth", "normal", "edges"]
    assert metrics["trivial"]["edges"]["ods_f"] == 0.0 and 0 < metrics["tasks"]["edges"]["ods_f"] <= 100
    manifest = Manifest.load(out)
    assert manifest.tensor_spec.tensor("edges_raw").shape == (-1, 1, 32, 48)
    assert manifest.output_tensor("edges", "edge_map", "uint8") == "edges"
    assert [t.kind for t in manifest.task_infos] == ["segmentation", "depth", "normal", "edges"]
    assert "ods_f" in capsys.readouterr().out
