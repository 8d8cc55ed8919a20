"""Training throughput (images/s) of the CPU demo model and the paper's dilated ResNet-50 multi-task
model, through the same model, loss and optimizer code `training.run` uses.

    python -m benchmarks.train_throughput                      # both models, CPU
    python -m benchmarks.train_throughput --models demo --steps 20 --json out.json

One training step = forward of all task heads, the multi-task loss, backward and an AdamW step, on
a fixed batch of synthetic-scenes samples (data loading is excluded: it is measured separately).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from training.data import DatasetSpec, build_dataset
from training.engine import TrainStep
from training.losses import MultiTaskLoss
from training.models import create_model
from training.models.complexity import count_macs, count_parameters


@dataclass(frozen=True)
class Case:
    name: str
    encoder: str
    image_size: tuple[int, int]
    batch: int


CASES = {
    "demo": Case("demo (tiny, light heads)", "tiny", (96, 128), 16),
    "resnet50d-os8": Case("dilated ResNet-50-D OS8, ASPP heads", "resnet50d-os8", (288, 384), 2),
}


def fixed_batch(case: Case) -> tuple[dict, tuple]:
    ds, info = build_dataset("synthetic-scenes", "train",
                             DatasetSpec(image_size=case.image_size, num_samples=case.batch))
    samples = [ds[i] for i in range(case.batch)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}, info.tasks


def measure(case: Case, steps: int, warmup: int) -> dict:
    batch, tasks = fixed_batch(case)
    torch.manual_seed(0)
    model = create_model(encoder=case.encoder, tasks=tasks)
    step = TrainStep(model, MultiTaskLoss(tasks)).train()
    opt = torch.optim.AdamW(step.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total, _ = step(batch)
        total.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"case": case.name, "encoder": case.encoder, "image_size": list(case.image_size), "batch": case.batch,
            "steps": steps, "median_step_s": median, "images_per_s": case.batch / median,
            "parameters": count_parameters(model), "macs_per_image": count_macs(model, case.image_size)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(CASES[m], args.steps, args.warmup) for m in args.models]
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    print(f"torch {env['torch']}, {env['threads']} threads, {env['cpu']}")
    print("| model | input | batch | params (M) | GMACs/img | median step (s) | images/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        h, w = r["image_size"]
        print(f"| {r['case']} | {h}x{w} | {r['batch']} | {r['parameters'] / 1e6:.2f} | "
              f"{r['macs_per_image'] / 1e9:.2f} | {r['median_step_s']:.3f} | {r['images_per_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
