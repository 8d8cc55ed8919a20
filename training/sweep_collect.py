"""The rows of a sparsity sweep: one flat row per complete run (metrics, sparsity, a target's
outcome, ΔMTL against the dense single- and multi-task runs of the same seed), read from the run
folders `training.sweep` trains into."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from parsimony.layout import CONFIG_FILE, MANIFEST_FILE, METRICS_FILE
from parsimony.manifest import Manifest
from training.metrics import delta_mtl
from training.tasks import TaskSpec

if TYPE_CHECKING:
    from training.sweep import RunSpec, Sweep

log = logging.getLogger("training.sweep")
SPARSITY_FILE = "sparsity.json"
RUN_LOG = "train.log"
TARGET_FILE = "target.json"
SPARSITY_KEYS = ("groups_total", "groups_zero", "pct_zero_groups", "encoder_weights", "zero_weights",
                 "pct_zero_weights", "alive_channels", "total_channels", "compact_parameters", "compact_macs")


def collect(sweep: Sweep, specs: list[RunSpec]) -> tuple[list[dict], dict[str, TaskSpec]]:
    """One flat row per complete run (metrics, sparsity, ΔMTL) and the task specs by name."""
    results = {s: _read_run(sweep.run_dir(s)) for s in specs if (sweep.run_dir(s) / METRICS_FILE).is_file()}
    task_specs = {d["name"]: TaskSpec.from_dict(d) for m, *_ in results.values() for d in m["task_specs"]}
    rows = []
    for spec, (metrics, sparsity, extra) in results.items():
        single = {}
        for t in spec.tasks:
            base = results.get(replace(spec, kind="single", tasks=(t,), lam=0.0, target=""))
            if base is not None:
                single[t] = base[0]["tasks"][t]
        dense = results.get(replace(spec, lam=0.0, target=""))
        tasks = [task_specs[t] for t in spec.tasks]
        row = _base_row(spec, metrics, sparsity) | extra
        row["delta_vs_single"] = _delta(metrics["tasks"], single, tasks)
        row["delta_vs_dense"] = _delta(metrics["tasks"], dense[0]["tasks"] if dense else {}, tasks)
        rows.append(row | _flat_metrics(metrics))
    return rows, task_specs


def _read_run(run_dir: Path) -> tuple[dict, dict | None, dict]:
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    path = run_dir / SPARSITY_FILE
    sparsity = json.loads(path.read_text()) if path.is_file() else None
    return metrics, sparsity, _target_columns(run_dir, sparsity)


def _target_columns(run_dir: Path, sparsity: dict | None) -> dict:
    """A target run's outcome (sparsity.json, target.json) and every run's wall time in minutes
    (from its config.yaml to its last file)."""
    done = [p.stat().st_mtime for p in run_dir.iterdir() if p.is_file() and p.name != RUN_LOG]
    start = (run_dir / CONFIG_FILE).stat().st_mtime if (run_dir / CONFIG_FILE).is_file() else math.nan
    row = {"wall_min": (max(done) - start) / 60 if done else math.nan}
    manifest = run_dir / MANIFEST_FILE
    if manifest.is_file():  # the exported (compacted, widths rounded) model's own count
        row["exported_macs"] = Manifest.load(manifest).complexity.macs
    target = (sparsity or {}).get("target")
    if not target:
        return row
    row.update({"requested": target["requested"], "achieved": target["achieved"], "reached": target["reached"],
                "final_lambda": target["final_lambda"], "frozen_at_step": target.get("frozen_at_step")})
    path = run_dir / TARGET_FILE
    if path.is_file():
        check = json.loads(path.read_text())
        row.update({f"ort_{k}": check["ort"][k] for k in ("batch", "dense_ms", "compact_ms", "speedup")})
        if "measured_ms" in check:
            row.update({"predicted_ms": check["predicted_ms"], "measured_ms": check["measured_ms"]})
    return row


def _base_row(spec: RunSpec, metrics: dict, sparsity: dict | None) -> dict:
    row = {"run": spec.name, "kind": spec.kind, "tasks": "+".join(spec.tasks), "lambda": spec.lam,
           "target": spec.target, "seed": spec.seed, "has_sparsity": sparsity is not None, "delta_vs_single": math.nan,
           "delta_vs_dense": math.nan, "checkpoint": metrics.get("checkpoint"), "best_epoch": metrics.get("best_epoch"),
           "epochs_trained": metrics.get("epochs_trained"), "test_loss": metrics.get("test_loss"),
           "image_size": "x".join(map(str, metrics.get("image_size", []))),
           "parameters": metrics["parameters"], "macs": metrics["macs"]}
    sparsity = sparsity or {}
    row["dense_parameters"] = sparsity.get("dense_parameters", metrics["parameters"])
    row["dense_macs"] = sparsity.get("dense_macs", metrics["macs"])
    row.update({k: sparsity.get(k, math.nan) for k in SPARSITY_KEYS})
    return row


def _flat_metrics(metrics: dict) -> dict:
    flat = {f"{t}/{m}": v for t, values in metrics["tasks"].items() for m, v in values.items()}
    flat.update({f"trivial/{t}/{m}": v for t, values in metrics.get("trivial", {}).items()
                 for m, v in values.items()})
    return flat


def _delta(metrics: dict, baseline: dict, tasks: list[TaskSpec]) -> float:
    """ΔMTL in percent, NaN where the baseline run is missing or undefined (a zero baseline)."""
    if any(t.name not in baseline for t in tasks):
        return math.nan
    try:
        return delta_mtl(metrics, baseline, tasks)
    except ValueError as exc:
        log.warning("ΔMTL undefined: %s", exc)
        return math.nan
