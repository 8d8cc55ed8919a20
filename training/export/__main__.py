"""`python -m training.export RUN_DIR`: ONNX export of a run's compact model, with its manifest.

    python -m training.export runs/demo                # writes runs/demo/model.onnx and manifest.json
    python -m training.export runs/demo --float-input  # the same graph on float32 [N, 3, H, W] images
    python -m training.export runs/demo --raw-outputs  # the raw graph: each task's head output

Exports RUN_DIR/compact (running `training.compact` first when it is missing) at the run's input
size with a dynamic batch dimension. The default is the final graph: uint8 ``[N, H, W, 3]`` pixels
in, each task's answer out (class maps, probabilities, depth, normals, edge maps; float16 copies;
the head outputs as ``TASK_raw``), see `training.export.final_graph`. It checks the graph with
onnx.checker and against the tensor spec, compares ONNX Runtime with PyTorch and the reference
post-processing (the export fails, writing nothing, beyond the bounds), and writes manifest.json:
tasks and output semantics, the graph's outputs, input size and normalisation, widths, parameters,
MACs, the SHA-256 of model.onnx (``onnx_sha256``) and of the source checkpoint, and the measured
errors.

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

log = logging.getLogger("training")


def export_run(run_dir: Path, *, opset: int = DEFAULT_OPSET, raw_outputs: bool = False,
               float_input: bool = False) -> tuple[ExportReport, Manifest]:
    """Export RUN_DIR's compact model (compacting first when RUN_DIR/compact has no config.json):
    the final graph, on ``float_input`` with a float32 image input, on ``raw_outputs`` the raw graph."""
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
        report = export_onnx(model, staging / ONNX_FILE, image_size=size, opset=opset, raw_outputs=raw_outputs,
                             float_input=float_input)
        manifest = build_manifest(model, report.io_spec, image_size=size, report=report,
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
    graph = (f"final graph on {manifest.graph.input_dtype} images, {len(manifest.graph.tensors)} outputs"
             if manifest.graph is not None else "raw graph")
    ties = e.get("near_ties", {})
    exact = (f"; class and edge maps exact but for {sum(ties.values())} near-tie pixel(s)" if ties else "")
    return (f"exported {report.path} ({graph}, opset {e['opset']}, {c.parameters / 1e6:.3f} M parameters, "
            f"{c.macs / 1e9:.3f} GMACs); ONNX Runtime matches PyTorch within {worst:.1e} of each output's "
            f"scale{exact}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a training.run directory")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    graph = p.add_mutually_exclusive_group()
    graph.add_argument("--float-input", action="store_true",
                       help="the final graph on float32 [N, 3, H, W] images in [0, 1] instead of uint8 pixels")
    graph.add_argument("--raw-outputs", action="store_true",
                       help="the raw graph: float32 [N, 3, H, W] images in, each task's head output out "
                            "(post-processed by the gateway)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        print(describe(*export_run(args.run_dir, opset=args.opset, raw_outputs=args.raw_outputs,
                                   float_input=args.float_input)))
    except (*USER_ERRORS, ManifestError, ExportMismatch) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
