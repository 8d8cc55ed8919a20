"""Hand-computed checks of the evaluation metrics, their cross-rank reduction, ΔMTL and the
trivial baselines."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from training.baselines import evaluate_predictor, fit_trivial
from training.metrics import (
    NORMAL_HIST_BIN_DEG,
    AttributeMetric,
    DepthMetric,
    MultiTaskMetrics,
    NormalMetric,
    SegmentationMetric,
    delta_metric_names,
    delta_mtl,
    metric_direction,
    primary_metric,
)
from training.tasks import TaskSpec

TASKS = (
    TaskSpec("seg", "segmentation", 4),
    TaskSpec("depth", "depth", 1),
    TaskSpec("normal", "normal", 3),
    TaskSpec("attr", "attributes", 2, ("Male", "Smiling")),
)


def _logits(pred: list[list[int]], num_classes: int) -> torch.Tensor:
    """One-hot logits [1, C, H, W] whose argmax is ``pred``."""
    return F.one_hot(torch.tensor(pred), num_classes).permute(2, 0, 1).unsqueeze(0).float()


def _normals(vectors: list[list[float]]) -> torch.Tensor:
    """[1, 3, 1, W] from a list of W 3-vectors."""
    return torch.tensor(vectors, dtype=torch.float64).T.reshape(1, 3, 1, -1)


def _direction(degrees: float) -> list[float]:
    """Unit vector at ``degrees`` from +z in the x-z plane."""
    r = math.radians(degrees)
    return [math.sin(r), 0.0, math.cos(r)]


# --- segmentation -----------------------------------------------------------------------------


def test_segmentation_hand_computed() -> None:
    metric = SegmentationMetric(4)  # class 3 never occurs nor is predicted: left out of the mIoU
    target = torch.tensor([[[0, 1, -1], [2, 1, 5]]])  # -1 and 5 are ignored
    metric.update(_logits([[0, 1, 1], [1, 1, 0]], 4), target)
    expected_conf = torch.zeros(4, 4, dtype=torch.int64)
    expected_conf[0, 0], expected_conf[1, 1], expected_conf[2, 1] = 1, 2, 1
    assert torch.equal(metric.confusion, expected_conf)
    iou = metric.per_class_iou()
    assert iou[:3].tolist() == pytest.approx([100.0, 200 / 3, 0.0]) and math.isnan(iou[3])
    result = metric.compute()
    assert result["miou"] == pytest.approx((100 + 200 / 3 + 0) / 3)
    assert result["pixel_acc"] == pytest.approx(75.0)


def test_segmentation_accumulates_like_one_update() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, 7, generator=gen)
    target = torch.randint(-1, 6, (4, 6, 7), generator=gen)
    split, whole = SegmentationMetric(5), SegmentationMetric(5)
    split.update(logits[:1], target[:1])
    split.update(logits[1:], target[1:])
    whole.update(logits, target)
    assert torch.equal(split.confusion, whole.confusion)
    assert split.compute() == whole.compute()


# --- depth ------------------------------------------------------------------------------------


def test_depth_hand_computed() -> None:
    metric = DepthMetric()
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    gt = torch.tensor([[2.0, 0.0], [1.0, 4.0]]).view(1, 1, 2, 2)
    metric.update(pred, gt)
    result = metric.compute()
    assert result["abs_err"] == pytest.approx((1 + 2 + 0) / 3)
    assert result["rel_err"] == pytest.approx((1 / 2 + 2 / 1 + 0) / 3)


def test_empty_metrics_report_nan() -> None:
    depth = DepthMetric()
    depth.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert all(math.isnan(v) for v in depth.compute().values())
    assert all(math.isnan(v) for v in NormalMetric().compute().values())


# --- normals ----------------------------------------------------------------------------------


def test_normal_hand_computed() -> None:
    # angles 0, 90, 180, 45 (unnormalised prediction), 20, 25; the last pixel has zero gt
    pred = _normals([[0, 0, 2], [1, 0, 0], [0, 0, -1], [1, 0, 1], _direction(20), _direction(25), [1, 0, 0]])
    gt = _normals([[0, 0, 1]] * 6 + [[0, 0, 0]])
    metric = NormalMetric()
    metric.update(pred, gt)
    result = metric.compute()
    assert result["mean"] == pytest.approx((0 + 90 + 180 + 45 + 20 + 25) / 6)
    assert result["median"] == pytest.approx((25 + 45) / 2, abs=NORMAL_HIST_BIN_DEG / 2 + 1e-9)
    assert result["within_11.25"] == pytest.approx(100 / 6)
    assert result["within_22.5"] == pytest.approx(200 / 6)
    assert result["within_30"] == pytest.approx(300 / 6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), width=st.integers(1, 40))
def test_normal_median_matches_numpy_within_resolution(seed: int, width: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    gt = F.normalize(torch.randn(1, 3, 2, width, generator=gen, dtype=torch.float64), dim=1)
    pred = gt + 0.7 * torch.randn(1, 3, 2, width, generator=gen, dtype=torch.float64)
    metric = NormalMetric()
    metric.update(pred, gt)
    cos = (F.normalize(pred, dim=1) * gt).sum(1).clamp(-1, 1).numpy().ravel()
    angles = np.degrees(np.arccos(cos))
    result = metric.compute()
    assert result["median"] == pytest.approx(np.median(angles), abs=NORMAL_HIST_BIN_DEG / 2 + 1e-9)
    assert result["mean"] == pytest.approx(angles.mean(), rel=1e-12)
    assert result["within_22.5"] == pytest.approx(100 * np.mean(angles < 22.5))


# --- attributes -------------------------------------------------------------------------------


def test_attributes_hand_computed_with_zero_f1_denominator() -> None:
    metric = AttributeMetric(("Male", "Smiling", "Bald"))
    logits = torch.tensor([[2.0, 1, -1], [0.0, 1, -1], [3.0, 1, -1], [-2.0, -1, -1]])  # logit 0 -> negative
    target = torch.tensor([[1.0, 1, 0], [1.0, 1, 0], [0.0, 1, 0], [0.0, 1, 0]])
    metric.update(logits, target)
    result = metric.compute()
    assert result["Male_acc"] == pytest.approx(50.0) and result["Male_f1"] == pytest.approx(50.0)
    assert result["Smiling_acc"] == pytest.approx(75.0) and result["Smiling_f1"] == pytest.approx(600 / 7)
    assert result["Bald_acc"] == pytest.approx(100.0) and result["Bald_f1"] == 0.0  # 2TP+FP+FN = 0
    assert result["mean_acc"] == pytest.approx(75.0)
    assert result["mean_f1"] == pytest.approx((50 + 600 / 7 + 0) / 3)


def test_attribute_names_must_not_collide_with_means() -> None:
    with pytest.raises(ValueError):
        AttributeMetric(("mean",))


# --- reduction across ranks -------------------------------------------------------------------


def _dataset(seed: int = 0, n: int = 4) -> dict[str, torch.Tensor]:
    """Random outputs and targets (invalid pixels included) for every task of TASKS."""
    g = torch.Generator().manual_seed(seed)
    depth = torch.rand(n, 1, 5, 6, generator=g) * 5
    depth[depth < 1] = 0
    normal = F.normalize(torch.randn(n, 3, 5, 6, generator=g), dim=1)
    normal[:, :, 0] = 0
    return {
        "out_seg": torch.randn(n, 4, 5, 6, generator=g),
        "seg": torch.randint(-1, 5, (n, 5, 6), generator=g),
        "out_depth": torch.rand(n, 1, 5, 6, generator=g) * 5,
        "depth": depth,
        "out_normal": torch.randn(n, 3, 5, 6, generator=g),
        "normal": normal,
        "out_attr": torch.randn(n, 2, generator=g),
        "attr": torch.randint(0, 2, (n, 2), generator=g).float(),
    }


def _evaluate(data: dict[str, torch.Tensor], rows: slice) -> MultiTaskMetrics:
    metrics = MultiTaskMetrics(TASKS)
    outputs = {t.name: data[f"out_{t.name}"][rows] for t in TASKS}
    metrics.update(outputs, {t.name: data[t.name][rows] for t in TASKS})
    return metrics


def _assert_results_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for task in a:
        assert a[task] == pytest.approx(b[task], rel=1e-12, abs=1e-12), task


def test_summed_states_of_two_ranks_equal_the_whole() -> None:
    data = _dataset()
    rank0, rank1, whole = (
        _evaluate(data, slice(0, 1)),
        _evaluate(data, slice(1, None)),
        _evaluate(data, slice(None)),
    )
    for name in rank0.metrics:
        for mine, theirs in zip(rank0.metrics[name].state(), rank1.metrics[name].state(), strict=True):
            mine += theirs  # what all_reduce(SUM) does, in place
    _assert_results_equal(rank0.compute(), whole.compute())


def _gloo_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metrics = _evaluate(_dataset(), slice(rank * 2, rank * 2 + 2))
        metrics.all_reduce()
        if rank == 0:
            torch.save(metrics.compute(), out_file)
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes_equals_the_whole() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_gloo_worker, args=(2, init_file, out_file), nprocs=2, join=True)
        reduced = torch.load(out_file, weights_only=True)
    _assert_results_equal(reduced, _evaluate(_dataset(), slice(None)).compute())


# --- directions and ΔMTL ----------------------------------------------------------------------


def test_directions_and_primary_metrics() -> None:
    assert metric_direction("segmentation", "miou") == 1
    assert metric_direction("depth", "rel_err") == -1
    assert metric_direction("normal", "median") == -1
    assert metric_direction("normal", "within_11.25") == 1
    assert metric_direction("attributes", "Male_f1") == 1
    with pytest.raises(ValueError):
        metric_direction("depth", "miou")
    assert [primary_metric(t.kind) for t in TASKS] == ["miou", "abs_err", "mean", "mean_acc"]
    assert delta_metric_names(TASKS[3]) == ("Male_acc", "Male_f1", "Smiling_acc", "Smiling_f1")


DELTA_TASKS = (TASKS[0], TASKS[1], TASKS[3])
BASELINE = {
    "seg": {"miou": 50.0, "pixel_acc": 80.0},
    "depth": {"abs_err": 0.5, "rel_err": 0.2},
    "attr": {"Male_acc": 80.0, "Male_f1": 50.0, "Smiling_acc": 90.0, "Smiling_f1": 60.0, "mean_acc": 85.0},
}
RESULT = {
    "seg": {"miou": 55.0, "pixel_acc": 76.0},  # +10%, -5%  -> +0.025
    "depth": {"abs_err": 0.4, "rel_err": 0.22},  # lower is better: +20%, -10%  -> +0.05
    "attr": {"Male_acc": 88.0, "Male_f1": 45.0, "Smiling_acc": 90.0, "Smiling_f1": 66.0, "mean_acc": 1.0},
    # +10%, -10%, 0, +10% -> +0.025 (mean_acc does not enter)
}


def test_delta_mtl_hand_computed() -> None:
    assert delta_mtl(RESULT, BASELINE, DELTA_TASKS) == pytest.approx(100 * (0.025 + 0.05 + 0.025) / 3)
    assert delta_mtl(BASELINE, BASELINE, DELTA_TASKS) == 0.0


def test_delta_mtl_names_what_the_baseline_lacks() -> None:
    with pytest.raises(KeyError, match="'depth'.*baseline"):
        delta_mtl(RESULT, {k: v for k, v in BASELINE.items() if k != "depth"}, DELTA_TASKS)
    without_rel = {**BASELINE, "depth": {"abs_err": 0.5}}
    with pytest.raises(KeyError, match="'rel_err'.*baseline"):
        delta_mtl(RESULT, without_rel, DELTA_TASKS)


# --- trivial baselines ------------------------------------------------------------------------


def _training_batches() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "image": torch.zeros(1, 3, 1, 3),
            "seg": torch.tensor([[[0, 1, 1]]]),
            "depth": torch.tensor([2.0, 0.0, 4.0]).view(1, 1, 1, 3),
            "normal": _normals([[1, 0, 0], [0, 1, 0], [0, 0, 0]]).float(),
            "attr": torch.tensor([[1.0, 0.0]]),
        },
        {
            "image": torch.zeros(2, 3, 1, 3),
            "seg": torch.tensor([[[2, 2, 2]], [[-1, 9, 9]]]),  # -1 and 9 are ignored
            "depth": torch.tensor([0.0, 6.0, 0.0, 0.0, 0.0, 0.0]).view(2, 1, 1, 3),
            "normal": torch.zeros(2, 3, 1, 3),
            "attr": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        },
    ]


TRIVIAL_TASKS = (
    TaskSpec("seg", "segmentation", 3),
    TaskSpec("depth", "depth", 1),
    TaskSpec("normal", "normal", 3),
    TaskSpec("attr", "attributes", 2, ("Male", "Smiling")),
)


def test_fit_trivial_constants() -> None:
    predictor = fit_trivial(TRIVIAL_TASKS, _training_batches())
    assert int(predictor.constants["seg"]) == 2  # counts 1, 2, 3
    assert float(predictor.constants["depth"]) == pytest.approx(4.0)  # (2 + 4 + 6) / 3, zeros excluded
    assert predictor.constants["normal"].tolist() == pytest.approx([2**-0.5, 2**-0.5, 0.0])
    assert predictor.constants["attr"].tolist() == [1.0, 0.0]
    outputs = predictor(torch.zeros(2, 3, 4, 5))
    assert outputs["seg"].shape == (2, 3, 4, 5) and torch.all(outputs["seg"].argmax(1) == 2)
    assert outputs["depth"].shape == (2, 1, 4, 5) and torch.all(outputs["depth"] == 4.0)
    assert outputs["normal"].shape == (2, 3, 4, 5)
    assert outputs["attr"].tolist() == [[10.0, -10.0], [10.0, -10.0]]


def test_evaluate_trivial_predictor() -> None:
    batches = _training_batches()
    results = evaluate_predictor(fit_trivial(TRIVIAL_TASKS, batches), batches, TRIVIAL_TASKS)
    assert results["seg"]["pixel_acc"] == pytest.approx(50.0)  # 3 of 6 valid pixels are class 2
    assert results["depth"]["abs_err"] == pytest.approx((2 + 0 + 2) / 3)
    assert results["normal"]["mean"] == pytest.approx(45.0, rel=1e-6)
    assert results["attr"]["Male_acc"] == pytest.approx(200 / 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_match_cpu() -> None:
    data = _dataset()
    on_gpu = {k: v.cuda() for k, v in data.items()}
    _assert_results_equal(_evaluate(on_gpu, slice(None)).compute(), _evaluate(data, slice(None)).compute())
