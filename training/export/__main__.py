"""`python -m training.export RUN_DIR`: ONNX export of a run's compact model, with its manifest.

    python -m training.export runs/demo          # writes runs/demo/model.onnx and manifest.json

Exports RUN_DIR/compact (running `training.compact` first when it is missing) at the run's input
size with a dynamic batch dimension, checks the graph with onnx.checker and against the tensor
spec, compares ONNX Runtime with PyTorch (the export fails, writing nothing, beyond the bound),
and writes manifest.json: tasks and output semantics, input size and normalisation, widths,
parameters, MACs, the source checkpoint's SHA-256 and the measured errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training.artifacts import COMPACT_DIR, MANIFEST_FILE, ONNX_FILE, final_checkpoint, run_image_size
from training.checkpoint import CheckpointError
from training.compaction import load_compact, load_plan
from training.export.manifest import build_manifest, write_manifest
from training.export.onnx_export import DEFAULT_OPSET, ExportReport, export_onnx
from training.export.spec import io_spec

log = logging.getLogger("training")


def export_run(run_dir: Path, *, opset: int = DEFAULT_OPSET) -> tuple[ExportReport, dict]:
    run_dir = Path(run_dir)
    if not (run_dir / COMPACT_DIR / "config.json").is_file():
        from training.compact import compact_run, describe

        log.info("no compact model in %s yet: compacting first", run_dir)
        log.info(describe(compact_run(run_dir)))
    model = load_compact(run_dir / COMPACT_DIR)
    size = run_image_size(run_dir)
    report = export_onnx(model, run_dir / ONNX_FILE, image_size=size, opset=opset)
    plan = load_plan(run_dir / COMPACT_DIR)
    manifest = build_manifest(model, io_spec(model.config, size), image_size=size, report=report,
                              source_checkpoint=final_checkpoint(run_dir),
                              extra={"run_dir": str(run_dir), "compaction": {"mode": plan.mode, "round_to": plan.round_to,
                                     "widths": plan.widths()}})
    write_manifest(run_dir / MANIFEST_FILE, manifest)
    return report, manifest


def describe(report: ExportReport, manifest: dict) -> str:
    c, e = manifest["complexity"], manifest["export"]
    worst = max(e["max_rel_error"].values())
    return (f"exported {report.path} (opset {e['opset']}, {c['parameters'] / 1e6:.3f} M parameters, "
            f"{c['macs'] / 1e9:.3f} GMACs); ONNX Runtime matches PyTorch within {worst:.1e} of each output's scale")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a training.run directory")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        print(describe(*export_run(args.run_dir, opset=args.opset)))
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
