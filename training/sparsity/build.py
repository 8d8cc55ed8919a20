"""A run's regulariser from its ``sparsity`` config (a fixed λ, or a target and its controller), and
the end-of-run check of a target against the exported model."""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from training.sparsity.controller import DEFAULT_START_LAMBDA, ProgressMeter, TargetGroupLasso
from training.sparsity.cost import CostModel, group_saving
from training.sparsity.groups import GroupSet
from training.sparsity.latency_table import export_temporary, load_or_measure, time_onnx
from training.sparsity.regularizer import GroupLasso
from training.sparsity.targets import ROUND_TO, TargetError, parse_target, resolve_weight

log = logging.getLogger("training")
LATENCY_TABLE_FILE = "latency-table.json"
TARGET_FILE = "target.json"
LOAD_DRIFT = 0.15  # dense latency now vs in the table beyond which the table's load differed


def build_cost_model(model: nn.Module, groupset: GroupSet, config: Any, image_size: tuple[int, int],
                     run_dir: Path, latency: bool) -> CostModel:
    """The run's `CostModel`, with its latency table (measured once, cached in ``run_dir``) if asked."""
    from training.compaction.plan import config_hash

    cost = CostModel.build(model, groupset, image_size, ROUND_TO)
    if not latency:
        return cost
    table = load_or_measure(Path(run_dir) / LATENCY_TABLE_FILE, model, cost.table_convs(), image_size,
                            batch=config.target_batch, threads=config.target_threads, round_to=ROUND_TO,
                            model_key=config_hash(model.config.to_dict()))
    return cost.with_table(table)


def build_regularizer(groupset: GroupSet, config: Any, *, model: nn.Module, image_size: tuple[int, int],
                      epochs: int, steps_per_epoch: int, run_dir: Path) -> GroupLasso | None:
    """None for a dense run; a `GroupLasso` at ``config.lam``; or, with ``config.target``, a
    `TargetGroupLasso` (``lam`` then only sets the starting λ). ``config``: a SparsityConfig."""
    target = parse_target(config.target) if config.target else None
    if target is None and config.lam == 0:
        if config.group_weight not in (None, "size"):
            raise TargetError(f"sparsity.group_weight={config.group_weight} has no effect without λ or a target")
        return None
    weight = resolve_weight(target, config.group_weight)
    latency = weight == "latency" or (target is not None and target.kind == "latency_ms")
    priced = weight != "size" or (target is not None and target.kind != "zero_groups")
    if priced and groupset.mode != "channel":
        raise TargetError(f"a MACs or latency target or group weight prices whole channels: use channel groups "
                          f"(sparsity.groups: channel), not {groupset.mode!r}")
    cost = build_cost_model(model, groupset, config, image_size, run_dir, latency) if priced else None
    saving = group_saving(groupset, weight, cost) if weight != "size" else None
    cooldown_from = epochs - config.cooldown_epochs if config.cooldown_epochs else None
    if target is None:
        return GroupLasso(groupset, config.lam, config.mode, config.warmup_epochs, config.tolerance, cooldown_from,
                          saving=saving)
    if config.mode != "proximal":
        raise TargetError("a sparsity target needs the proximal mode (sparsity.mode: proximal): the cap on "
                          "new zeros acts inside the proximal step")
    meter = ProgressMeter(target, groupset, model, cost)
    reg = TargetGroupLasso(groupset, meter, steps_per_epoch=steps_per_epoch, epochs=epochs,
                           warmup_epochs=config.warmup_epochs, cooldown_from=cooldown_from,
                           lam=config.lam or DEFAULT_START_LAMBDA, saving=saving)
    log.info("sparsity target %s (group weight %s): progress %.4f wanted by step %d, then frozen",
             target, weight, meter.wanted, reg.schedule.end)
    return reg


def target_summary(regularizer: GroupLasso | None) -> dict | None:
    """The controller's outcome (sparsity.json "target"), None without a target."""
    return regularizer.summary() if isinstance(regularizer, TargetGroupLasso) else None


def time_dense_and_compact(dense: nn.Module, compact_onnx: Path, image_size: tuple[int, int], *, batch: int,
                           threads: int | None, rounds: int = 5) -> dict:
    """ONNX Runtime latency of the dense model and the exported compact one, timed in alternating
    rounds in this process so that load from other work hits both alike: the median and the
    fastest run (``*_min_ms``, the stable figure on a shared machine) of each."""
    with tempfile.TemporaryDirectory() as tmp:
        dense_onnx = export_temporary(dense, Path(tmp) / "dense.onnx", image_size)
        runs = time_onnx([dense_onnx, compact_onnx], image_size, batch, threads, rounds=rounds, repeats=8)
    times = dict(zip(("dense", "compact"), runs, strict=True))
    dense_ms, compact_ms = statistics.median(times["dense"]), statistics.median(times["compact"])
    fastest = {k: min(v) for k, v in times.items()}
    return {"batch": batch, "threads": threads, "dense_ms": dense_ms, "compact_ms": compact_ms,
            "speedup": dense_ms / compact_ms, "dense_min_ms": fastest["dense"],
            "compact_min_ms": fastest["compact"], "speedup_min": fastest["dense"] / fastest["compact"]}


def write_target_check(run_dir: Path, summary: dict, dense: nn.Module, compact_onnx: Path,
                       image_size: tuple[int, int], config: Any) -> dict:
    """The target's outcome with the exported model timed against the dense one, written to
    RUN_DIR/target.json."""
    from parsimony.io import atomic_write_json

    timing = time_dense_and_compact(dense, compact_onnx, image_size, batch=config.target_batch,
                                    threads=config.target_threads)
    out = {k: v for k, v in summary.items() if k != "trajectory"} | {"ort": timing}
    if summary["kind"] == "latency_ms":
        out["predicted_ms"] = summary["achieved"]
        out["measured_ms"] = timing["compact_min_ms"]
        out["measured_vs_requested"] = timing["compact_min_ms"] / summary["requested"]
        # the table's dense latency against the one measured now: how much the machine's load moved
        out["load_drift"] = drift = timing["dense_min_ms"] / summary["dense"] if summary.get("dense") else None
        if drift is not None and abs(drift - 1) > LOAD_DRIFT:
            out["warning"] = (f"the dense model times {drift:.2f}x what the latency table measured: the machine's load "
                              f"changed, so predicted and measured latencies disagree; measure the table again on a quiet "
                              f"machine (delete {LATENCY_TABLE_FILE}) before trusting either")
    atomic_write_json(Path(run_dir) / TARGET_FILE, out)
    return out


def describe_target(check: dict) -> str:
    """One paragraph for the end of a run."""
    ort = check["ort"]
    lines = [f"target {check['target']}: {'reached' if check['reached'] else 'NOT reached'}, "
             f"{check['kind']} = {check['achieved']:.4g} (requested {check['requested']:g}); final λ "
             f"{check['final_lambda']:.4g}" + (f", frozen at step {check['frozen_at_step']}"
                                                if check["frozen_at_step"] is not None else "")]
    if "why" in check:
        lines.append(f"  why: {check['why']}")
    if "warning" in check:
        lines.append(f"  warning: {check['warning']}")
    lines.append(f"  ONNX Runtime at batch {ort['batch']} (median / fastest): dense {ort['dense_ms']:.2f} / "
                 f"{ort['dense_min_ms']:.2f} ms, compact {ort['compact_ms']:.2f} / {ort['compact_min_ms']:.2f} ms "
                 f"(x{ort['speedup']:.2f} / x{ort['speedup_min']:.2f})")
    if check["kind"] == "latency_ms":
        lines.append(f"  latency: predicted {check['predicted_ms']:.2f} ms, measured (fastest) {check['measured_ms']:.2f} ms "
                     f"({100 * (check['measured_vs_requested'] - 1):+.1f} % of the request)")
    return "\n".join(lines)
