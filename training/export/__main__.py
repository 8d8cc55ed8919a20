"""`python -m training.export RUN_DIR`: ONNX export of a run's compact model, with its manifest.

    python -m training.export runs/demo          # writes runs/demo/model.onnx and manifest.json

Exports RUN_DIR/compact (running `training.compact` first when it is missing) at the run's input
size with a dynamic batch dimension, checks the graph with onnx.checker and against the tensor
spec, compares ONNX Runtime with PyTorch (the export fails, writing nothing, beyond the bound),
and writes manifest.json: tasks and output semantics, input size and normalisation, widths,
parameters, MACs, the SHA-256 of model.onnx (``onnx_sha256``) and of the source checkpoint, and the
measured errors.

Everything is built in a hidden staging folder inside RUN_DIR and moved into place only after every
check passed: first the compact folder (when this command made it), then model.onnx, then
manifest.json. A failure at any point leaves RUN_DIR as it was. Because the manifest names the
digest of its graph, a reader can tell a pair interrupted between the last two renames
(`parsimony.manifest.Manifest.verify_onnx`). Damaged inputs stop the command with one line naming
the file and field, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from parsimony.errors import ManifestError
from parsimony.io import fsync_dir, replace_dir, staging_dir
from parsimony.layout import COMPACT_CONFIG_FILE, COMPACT_DIR, MANIFEST_FILE, ONNX_FILE, WEIGHTS_FILE
from parsimony.manifest import Manifest
from training.artifacts import check_finite_outputs, final_checkpoint, run_image_size
from training.compact import USER_ERRORS, build_compact, write_compact
from training.compaction import check_plan_describes, load_compact, load_plan
from training.export.manifest import build_manifest
from training.export.onnx_export import DEFAULT_OPSET, ExportMismatch, ExportReport, export_onnx
from training.export.spec import io_spec

log = logging.getLogger("training")


def export_run(run_dir: Path, *, opset: int = DEFAULT_OPSET) -> tuple[ExportReport, Manifest]:
    """Export RUN_DIR's compact model (compacting first when RUN_DIR/compact has no config.json)."""
    run_dir = Path(run_dir)
    source = final_checkpoint(run_dir)  # also refuses a folder that is not a run
    size = run_image_size(run_dir)
    with staging_dir(run_dir, "export") as staging:
        compact_dir = run_dir / COMPACT_DIR
        new_compact = None
        if not (compact_dir / COMPACT_CONFIG_FILE).is_file():
            from training.compact import describe as describe_compaction

            log.info("no compact model in %s yet: compacting first", run_dir)
            compacted = build_compact(run_dir)
            new_compact = write_compact(compacted, staging)
            log.info(describe_compaction(compacted.result))
        model, plan = load_compact(new_compact or compact_dir), load_plan(new_compact or compact_dir)
        check_plan_describes(plan, model.config, new_compact or compact_dir)
        check_finite_outputs(model, size, compact_dir / WEIGHTS_FILE)
        report = export_onnx(model, staging / ONNX_FILE, image_size=size, opset=opset)
        manifest = build_manifest(model, io_spec(model.config, size), image_size=size, report=report,
                                  source_checkpoint=source,
                                  extra={"run_dir": str(run_dir), "compaction": {
                                      "mode": plan.mode, "round_to": plan.round_to, "widths": plan.widths()}})
        manifest.write(staging / MANIFEST_FILE)
        if new_compact is not None:
            replace_dir(new_compact, compact_dir)
        for name in (ONNX_FILE, MANIFEST_FILE):  # the manifest last: it vouches for the graph
            os.replace(staging / name, run_dir / name)
        fsync_dir(run_dir)
    return dataclasses.replace(report, path=run_dir / ONNX_FILE), manifest


def describe(report: ExportReport, manifest: Manifest) -> str:
    c, e = manifest.complexity, manifest.export
    worst = max(e["max_rel_error"].values())
    return (f"exported {report.path} (opset {e['opset']}, {c.parameters / 1e6:.3f} M parameters, "
            f"{c.macs / 1e9:.3f} GMACs); ONNX Runtime matches PyTorch within {worst:.1e} of each output's scale")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a training.run directory")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        print(describe(*export_run(args.run_dir, opset=args.opset)))
    except (*USER_ERRORS, ManifestError, ExportMismatch) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
