"""`python -m training.run`: train a single- or multi-task model.

    python -m training.run --dataset synthetic-scenes --encoder tiny --epochs 8 --out runs/demo
    python -m training.run --config configs/demo.yaml --set optim.lr=3e-4
    python -m training.run --resume runs/demo          # continue an interrupted run
    torchrun --nproc_per_node=2 -m training.run ...    # DistributedDataParallel

The run directory holds config.yaml, checkpoint-last.pt / checkpoint-best.pt (atomic, loadable
with weights_only=True), history.jsonl (one line per epoch) and metrics.json (test metrics of the
best checkpoint, the trivial baselines, and ΔMTL when single-task baselines are given).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from parsimony.errors import ConfigError, InputFileError
from parsimony.layout import COMPACT_CONFIG_FILE, COMPACT_DIR, CONFIG_FILE
from training.checkpoint import LAST, TrainProgress
from training.config import (
    RunConfig,
    apply_set_items,
    dump_config,
    load_yaml,
    resolve_config,
    set_dotted,
)
from training.data import DataError, available_datasets
from training.distributed import DistInfo, barrier, init_distributed, shutdown_distributed
from training.export.onnx_export import ExportMismatch
from training.finish import final_evaluation, load_baseline, package_run
from training.trainer import build_run, fit, pick_device, restore

log = logging.getLogger("training")
# what a user's flags, config files or data can cause: one line and exit status 2. Anything else is a
# bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, InputFileError, ExportMismatch)

# flag -> dotted config key; every flag defaults to None so that only given flags override.
FLAG_KEYS = {
    "dataset": "dataset.name", "data_root": "dataset.root", "image_size": "dataset.image_size",
    "train_samples": "dataset.train_samples", "val_samples": "dataset.val_samples",
    "augment": "dataset.augment", "num_workers": "dataset.num_workers",
    "tasks": "tasks", "encoder": "model.encoder", "head": "model.head", "pretrained": "model.pretrained",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "task_weighting": "train.task_weighting",
    "patience": "train.early_stopping_patience", "checkpoint_every": "train.checkpoint_every",
    "optimizer": "optim.name", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
    "schedule": "optim.schedule", "lam": "sparsity.lam", "sparsity_mode": "sparsity.mode",
    "groups": "sparsity.groups", "sparsity_warmup": "sparsity.warmup_epochs", "sparsity_cooldown": "sparsity.cooldown_epochs", "target": "sparsity.target", "target_batch": "sparsity.target_batch",
    "target_threads": "sparsity.target_threads", "group_weight": "sparsity.group_weight", "baseline": "baseline", "seed": "seed", "deterministic": "deterministic",
    "device": "device", "amp": "amp", "out": "out", "export": "train.export", "export_graph": "train.export_graph",
}
RESUME_FLAGS = {"epochs", "device", "num_workers", "export", "export_graph"}
FINETUNE_FIXED = {"encoder", "head", "pretrained", "tasks", "dataset", "data_root", "image_size"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with any of the configuration sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--finetune", metavar="RUN_DIR",
                   help="fine-tune RUN_DIR's compact model without the regulariser (into RUN_DIR/finetune unless --out)")
    g = p.add_argument_group("common settings (each overrides the config file)")
    g.add_argument("--dataset", help=f"one of {available_datasets()}")
    g.add_argument("--data-root", help="root folder of a real data set")
    g.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"))
    g.add_argument("--train-samples", type=int)
    g.add_argument("--val-samples", type=int)
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--num-workers", type=int)
    g.add_argument("--tasks", type=_task_list, help="comma-separated task names (default: all of the data set)")
    g.add_argument("--encoder", help="encoder name, e.g. tiny, resnet18, resnet50d-os8")
    g.add_argument("--head", help="dense head architecture: light or aspp")
    g.add_argument("--pretrained", metavar="PATH", help="torchvision ResNet state-dict file for the encoder")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", choices=["adam", "adamw", "sgd"])
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=["cosine", "step", "constant"])
    g.add_argument("--task-weighting", choices=["equal", "uncertainty"])
    g.add_argument("--patience", type=int, help="early-stopping patience in epochs (validation loss)")
    g.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps within an epoch")
    s = p.add_argument_group("channel group sparsity of the shared encoder")
    s.add_argument("--lam", type=float, help="group-lasso strength λ (0: dense)")
    s.add_argument("--sparsity-mode", choices=["proximal", "penalty"])
    s.add_argument("--groups", choices=["channel", "paper"],
                   help="channel: zero-invariant channel groups (default); paper: one group per conv input channel")
    s.add_argument("--sparsity-warmup", type=int, metavar="EPOCHS", help="dense epochs before sparsifying")
    s.add_argument("--sparsity-cooldown", type=int, metavar="EPOCHS",
                   help="last epochs without the regulariser, zero groups held at zero (prune, then fine-tune)")
    s.add_argument("--target", metavar="KIND=VALUE",
                   help="reach zero_groups=F (fraction of zero groups), macs=R (dense/compact MACs) or latency_ms=T "
                        "(compact ONNX Runtime latency) in one run: λ is adapted during training")
    s.add_argument("--target-batch", type=int, metavar="N", help="batch of the latency_ms timing (default 8)")
    s.add_argument("--target-threads", type=int, metavar="N", help="ONNX Runtime threads of the latency_ms timing")
    s.add_argument("--group-weight", choices=["size", "macs", "latency"],
                   help="group-lasso weight: size (sqrt|g|) or the MACs / latency a channel costs per weight "
                        "(default: the target's)")
    g.add_argument("--baseline", nargs="+", metavar="PATH",
                   help="single-task runs (or their metrics.json) to compute ΔMTL against")
    g.add_argument("--seed", type=int)
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision on CUDA (default on)")
    g.add_argument("--out", help="run directory (default runs/latest)")
    g.add_argument("--export", action=argparse.BooleanOptionalAction, default=None,
                   help="compact and export ONNX + manifest at the end (default on)")
    g.add_argument("--export-graph", choices=["final", "float-input", "raw"],
                   help="the exported graph: final (default; uint8 pixels in, each task's answer out), "
                        "float-input (the same on float32 images in [0, 1]) or raw (head outputs out)")
    return p


def _task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def flag_overrides(args: argparse.Namespace) -> dict:
    tree: dict = {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            set_dotted(tree, key, value)
    apply_set_items(tree, args.set, "optim.lr=3e-4")
    return tree


def resolve(args: argparse.Namespace) -> RunConfig:
    overrides = flag_overrides(args)
    if args.resume:
        saved = Path(args.resume) / CONFIG_FILE
        extra = sorted(f for f in FLAG_KEYS if getattr(args, f) is not None and f not in RESUME_FLAGS)
        if extra or args.config or args.set:
            raise ConfigError(f"--resume continues a run with its saved config; only --epochs, --device, "
                              f"--num-workers, --export and --export-graph may change (got {extra or '--config/--set'})")
        overrides["out"] = str(args.resume)
        return resolve_config(load_yaml(saved), overrides)
    if args.finetune:
        return _finetune_config(args, overrides)
    return resolve_config(load_yaml(args.config) if args.config else {}, overrides)


def _finetune_config(args: argparse.Namespace, overrides: dict) -> RunConfig:
    """The source run's config, starting from its compact model, without the regulariser."""
    source = Path(args.finetune)
    fixed = sorted(f for f in FINETUNE_FIXED if getattr(args, f) is not None)
    if fixed or args.resume:
        raise ConfigError(f"--finetune keeps the source run's architecture, tasks and data; drop {fixed or '--resume'}")
    if not (source / COMPACT_DIR / COMPACT_CONFIG_FILE).is_file():
        from training.compact import compact_run

        compact_run(source)
    overrides.setdefault("out", str(source / "finetune"))
    set_dotted(overrides, "model.init_from", str(source / COMPACT_DIR))
    set_dotted(overrides, "sparsity.lam", 0.0)
    set_dotted(overrides, "sparsity.target", None)
    base = load_yaml(args.config) if args.config else load_yaml(source / CONFIG_FILE)
    return resolve_config(base, overrides)


def prepare_run_dir(cfg: RunConfig, resume: bool, dist: DistInfo) -> Path:
    run_dir = Path(cfg.out)
    if not resume and (run_dir / LAST).exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                          f"or choose another --out")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / CONFIG_FILE)
    barrier()
    return run_dir


def _device(name: str, dist: DistInfo | None = None):
    """`pick_device`, whose ValueError means a device this machine does not have (a flag error)."""
    try:
        return pick_device(name, dist)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def configure_logging(dist: DistInfo) -> None:
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args)
        load_baseline(cfg.baseline)  # a bad --baseline fails now, not after training
        device = _device(cfg.device)
        dist = init_distributed(device)
        configure_logging(dist)
        device = _device(cfg.device, dist)
        run_dir = prepare_run_dir(cfg, bool(args.resume), dist)
        run = build_run(cfg, run_dir, dist, device)
        progress = restore(run, run_dir / LAST) if args.resume else TrainProgress()
        if args.resume:
            log.info("resuming %s at epoch %d, batch %d", run_dir, progress.epoch, progress.batch)
        log.info("training %s on %s (%s) with %d processes on %s", run.model.config.name, cfg.dataset.name,
                 ", ".join(t.name for t in run.tasks), dist.world_size, device)
        progress = fit(run, progress)
        final_evaluation(run, progress)
        if cfg.train.export and dist.is_main:
            package_run(run)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
