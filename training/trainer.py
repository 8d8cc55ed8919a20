"""The named steps of a training run: build the parts, fit, evaluate the best weights at the end.

`training.run` only wires these together; tests and the sweep call them directly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from parsimony.io import atomic_write_text
from parsimony.layout import HISTORY_FILE
from training.checkpoint import BEST, LAST, TrainProgress, load_checkpoint, save_checkpoint
from training.config import ConfigError, RunConfig
from training.data import DatasetInfo, DatasetSpec, build_dataset
from training.data.sampler import EpochBatchSampler
from training.distributed import DistInfo, broadcast_flag
from training.engine import StepContext, TrainStep, evaluate, train_one_epoch
from training.losses import MultiTaskLoss
from training.models import create_model
from training.models.pretrained import load_torchvision_resnet
from training.report import log_epoch
from training.sparsity import GroupSet, build_groups, check_same_across_ranks, sparsity_report
from training.sparsity.build import build_regularizer
from training.tasks import TaskSpec

log = logging.getLogger("training")
SPARSITY_SUMMARY = ("pct_zero_groups", "pct_zero_weights", "compact_parameters", "compact_macs")


@dataclass
class Run:
    """Everything a training run needs, built once."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    dist: DistInfo
    info: DatasetInfo
    tasks: tuple[TaskSpec, ...]
    datasets: dict[str, Dataset]
    model: nn.Module
    loss: MultiTaskLoss
    step: nn.Module  # TrainStep, wrapped in DDP when distributed
    sampler: EpochBatchSampler
    ctx: StepContext
    groupset: GroupSet

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch()


def pick_device(name: str, dist: DistInfo | None = None) -> torch.device:
    """The run's device. ``cuda`` without an index is the process's GPU: its local rank under
    torchrun, else GPU 0. ``auto`` falls back to the CPU when torch cannot use a GPU, and says why
    when the machine has one."""
    if name != "auto" and torch.device(name).type != "cuda":
        return torch.device(name)
    reason = cuda_unusable_reason()
    if name == "auto":
        if reason is not None and nvidia_gpu_present():
            log.warning("--device auto: this machine has an NVIDIA GPU but training runs on the CPU: %s", reason)
        name = "cpu" if reason is not None else "cuda"
    device = torch.device(name)
    if device.type == "cuda":
        if reason is not None:
            raise ValueError(f"--device {name} was asked for but {reason}; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank if dist is not None else 0)
        torch.cuda.set_device(device)
    return device


def cuda_unusable_reason() -> str | None:
    """Why torch cannot run on a GPU here (None when it can): a CPU-only build, a driver older
    than the build needs (torch says so in a warning), or no device visible."""
    if not torch.backends.cuda.is_built():
        return f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return None
    said = " ".join(str(w.message).strip() for w in caught)
    if said:
        return f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it: {said}"
    return "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the container's GPU request)"


def nvidia_gpu_present() -> bool:
    """An NVIDIA driver with a device node on this machine, whatever torch makes of it."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU computes it natively (compute capability 8.0+), else fp16 with a grad
    scaler: `torch.cuda.is_bf16_supported()` alone also counts emulated bf16 (T4, V100), which is
    far slower than their fp16 tensor cores."""
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation argument
        native = torch.cuda.get_device_capability(device)[0] >= 8
    return torch.bfloat16 if native else torch.float16


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_datasets(cfg: RunConfig) -> tuple[dict[str, Dataset], DatasetInfo]:
    d = cfg.dataset
    counts = {"train": d.train_samples, "val": d.val_samples, "test": d.test_samples or d.val_samples}
    datasets, info = {}, None
    for split, n in counts.items():
        spec = DatasetSpec(root=d.root, image_size=d.image_size, num_samples=n,
                           tasks=tuple(cfg.tasks) if cfg.tasks else None, seed=cfg.seed,
                           augment=d.augment and split == "train", options=dict(d.options))
        datasets[split], split_info = build_dataset(d.name, split, spec)
        info = info or split_info
    return datasets, info


def build_network(cfg: RunConfig, tasks: tuple[TaskSpec, ...]) -> nn.Module:
    m = cfg.model
    if m.init_from:
        return _load_initial(m.init_from, tasks)
    kwargs = {k: v for k, v in {"head": m.head, "head_width": m.head_width}.items() if v is not None}
    model = create_model(encoder=m.encoder, tasks=tasks, name=f"{m.encoder}-{'-'.join(t.name for t in tasks)}",
                         **kwargs)
    if m.pretrained:
        loaded = load_torchvision_resnet(model, m.pretrained)
        log.info("initialised %d encoder tensors from %s", len(loaded), m.pretrained)
    return model


def _load_initial(directory: str, tasks: tuple[TaskSpec, ...]) -> nn.Module:
    """A compact model to fine-tune; its tasks must be the data set's selected tasks."""
    from training.compaction import load_compact

    model = load_compact(directory)
    if model.config.tasks != tasks:
        raise ConfigError(f"the model in {directory} predicts {[t.name for t in model.config.tasks]} but this run "
                         f"trains {[t.name for t in tasks]}; use the same tasks and data set")
    log.info("starting from the compact model in %s", directory)
    return model.train()


def build_optimizer(cfg: RunConfig, model: nn.Module, loss: nn.Module) -> torch.optim.Optimizer:
    """The model's parameters with weight decay; the loss's own (log-variances) without, since
    decay would pull the learned task weights back to 1."""
    o = cfg.optim
    groups = [{"params": list(model.parameters()), "weight_decay": o.weight_decay}]
    if any(True for _ in loss.parameters()):
        groups.append({"params": list(loss.parameters()), "weight_decay": 0.0})
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr)


def lr_factor(step: int, *, cfg: RunConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up, then the schedule."""
    o = cfg.optim
    warmup = int(o.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "step":
        return o.step_gamma ** ((step // steps_per_epoch) // o.step_epochs)
    total = max(cfg.train.epochs * steps_per_epoch - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total) / total))


def _autocast_factory(cfg: RunConfig, device: torch.device):
    if not (cfg.amp and device.type == "cuda"):
        return contextlib.nullcontext, False
    dtype = amp_dtype(device)
    log.info("mixed precision on %s: %s%s", torch.cuda.get_device_name(device), str(dtype).removeprefix("torch."),
             " with a grad scaler" if dtype == torch.float16 else "")
    return functools.partial(torch.autocast, "cuda", dtype=dtype), dtype == torch.float16


def build_run(cfg: RunConfig, run_dir: Path, dist: DistInfo, device: torch.device) -> Run:
    set_determinism(cfg.seed, cfg.deterministic)
    datasets, info = build_datasets(cfg)
    tasks = info.tasks
    model = build_network(cfg, tasks).to(device)
    loss = MultiTaskLoss(tasks, cfg.train.task_weighting).to(device)
    groupset = build_groups(model, cfg.sparsity.groups)  # before DDP wraps the model
    step: nn.Module = TrainStep(model, loss)
    if dist.enabled:
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
        log.info("DistributedDataParallel: rank %d of %d, backend %s", dist.rank, dist.world_size,
                 torch.distributed.get_backend())
    sampler = EpochBatchSampler(len(datasets["train"]), cfg.train.batch_size, seed=cfg.seed,
                                rank=dist.rank, world_size=dist.world_size)
    regularizer = build_regularizer(groupset, cfg.sparsity, model=model, image_size=info.image_size,
                                    epochs=cfg.train.epochs, steps_per_epoch=sampler.batches_per_epoch(),
                                    run_dir=run_dir)
    optimizer = build_optimizer(cfg, model, loss)
    schedule = functools.partial(lr_factor, cfg=cfg, steps_per_epoch=sampler.batches_per_epoch())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    autocast, needs_scaler = _autocast_factory(cfg, device)
    ctx = StepContext(optimizer=optimizer, scheduler=scheduler,
                      scaler=torch.amp.GradScaler(device.type, enabled=needs_scaler), autocast=autocast,
                      grad_clip=cfg.optim.grad_clip, log_every=cfg.train.log_every,
                      show_progress=dist.is_main and sys.stderr.isatty(), regularizer=regularizer)
    return Run(config=cfg, run_dir=run_dir, device=device, dist=dist, info=info, tasks=tasks,
               datasets=datasets, model=model, loss=loss, step=step, sampler=sampler, ctx=ctx,
               groupset=groupset)


def loader(run: Run, split: str, *, shard: bool = True) -> DataLoader:
    """Evaluation loader: every sample once; under DDP each rank takes every world-th sample."""
    n = len(run.datasets[split])
    rank, world = (run.dist.rank, run.dist.world_size) if shard else (0, 1)
    sampler = EpochBatchSampler(n, run.config.train.eval_batch_size or run.config.train.batch_size,
                                shuffle=False, drop_last=False, rank=rank, world_size=world)
    return DataLoader(run.datasets[split], batch_sampler=sampler, num_workers=run.config.dataset.num_workers)


def train_loader(run: Run) -> DataLoader:
    return DataLoader(run.datasets["train"], batch_sampler=run.sampler, num_workers=run.config.dataset.num_workers,
                      pin_memory=run.device.type == "cuda")


# --- checkpoints ---------------------------------------------------------------------------------

def _states(run: Run) -> dict:
    states = {"model": run.model.state_dict(), "loss": run.loss.state_dict(),
              "optimizer": run.ctx.optimizer.state_dict(), "scheduler": run.ctx.scheduler.state_dict(),
              "scaler": run.ctx.scaler.state_dict()}
    if hasattr(run.ctx.regularizer, "state_dict"):  # a sparsity target's controller: λ, frozen, trajectory
        states["controller"] = run.ctx.regularizer.state_dict()
    return states


def save(run: Run, progress: TrainProgress, name: str = LAST) -> None:
    if run.dist.is_main:
        save_checkpoint(run.run_dir / name, model_config=run.model.config.to_dict(), states=_states(run),
                        progress=progress)


def restore(run: Run, path: Path) -> TrainProgress:
    ckpt = load_checkpoint(path)
    states = ckpt["states"]
    run.model.load_state_dict(states["model"])
    run.loss.load_state_dict(states["loss"])
    run.ctx.optimizer.load_state_dict(states["optimizer"])
    run.ctx.scheduler.load_state_dict(states["scheduler"])
    run.ctx.scaler.load_state_dict(states["scaler"])
    if "controller" in states and hasattr(run.ctx.regularizer, "load_state_dict"):
        run.ctx.regularizer.load_state_dict(states["controller"])
    return TrainProgress.from_dict(ckpt["progress"])


def load_weights(model: nn.Module, path: Path) -> dict:
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["states"]["model"])
    return ckpt


def write_history(run: Run, progress: TrainProgress) -> None:
    if run.dist.is_main:
        atomic_write_text(run.run_dir / HISTORY_FILE, "".join(json.dumps(h) + "\n" for h in progress.history))


# --- the loop ------------------------------------------------------------------------------------

def fit(run: Run, progress: TrainProgress) -> TrainProgress:
    """Train from ``progress`` to the last epoch (or early stop), evaluating every epoch."""
    cfg = run.config
    every = cfg.train.checkpoint_every
    bpe = run.batches_per_epoch
    val_loader = loader(run, "val")
    while progress.epoch < cfg.train.epochs and not _stopped(progress):
        epoch = progress.epoch
        run.sampler.set_epoch(epoch, progress.batch)
        run.ctx.epoch = epoch
        _set_dataset_epoch(run.datasets["train"], epoch)

        def after_step(done: int) -> None:
            progress.batch, progress.global_step = done, progress.global_step + 1
            _maybe_inject_kill(progress.global_step)
            if every and done % every == 0 and done < bpe:
                save(run, progress)

        train_losses = train_one_epoch(run.step, train_loader(run), run.ctx, run.device, epoch=epoch,
                                       first_batch=progress.batch, total_batches=bpe, after_step=after_step)
        metrics, val_loss = evaluate(run.model, run.loss, val_loader, run.tasks, run.device, run.ctx.autocast)
        _end_epoch(run, progress, epoch, train_losses, metrics, val_loss)
    check_same_across_ranks(run.groupset)
    return progress


def _end_epoch(run: Run, progress: TrainProgress, epoch: int, train_losses: dict, metrics: dict,
               val_loss: float) -> None:
    record = {"epoch": epoch, "step": progress.global_step, "lr": run.ctx.optimizer.param_groups[0]["lr"],
              "train": train_losses, "val_loss": val_loss, "val": metrics}
    if run.dist.is_main:
        report = sparsity_report(run.model, run.groupset, run.info.image_size)
        record["sparsity"] = {k: report[k] for k in SPARSITY_SUMMARY}
    if hasattr(run.ctx.regularizer, "epoch_record"):  # a sparsity target: λ, measured quantity, target
        record["target"] = run.ctx.regularizer.epoch_record()
    if hasattr(run.loss, "log_vars") and run.config.train.task_weighting == "uncertainty":
        record["log_vars"] = dict(run.loss.log_vars)
    improved = val_loss < progress.best_val_loss
    progress.history.append(record)
    progress.epoch, progress.batch = epoch + 1, 0
    if improved:
        progress.best_val_loss, progress.best_epoch, progress.bad_epochs = val_loss, epoch, 0
    else:
        progress.bad_epochs += 1
    patience = run.config.train.early_stopping_patience
    stop = broadcast_flag(bool(patience and progress.bad_epochs >= patience), run.device)
    if stop:
        progress.history[-1]["early_stop"] = True
    if improved:
        save(run, progress, BEST)
    save(run, progress, LAST)
    write_history(run, progress)
    if run.dist.is_main:
        log_epoch(record, run.tasks, improved)


def _maybe_inject_kill(global_step: int) -> None:
    """Fault injection for the kill-and-resume test: ``PARSIMONY_KILL_AT_STEP=N`` makes the process
    SIGKILL itself right after optimizer step N, before any checkpoint of that step is written.
    The variable is read once per process (on the first step), not in every step of the loop."""
    at = _kill_step()
    if at is not None and global_step == at:
        os.kill(os.getpid(), signal.SIGKILL)


@functools.cache
def _kill_step() -> int | None:
    at = os.environ.get("PARSIMONY_KILL_AT_STEP")
    return None if at is None else int(at)


def _stopped(progress: TrainProgress) -> bool:
    return bool(progress.history and progress.history[-1].get("early_stop"))


def _set_dataset_epoch(dataset: Dataset, epoch: int) -> None:
    set_epoch = getattr(dataset, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)
