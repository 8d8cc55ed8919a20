"""A sparsity target end to end on tiny runs: `training.run --target` writes the per-epoch λ and
measured quantity, sparsity.json's outcome, target.json (the exported model timed) and the plot;
`training.sweep --targets` plans, names and reports targets (achieved against requested)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from training.run import main as run_main
from training.sparsity.report import plot_survival
from training.sweep import RunSpec, SweepError, build_parser, main, resolve_sweep
from training.sweep_report import target_met

TINY = ["--set", "dataset.image_size=[32,48]", "--set", "dataset.train_samples=32", "--set", "dataset.val_samples=8",
        "--set", "train.batch_size=8", "--set", "model.encoder=tiny", "--set", "optim.lr=0.003"]


@pytest.fixture(scope="module")
def target_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("target") / "run"
    argv = ["--dataset", "synthetic-scenes", "--tasks", "segmentation,depth", "--epochs", "3",
            "--sparsity-cooldown", "1", "--target", "macs=1.5", "--out", str(out), *TINY]
    assert run_main(argv) == 0
    return out


def test_run_logs_and_reports_the_target(target_run):
    history = [json.loads(line) for line in (target_run / "history.jsonl").read_text().splitlines()]
    assert [h["target"]["target"] for h in history] == ["macs=1.5"] * 3
    assert all({"lambda", "measured", "progress", "frozen"} <= set(h["target"]) for h in history)
    outcome = json.loads((target_run / "sparsity.json").read_text())["target"]
    assert outcome["requested"] == 1.5 and outcome["trajectory"]
    assert outcome["reached"] or "why" in outcome  # never silently short: a reason when not reached
    check = json.loads((target_run / "target.json").read_text())
    assert check["ort"]["batch"] == 8 and check["ort"]["dense_ms"] > 0 and check["ort"]["compact_ms"] > 0
    metrics = json.loads((target_run / "metrics.json").read_text())
    assert metrics["checkpoint"] == "last"  # the sparse weights, not an earlier denser epoch
    # the controller's measure is what compaction builds (round_to 8)
    sparsity = json.loads((target_run / "sparsity.json").read_text())
    compact = json.loads((target_run / "compact" / "config.json").read_text())
    assert compact and sparsity["dense_macs"] / outcome["achieved"] > 0
    assert (target_run / "sparsity.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_draws_a_target_panel(tmp_path):
    report = {"mode": "channel", "alive_channels": 3, "total_channels": 4, "pct_zero_groups": 25.0,
              "layers": [{"name": "a", "alive": 3, "channels": 4}],
              "target": {"target": "zero_groups=0.25", "reached": True, "achieved": 0.25, "frozen_at_step": 4,
                         "trajectory": [{"step": s, "lambda": 0.1 * s, "progress": s / 16, "schedule": s / 16}
                                        for s in range(1, 5)]}}
    assert plot_survival(report, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_targets_plan_and_names(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path), "--dataset", "synthetic-scenes", "--targets",
                                      "zero_groups=0.60", "macs=3:size", "--no-baselines", *TINY])
    sweep = resolve_sweep(args)
    assert sweep.lambdas == () and sweep.targets == ("zero_groups=0.6", "macs=3:size")
    names = [s.name for s in sweep.runs()]
    assert names == ["multi-mtl-lam0-seed0", "multi-mtl-target-zero_groups0.6-seed0",
                     "multi-mtl-target-macs3-size-seed0"]
    spec = sweep.runs()[2]
    assert spec.sparsity() == {"lam": 0.0, "target": "macs=3", "group_weight": "size"}
    assert sweep.run_config(spec).sparsity.group_weight == "size"
    assert RunSpec("multi", ("a",), 0.0, 1, "macs=2").name == "multi-mtl-target-macs2-seed1"
    for bad, says in (("macs=0.5", "above 1"), ("macs=3:flops", "unknown group weight")):
        with pytest.raises(SweepError, match=says):
            resolve_sweep(build_parser().parse_args(["--out", str(tmp_path), "--targets", bad, *TINY]))


def test_lambdas_still_work_with_targets(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path), "--lambdas", "0.1", "--targets", "macs=2", *TINY])
    sweep = resolve_sweep(args)
    assert sweep.lambdas == (0.1,) and sweep.targets == ("macs=2",)
    default = resolve_sweep(build_parser().parse_args(["--out", str(tmp_path), *TINY]))
    assert len(default.lambdas) == 5 and default.targets == ()


def test_target_tolerances():
    assert target_met("zero_groups", 0.6, 0.619) and not target_met("zero_groups", 0.6, 0.621)
    assert target_met("macs", 3, 3.14) and not target_met("macs", 3, 2.84)
    assert target_met("latency_ms", 10, 10.9) and not target_met("latency_ms", 10, 11.1)


def test_sweep_with_a_target_reports_achieved_against_requested(tmp_path):
    out = tmp_path / "sweep"
    argv = ["--dataset", "synthetic-scenes", "--tasks", "segmentation,depth", "--targets", "zero_groups=0.2",
            "--no-baselines", "--set", "train.epochs=2", "--set", "sparsity.cooldown_epochs=1", "--out", str(out),
            *TINY]
    assert main(argv) == 0
    rows = {r["run"]: r for r in csv.DictReader((out / "results.csv").open())}
    row = rows["multi-mtl-target-zero_groups0.2-seed0"]
    assert row["target"] == "zero_groups=0.2" and float(row["requested"]) == 0.2 and row["achieved"]
    assert float(row["ort_speedup"]) > 0 and float(row["wall_min"]) > 0
    md = (out / "results.md").read_text()
    assert "## Targets: requested against achieved" in md and "| zero_groups=0.2 | 1 |" in md
