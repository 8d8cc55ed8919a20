"""Cost of the group-lasso proximal step relative to one training step.

    python -m benchmarks.proximal_cost                       # resnet50d-os8 at 288x384 and the demo model
    python -m benchmarks.proximal_cost --device cuda --batch 16   # on a GPU (synchronised timings)

On a GPU the training loop replays the proximal step as a CUDA graph (`training.sparsity.captured`);
both that and the op-by-op launch are timed, and the training step in fp32 and in bf16 autocast.

Target: the proximal step costs at most 5% of a training step of
the dilated ResNet-50 multi-task model. Both are timed on the same model, side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from benchmarks.train_throughput import CASES, fixed_batch
from parsimony.io import atomic_write_json
from training.engine import TrainStep
from training.losses import MultiTaskLoss
from training.models import create_model
from training.sparsity import GroupLasso, build_groups


def _timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def measure(case_name: str, mode: str, device: torch.device, steps: int, batch_size: int | None = None) -> dict:
    case = CASES[case_name] if batch_size is None else dataclasses.replace(CASES[case_name], batch=batch_size)
    batch, tasks = fixed_batch(case)
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(0)
    model = create_model(encoder=case.encoder, tasks=tasks).to(device)
    step = TrainStep(model, MultiTaskLoss(tasks)).train()
    opt = torch.optim.AdamW(step.parameters(), lr=1e-4)
    reg = GroupLasso(build_groups(model, mode), lam=1e-4)

    def train_step(amp: bool = False) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            total, _ = step(batch)
        total.backward()
        opt.step()

    train_step()  # warm-up (allocations, lazy init)
    reg.proximal_step(1e-4)
    train = statistics.median(_timed(train_step, device, steps))
    # as the training loop runs it (a CUDA graph replay on a GPU), and launched op by op
    prox = statistics.median(_timed(lambda: reg.proximal_step(1e-4), device, max(steps, 20)))
    eager = statistics.median(_timed(lambda: reg._proximal(1e-4, None), device, max(steps, 20)))
    row = {"case": case.name, "groups": mode, "batch": case.batch, "train_step_s": train, "proximal_s": prox,
           "proximal_eager_s": eager, "ratio_pct": 100 * prox / train, "n_groups": reg.groupset.num_groups}
    if device.type == "cuda":  # training runs bf16 autocast there: a shorter step to compare with
        train_step(amp=True)
        row["train_step_amp_s"] = statistics.median(_timed(lambda: train_step(amp=True), device, steps))
        row["ratio_amp_pct"] = 100 * prox / row["train_step_amp_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(CASES), default=["resnet50d-os8", "demo"])
    p.add_argument("--groups", nargs="+", choices=["channel", "paper"], default=["channel", "paper"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, help="training batch size (default: each model's own; the paper used 16)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads")
    print("| model | groups | groups (n) | batch | training step (ms) | proximal step (ms) | op by op (ms) | "
          "proximal / step | bf16 step (ms) | proximal / bf16 step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        for mode in args.groups:
            rows.append(r := measure(name, mode, device, args.steps, args.batch))
            amp = (f"{1e3 * r['train_step_amp_s']:.1f} | {r['ratio_amp_pct']:.2f}%" if "train_step_amp_s" in r
                   else "- | -")
            print(f"| {r['case']} | {r['groups']} | {r['n_groups']} | {r['batch']} | {1e3 * r['train_step_s']:.1f} | "
                  f"{1e3 * r['proximal_s']:.2f} | {1e3 * r['proximal_eager_s']:.2f} | {r['ratio_pct']:.2f}% | {amp} |")
    if args.json:
        atomic_write_json(Path(args.json), {"torch": torch.__version__, "device": str(device), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
