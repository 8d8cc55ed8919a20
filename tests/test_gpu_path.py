"""The GPU code paths of training, checked on the CPU: device selection and the AMP dtype against a
stand-in `torch.cuda`, the training step's host-device synchronisations, the grad scaler's skipped
steps, FP16-safe normals, torchrun with one process, and the prepared GPU check (`--dry-run`)."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training import distributed, trainer
from training.data import DatasetSpec, build_dataset
from training.distributed import DistInfo
from training.engine import StepContext, TrainStep, _optimizer_step, train_one_epoch
from training.losses import MultiTaskLoss
from training.models import create_model
from training.models.heads import unit_vectors
from training.sparsity import GroupLasso, build_groups
from training.sparsity.captured import WARMUP_CALLS

ROOT = Path(__file__).resolve().parents[1]


# --- device selection ------------------------------------------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as on a machine with GPUs; records the devices `set_device` was given."""
    chosen = []
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_cuda_without_an_index_is_gpu_0_in_a_single_process(fake_cuda):
    device = trainer.pick_device("cuda")
    assert device == torch.device("cuda", 0)
    assert fake_cuda == [torch.device("cuda", 0)]  # torch refuses set_device(cuda) without an index


def test_cuda_under_torchrun_is_the_local_rank(fake_cuda):
    assert trainer.pick_device("cuda", DistInfo(rank=3, world_size=4, local_rank=3)) == torch.device("cuda", 3)
    assert trainer.pick_device("auto", DistInfo(rank=1, world_size=2, local_rank=1)) == torch.device("cuda", 1)
    assert trainer.pick_device("cuda:2") == torch.device("cuda", 2)  # an explicit index wins


def test_auto_on_a_cpu_only_torch_with_a_gpu_says_why(monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.setattr(trainer, "nvidia_gpu_present", lambda: True)
    with caplog.at_level(logging.WARNING, logger="training"):
        assert trainer.pick_device("auto") == torch.device("cpu")
    assert "NVIDIA GPU" in caplog.text and "CPU-only build" in caplog.text


def test_auto_with_a_driver_too_old_says_what_torch_said(monkeypatch, caplog):
    def unavailable():
        warnings.warn("The NVIDIA driver on your system is too old (found version 11040)", UserWarning, stacklevel=1)
        return False

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    monkeypatch.setattr(trainer, "nvidia_gpu_present", lambda: True)
    with caplog.at_level(logging.WARNING, logger="training"):
        assert trainer.pick_device("auto") == torch.device("cpu")
    assert "driver on your system is too old" in caplog.text
    with pytest.raises(ValueError, match="too old.*use --device cpu"):
        trainer.pick_device("cuda")


def test_auto_on_a_machine_without_gpu_is_quiet(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer, "nvidia_gpu_present", lambda: False)
    with caplog.at_level(logging.WARNING, logger="training"):
        assert trainer.pick_device("auto") == torch.device("cpu")
    assert caplog.text == ""


@pytest.mark.parametrize("capability, native, expected", [
    ((7, 5), False, torch.float16),   # T4: bf16 only emulated
    ((7, 0), False, torch.float16),   # V100
    ((8, 0), True, torch.bfloat16),   # A100
    ((9, 0), True, torch.bfloat16),   # H100 / H200
])
def test_amp_dtype_is_bf16_only_where_native(monkeypatch, capability, native, expected):
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return True if including_emulation else native  # what torch answers on such a GPU

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
    assert trainer.amp_dtype(torch.device("cuda", 0)) == expected

    class Config:
        amp = True

    _, needs_scaler = trainer._autocast_factory(Config(), torch.device("cuda", 0))
    assert needs_scaler == (expected == torch.float16)


# --- the training step -----------------------------------------------------------------------------


def _small_setup(lam: float = 0.5, scaler: torch.amp.GradScaler | None = None):
    ds, info = build_dataset("synthetic-scenes", "train", DatasetSpec(image_size=(32, 48), num_samples=8))
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ds[0]}
    torch.manual_seed(0)
    model = create_model(encoder="tiny", tasks=info.tasks)
    step = TrainStep(model, MultiTaskLoss(info.tasks)).train()
    optimizer = torch.optim.AdamW(step.parameters(), lr=1e-3)
    ctx = StepContext(optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                      scaler=scaler or torch.amp.GradScaler("cpu", enabled=False), autocast=nullcontext,
                      log_every=1000, regularizer=GroupLasso(build_groups(model), lam=lam))
    return step, batch, ctx


def test_an_epoch_reads_the_losses_back_only_when_logging(monkeypatch):
    """Each read of a tensor's value (item, float, tolist) in the project's code waits for the GPU;
    a training step must not do one (torch's own CPU-side step counters are not the project's)."""
    step, batch, ctx = _small_setup()
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original):
            caller = sys._getframe(1)
            if str(ROOT / "training") in caller.f_code.co_filename:
                reads.append(caller.f_code.co_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    losses = train_one_epoch(step, [batch] * 6, ctx, torch.device("cpu"), epoch=0, first_batch=0, total_batches=6)
    assert reads == ["mean", "mean"]  # the log line after the last batch, and the epoch's means
    assert set(losses) >= {"loss", "segmentation", "depth", "normal"} and all(v > 0 for v in losses.values())
    reads.clear()
    ctx.log_every = 2
    train_one_epoch(step, [batch] * 6, ctx, torch.device("cpu"), epoch=1, first_batch=0, total_batches=6)
    assert reads == ["mean"] * 4  # batches 2, 4, 6 and the epoch's means


def _steps_follow_the_scaler(step, batches, ctx) -> list[bool]:
    """Runs a step per batch; a step the grad scaler skipped (its scale went down) must leave every
    weight as it was, proximal step included, and a step it took must move them. Returns which
    steps were taken."""
    taken = []
    for batch in batches:
        before = {k: v.detach().clone() for k, v in step.named_parameters()}
        scale = ctx.scaler.get_scale()
        _optimizer_step(step, batch, ctx)
        skipped = ctx.scaler.get_scale() < scale
        moved = any(not torch.equal(before[k], v) for k, v in step.named_parameters())
        assert moved != skipped, f"step {len(taken)}: skipped={skipped} but weights moved={moved}"
        taken.append(not skipped)
    return taken


def test_a_skipped_scaler_step_leaves_the_weights_alone():
    """A grad scaler skips the optimizer step on inf/NaN gradients; the proximal step must skip too."""
    step, batch, ctx = _small_setup(lam=5.0, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    poisoned = dict(batch, image=torch.full_like(batch["image"], float("nan")))  # NaN gradients
    taken = _steps_follow_the_scaler(step, [poisoned, batch, batch], ctx)
    assert taken[0] is False and any(taken[1:])


def test_proximal_step_follows_the_stepped_flag():
    step, _, ctx = _small_setup(lam=50.0)
    reg = ctx.regularizer
    weights = lambda: {k: v.clone() for k, v in step.model.state_dict().items()}  # noqa: E731
    start = weights()
    reg.proximal_step(1e-3, stepped=torch.tensor(False))
    assert all(torch.equal(start[k], v) for k, v in weights().items())
    reg.proximal_step(1e-3, stepped=torch.tensor(True))
    flagged = weights()
    step.model.load_state_dict(start)
    reg.proximal_step(1e-3)
    assert all(torch.equal(flagged[k], v) for k, v in weights().items())
    assert any(not torch.equal(start[k], v) for k, v in flagged.items())


def test_only_a_static_proximal_step_is_replayed_as_a_cuda_graph():
    """A graph replays the kernels and tensors of its capture: cost-aware weights (refreshed into new
    tensors) and a controller deciding on the host must stay eager."""
    step, _, ctx = _small_setup()
    assert ctx.regularizer._static_step()
    groups = build_groups(step.model)
    saving = torch.ones(sum(groups.index().widths), dtype=torch.float64)
    assert not GroupLasso(groups, lam=0.5, saving=saving)._static_step()

    class Capped(GroupLasso):
        def limit_zeros(self, factor, sq, threshold):
            return factor

    assert not Capped(groups, lam=0.5)._static_step()


# --- normals ----------------------------------------------------------------------------------------


def test_unit_normals_do_not_overflow_in_fp16():
    x = torch.tensor([[300.0, -200.0, 250.0], [1e-3, 2e-3, 0.0], [0.0, 0.0, 0.0], [6e4, 1.0, -6e4]])
    x = x.view(4, 3, 1, 1)
    plain = F.normalize(x.half(), dim=1)
    assert not torch.isfinite(plain).all() or (plain[0].norm() - 1).abs() > 0.1  # the overflow this avoids
    got = unit_vectors(x.half(), dim=1).double()
    want = F.normalize(x.double(), dim=1)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=2e-3)
    assert torch.equal(got[2], torch.zeros_like(got[2]))  # no direction: stays zero, not NaN
    assert torch.allclose(unit_vectors(x), F.normalize(x, dim=1), atol=1e-7)  # FP32: unchanged


# --- torchrun with one process ----------------------------------------------------------------------


def test_torchrun_environment_is_recognised(monkeypatch):
    for key in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched_by_torchrun()
    assert distributed.init_distributed(torch.device("cpu")) == DistInfo()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert distributed.launched_by_torchrun()


def test_one_process_under_torchrun_joins_the_group(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
        monkeypatch.setenv(key, value)
    info = distributed.init_distributed(torch.device("cpu"))
    try:
        assert info.enabled and info.world_size == 1 and torch.distributed.get_backend() == "gloo"
        assert distributed.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
    finally:
        distributed.shutdown_distributed()


# --- the prepared GPU check -------------------------------------------------------------------------


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["env", "train-amp", "torchrun-nccl", "compaction", "proximal-cost", "ort-cuda"]
    assert all(s["status"] == "passed" for s in steps.values()), steps
    assert steps["torchrun-nccl"]["details"]["log_line"].endswith("backend gloo")
    assert steps["train-amp"]["details"]["epochs"] == 1
    assert (out / "report.md").read_text().count("| passed |") == 6


# --- on a GPU (skipped without one; `make gpu-check` runs them) -------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_setup(lam: float, scaler: torch.amp.GradScaler, dtype: torch.dtype):
    step, batch, ctx = _small_setup(lam=lam, scaler=scaler)
    step.cuda()
    ctx.optimizer = torch.optim.AdamW(step.parameters(), lr=1e-3)
    ctx.scheduler = torch.optim.lr_scheduler.LambdaLR(ctx.optimizer, lambda s: 1.0)
    ctx.regularizer = GroupLasso(build_groups(step.model), lam=lam)
    ctx.autocast = lambda: torch.autocast("cuda", dtype=dtype)
    return step, {k: v.cuda() for k, v in batch.items()}, ctx


@pytest.mark.gpu
@needs_cuda
def test_cuda_training_steps_do_not_synchronise():
    """bf16 steps with the proximal step: under CUDA's sync debug mode any host-device
    synchronisation in them raises."""
    step, batch, ctx = _cuda_setup(0.5, torch.amp.GradScaler("cuda", enabled=False), torch.bfloat16)
    for _ in range(WARMUP_CALLS + 1):  # lazy initialisation and the proximal step's graph capture synchronise
        _optimizer_step(step, batch, ctx)
    assert ctx.regularizer._captured.graph is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _optimizer_step(step, batch, ctx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in step.parameters())


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp16_skipped_step_leaves_the_weights_alone():
    """The fp16 path (T4/V100) with a real CUDA grad scaler: skips decided on the device; after the
    NaN batch the scaler may skip a few more steps while it backs off from fp16 overflows."""
    step, batch, ctx = _cuda_setup(5.0, torch.amp.GradScaler("cuda", init_scale=2.0**16), torch.float16)
    poisoned = dict(batch, image=torch.full_like(batch["image"], float("nan")))
    taken = _steps_follow_the_scaler(step, [poisoned] + [batch] * 12, ctx)
    assert taken[0] is False and any(taken[1:])


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_proximal_step_equals_the_eager_one():
    from training.data.synthetic_scenes import TASKS

    torch.manual_seed(0)
    model = create_model(encoder="tiny", tasks=TASKS).cuda()
    twin = copy.deepcopy(model)
    captured, eager = GroupLasso(build_groups(model), lam=3.0), GroupLasso(build_groups(twin), lam=3.0)
    schedule = [(1e-3, True), (2e-3, True), (3e-3, False), (1e-3, True), (5e-3, True), (2e-3, False), (4e-3, True)]
    for lr, stepped in schedule:
        flag = torch.tensor(stepped, device="cuda")
        captured.proximal_step(lr, flag)
        eager._proximal(lr, flag)  # the same update, launched op by op
    assert captured._captured.graph is not None, "the step was not captured"
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a == 0, b == 0), name
        assert torch.allclose(a, b, rtol=1e-6, atol=0), name
    zero = captured.zero_mask()
    assert 0 < sum(int(m.sum()) for m in zero.values()) < sum(m.numel() for m in zero.values())
