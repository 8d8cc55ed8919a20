"""`python -m training.compact RUN_DIR`: physically remove the dead channels of a trained run.

    python -m training.compact runs/demo                 # writes runs/demo/compact/
    python -m training.compact runs/demo --round-to 1    # keep exactly the alive channels

Reads the run's final weights (checkpoint-final.pt), plans and applies the compaction (widths kept
at multiples of --round-to by retaining some zero channels, since aligned widths run faster),
checks on a random batch that the compact model computes what the sparse one computes, and writes
config.json + model.safetensors + plan.json to RUN_DIR/compact.

The new folder is built aside and swapped in only after it has been read back and checked, so
RUN_DIR/compact is always the previous complete folder or the new one. Damaged inputs (checkpoint,
config.yaml, metrics.json) stop the command with one line naming the file and field, exit status 2,
nothing written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from parsimony.errors import ConfigError, InputFileError
from parsimony.io import replace_dir, staging_dir
from parsimony.layout import COMPACT_DIR
from training.artifacts import check_finite_outputs, load_run_config, load_run_model, run_image_size
from training.compaction import CompactionPlan, compact, load_compact, save_compact
from training.data import DataError
from training.models.complexity import count_macs, count_parameters

# what a user's files or flags can cause: one line and exit status 2; anything else is a bug
USER_ERRORS = (InputFileError, DataError, ConfigError)

log = logging.getLogger("training")
EXACTNESS_BOUND = 1e-4  # max |compact - sparse| / max |sparse| per output, float32


@dataclass(frozen=True)
class CompactionResult:
    directory: Path
    dense_parameters: int
    compact_parameters: int
    dense_macs: int
    compact_macs: int
    max_rel_error: float


@torch.no_grad()
def max_relative_error(a: torch.nn.Module, b: torch.nn.Module, image_size: tuple[int, int]) -> float:
    x = torch.rand(2, 3, *image_size, generator=torch.Generator().manual_seed(0))
    out_a, out_b = a(x), b(x)
    return max(float((out_a[k] - out_b[k]).abs().max() / out_b[k].abs().max().clamp_min(1e-12)) for k in out_b)


@dataclass(frozen=True)
class Compacted:
    """A compact model and its plan, checked in memory; nothing written yet."""

    model: torch.nn.Module
    plan: CompactionPlan
    result: CompactionResult


def build_compact(run_dir: Path, *, round_to: int = 8) -> Compacted:
    """Read and check the run's files, compact its final model and check the result; writes nothing."""
    run_dir = Path(run_dir)
    model, source = load_run_model(run_dir)  # first: it says when run_dir is not a run
    cfg = load_run_config(run_dir)
    size = run_image_size(run_dir)
    check_finite_outputs(model, size, source)
    small, plan = compact(model, mode=cfg.sparsity.groups, round_to=round_to)
    err = max_relative_error(small, model, size)
    if not err <= EXACTNESS_BOUND:
        raise RuntimeError(f"the compact model differs from {source.name} by {err:.2e} (bound {EXACTNESS_BOUND}); "
                           f"this is a bug, please report it with the run's config.yaml")
    result = CompactionResult(run_dir / COMPACT_DIR, count_parameters(model), count_parameters(small),
                              count_macs(model, size), count_macs(small, size), err)
    return Compacted(small, plan, result)


def write_compact(compacted: Compacted, staging: Path) -> Path:
    """Save into ``staging``/compact and read it back: the folder to move into place."""
    folder = save_compact(compacted.model, compacted.plan, Path(staging) / COMPACT_DIR)
    again = load_compact(folder).state_dict()
    if any(not torch.equal(v, again[k]) for k, v in compacted.model.state_dict().items()):
        raise RuntimeError(f"{folder} does not read back as written; this is a bug, please report it")
    return folder


def compact_run(run_dir: Path, *, round_to: int = 8) -> CompactionResult:
    run_dir = Path(run_dir)
    compacted = build_compact(run_dir, round_to=round_to)
    with staging_dir(run_dir, COMPACT_DIR) as staging:
        replace_dir(write_compact(compacted, staging), run_dir / COMPACT_DIR)
    return compacted.result


def describe(result: CompactionResult) -> str:
    p, m = result.dense_parameters / result.compact_parameters, result.dense_macs / result.compact_macs
    return (f"compact model in {result.directory}: parameters {result.dense_parameters / 1e6:.3f} M -> "
            f"{result.compact_parameters / 1e6:.3f} M (x{p:.2f} fewer), MACs {result.dense_macs / 1e9:.3f} G -> "
            f"{result.compact_macs / 1e9:.3f} G (x{m:.2f} fewer); max relative output difference "
            f"{result.max_rel_error:.1e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.compact", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a training.run directory")
    p.add_argument("--round-to", type=_positive, default=8, help="keep widths at multiples of this (1: exact alive set)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        print(describe(compact_run(args.run_dir, round_to=args.round_to)))
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
