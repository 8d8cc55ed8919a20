"""End of a run: take the best checkpoint (in penalty mode, set its near-zero groups exactly to
zero), save it as checkpoint-final.pt, evaluate it on the test split against trivial baselines
(and single-task baselines for ΔMTL when given), write metrics.json, sparsity.json and the
channel-survival plot, and print the tables."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import BaseModel

from parsimony.errors import InputFileError
from parsimony.files import read_json, validate
from parsimony.io import atomic_write_json
from parsimony.layout import METRICS_FILE
from training.baselines import evaluate_predictor, fit_trivial, trivial_names
from training.checkpoint import BEST, FINAL, LAST, TrainProgress
from training.distributed import barrier
from training.engine import evaluate
from training.metrics import delta_mtl
from training.models.complexity import count_macs, count_parameters
from training.report import metrics_table
from training.sparsity import format_report, plot_survival, sparsity_report
from training.sparsity.build import describe_target, target_summary, write_target_check
from training.trainer import Run, load_weights, loader, save

log = logging.getLogger("training")


def load_baseline(paths: list[str]) -> dict[str, dict[str, float]]:
    """Merge the task metrics of single-task runs (a run directory or its metrics.json each)."""
    merged: dict[str, dict[str, float]] = {}
    for raw in paths:
        path = Path(raw)
        path = path / METRICS_FILE if path.is_dir() else path
        if not path.is_file():
            raise InputFileError(f"baseline {raw}: no metrics.json there; point --baseline at a finished run")
        tasks = validate(BaselineFile, read_json(path, "baseline metrics"), path).tasks
        merged.update(tasks)
    return merged


class BaselineFile(BaseModel):
    """The part of a baseline run's metrics.json that ΔMTL reads."""

    tasks: dict[str, dict[str, float]]


def _delta_mtl(metrics: dict, baseline: dict, run: Run) -> float:
    try:
        return delta_mtl(metrics, baseline, run.tasks)
    except (KeyError, ValueError) as exc:  # a baseline without this task or metric, or a zero baseline
        raise InputFileError(f"--baseline {run.config.baseline}: {exc}") from None


def final_evaluation(run: Run, progress: TrainProgress) -> dict:
    """Test metrics of the best weights; writes ``metrics.json`` on rank 0 and returns its content."""
    barrier()  # rank 0 may still be writing the last epoch's checkpoints
    which = _selected_checkpoint(run)
    load_weights(run.model, run.run_dir / (BEST if which == "best" else LAST))
    finalized = run.ctx.regularizer.finalize() if run.ctx.regularizer is not None else 0
    test_metrics, test_loss = evaluate(run.model, run.loss, loader(run, "test"), run.tasks, run.device,
                                       run.ctx.autocast)
    if not run.dist.is_main:
        return {}
    save(run, progress, FINAL)  # the weights every number below was measured on
    sparsity = _write_sparsity(run, finalized)
    trivial = _trivial_metrics(run)
    h, w = run.info.image_size
    result = {
        "dataset": run.config.dataset.name, "split": "test", "checkpoint": which,
        "best_epoch": progress.best_epoch, "epochs_trained": progress.epoch, "test_loss": test_loss,
        "tasks": test_metrics, "trivial": trivial,
        "parameters": count_parameters(run.model), "macs": count_macs(run.model, (h, w)), "image_size": [h, w],
        "task_specs": [t.to_dict() for t in run.tasks],
    }
    if run.config.baseline:
        baseline = load_baseline(run.config.baseline)
        result["delta_mtl"] = _delta_mtl(test_metrics, baseline, run)
        result["baseline"] = {"paths": run.config.baseline, "tasks": baseline}
    atomic_write_json(run.run_dir / METRICS_FILE, result)
    epoch = progress.best_epoch if which == "best" else progress.epoch - 1
    print(f"\nTest metrics of {run.run_dir} ({which} checkpoint, epoch {epoch}) "
          f"against the trivial baselines ({trivial_names(run.tasks)}):")
    print(metrics_table(run.tasks, test_metrics, trivial))
    print(f"parameters {result['parameters'] / 1e6:.2f} M, MACs {result['macs'] / 1e9:.3f} G at {h}x{w}")
    print(format_report(sparsity))
    if "delta_mtl" in result:
        print(f"ΔMTL {result['delta_mtl']:+.2f}% against the single-task baselines {run.config.baseline}")
    return result


def _selected_checkpoint(run: Run) -> str:
    select = run.config.train.select
    if select == "auto":
        sparsifying = run.config.sparsity.lam > 0 or run.config.sparsity.target is not None
        select = "last" if sparsifying else "best"
    return select if (run.run_dir / BEST).exists() else "last"


def _write_sparsity(run: Run, finalized: int) -> dict:
    """sparsity.json and the per-layer channel-survival plot of the final weights."""
    s = run.config.sparsity
    report = sparsity_report(run.model, run.groupset, run.info.image_size)
    report.update({"lambda": s.lam, "reg_mode": s.mode, "warmup_epochs": s.warmup_epochs,
                   "cooldown_epochs": s.cooldown_epochs,
                   "finalized_groups": finalized})
    if (target := target_summary(run.ctx.regularizer)) is not None:
        report["target"] = target  # requested, achieved, λ trajectory (drawn in sparsity.png)
    atomic_write_json(run.run_dir / "sparsity.json", report)
    plot_survival(report, run.run_dir / "sparsity.png")
    return report


def package_run(run: Run) -> None:
    """Compact the final model, export ONNX + manifest (the graph `TrainConfig.export_graph` names),
    and show size and speed against the dense model (PyTorch eager and ONNX Runtime, batch 8). Speed
    and a latency target are timed on raw graphs, the network alone, as the latency table is."""
    import tempfile

    from training.compact import compact_run
    from training.compact import describe as describe_compaction
    from training.compaction import load_compact
    from training.export.__main__ import describe as describe_export
    from training.export.__main__ import export_run
    from training.sparsity.latency_table import export_temporary

    result = compact_run(run.run_dir)
    print(describe_compaction(result))
    graph = run.config.train.export_graph
    report, manifest = export_run(run.run_dir, raw_outputs=graph == "raw", float_input=graph == "float-input")
    print(describe_export(report, manifest))
    with tempfile.TemporaryDirectory() as tmp:
        network = (export_temporary(load_compact(result.directory), Path(tmp) / "compact.onnx", run.info.image_size)
                   if report.final else report.path)
        print(speed_table(run, result.directory, network))
        if (target := target_summary(run.ctx.regularizer)) is not None:
            print(describe_target(write_target_check(run.run_dir, target, run.model, network, run.info.image_size,
                                                     run.config.sparsity)))


def speed_table(run: Run, compact_dir: Path, compact_onnx: Path, batch: int = 8) -> str:
    """PyTorch eager and ONNX Runtime latency, dense against compact; ``compact_onnx`` is a raw graph."""
    import tempfile

    from training.compaction import load_compact
    from training.report import format_table
    from training.sparsity.latency_table import export_temporary
    from training.speed import eager_ms, ort_ms

    size = run.info.image_size
    dense, small = run.model.eval().cpu(), load_compact(compact_dir)
    with tempfile.TemporaryDirectory() as tmp:
        dense_onnx = export_temporary(dense, Path(tmp) / "dense.onnx", size)
        rows = [("PyTorch eager", eager_ms(dense, size, batch), eager_ms(small, size, batch)),
                ("ONNX Runtime", ort_ms(dense_onnx, size, batch), ort_ms(compact_onnx, size, batch))]
    macs = count_macs(dense, size) / count_macs(small, size)
    table = [(name, f"{d:.1f}", f"{c:.1f}", f"x{d / c:.2f}", f"x{macs:.2f}") for name, d, c in rows]
    return (f"latency at batch {batch}, {size[0]}x{size[1]} (median ms):\n"
            + format_table(("backend", "dense", "compact", "speed-up", "MAC ratio"), table))


@torch.no_grad()
def _trivial_metrics(run: Run) -> dict:
    predictor = fit_trivial(run.tasks, loader(run, "train", shard=False))
    return evaluate_predictor(predictor, loader(run, "test", shard=False), run.tasks, all_reduce=False)
