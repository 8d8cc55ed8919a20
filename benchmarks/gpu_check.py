"""Every GPU measurement of the project in one call, for a GPU host lent for a few minutes.

    python -m benchmarks.gpu_check --out gpu-report            # on a machine with a CUDA GPU
    python -m benchmarks.gpu_check --dry-run --out /tmp/dry    # the same steps on the CPU, tiny sizes
    make gpu-check                                             # the first line, into runs/gpu-check

Steps, each a fresh process with its own time limit (the whole check stays within ``--budget-s``,
8 minutes by default), each recorded whether it passes or fails:

1. ``env``: GPU, driver, torch/CUDA versions, native bf16, the AMP dtype training picks, ONNX
   Runtime's providers, and which Python packages the steps need are missing.
2. ``train-amp``: one epoch of ``configs/demo.yaml`` on CUDA with AMP, then compaction and export
   (``python -m training.run``); the exported model.onnx and manifest.json must exist.
3. ``torchrun-nccl``: the same under ``torchrun --nproc_per_node=1``: DDP over the nccl backend.
4. ``compaction``: ``benchmarks.compaction`` for the dilated ResNet-50 at 50 % sparsity, CUDA fp16
   eager and CUDA graphs, batch 32 and 1.
5. ``proximal-cost``: ``benchmarks.proximal_cost --device cuda --batch 16`` (the proximal step against
   a training step at the paper's batch size).
6. ``ort-cuda``: the exported compact model in ONNX Runtime's CUDA provider against its CPU
   provider, when the installed onnxruntime has that provider (skipped otherwise, saying so).
7. ``pytest-gpu``: the test suite's ``gpu``-marked tests.

The report is ``report.json`` and ``report.md`` in ``--out``; every step's output is kept next to
them as ``<step>.log``. The exit status is 0 when every step that ran passed.

What a bare GPU host needs: Python 3.10+ with torch, numpy, onnx, onnxruntime, pyyaml, safetensors,
matplotlib, tqdm and pillow (a CUDA deep-learning image has them), plus pydantic, which such images
often lack: bring its wheels (``pip download --no-deps --only-binary=:all: --python-version 3.12
--platform manylinux2014_x86_64 -d wheels pydantic pydantic-core annotated-types typing-inspection``
on a machine with the index) and install them there with ``pip install --no-index --no-deps
--target /tmp/site wheels/*.whl`` and ``PYTHONPATH=/tmp/site``. The check imports nothing else of
the project's dependencies (no gRPC, FastAPI, tritonclient); the ``env`` step lists what is missing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # commands run from the repository root
NEEDED = ("torch", "numpy", "onnx", "onnxruntime", "yaml", "pydantic", "safetensors", "matplotlib", "tqdm", "PIL")
DEMO_CONFIG = "configs/demo.yaml"
# --dry-run: the same commands at sizes that take seconds on two CPU cores
_DRY_TRAIN = ["--image-size", "32", "48", "--train-samples", "16", "--val-samples", "8",
              "--batch-size", "8"]


@dataclass
class Step:
    name: str
    argv: list[str] | None  # a command run with this interpreter; None: `call` runs in-process
    timeout_s: float
    call: Callable[[Path], dict] | None = None
    check: Callable[[Path], dict] | None = None  # reads what the command left; raises when it is wrong


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | skipped | timeout
    seconds: float
    details: dict = field(default_factory=dict)
    error: str = ""


# --- the steps ---------------------------------------------------------------------------------


def environment(_: Path) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpu_cores": os.cpu_count(),
            "missing_packages": [m for m in NEEDED if importlib.util.find_spec(m) is None]}
    if torch.cuda.is_available():
        from training.trainer import amp_dtype

        device = torch.device("cuda", 0)
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    amp_dtype=str(amp_dtype(device)).removeprefix("torch."))
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        info["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        info.update(onnxruntime=ort.__version__, ort_providers=ort.get_available_providers())
    return info


def exported(run_dir: Path) -> Callable[[Path], dict]:
    def check(log: Path) -> dict:
        text = log.read_text(errors="replace")
        if "could not be captured" in text:  # the proximal step fell back to eager launches
            raise RuntimeError(next(line for line in text.splitlines() if "could not be captured" in line))
        missing = [f for f in ("model.onnx", "manifest.json", "metrics.json") if not (run_dir / f).is_file()]
        if missing:
            raise RuntimeError(f"{run_dir} lacks {', '.join(missing)} after the run")
        history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        rates = [float(m) for m in re.findall(r"([0-9.]+) img/s", text)]
        return {"epochs": len(history), "img_per_s": rates[-1] if rates else None, "val_loss": history[-1]["val_loss"],
                "train_loss": history[-1]["train"]["loss"], "compact_macs": manifest["complexity"]["macs"]}
    return check


def logged(pattern: str) -> Callable[[Path], dict]:
    """A check that the step's log contains ``pattern`` (e.g. the DDP backend it used)."""
    def check(log: Path) -> dict:
        lines = [line for line in log.read_text(errors="replace").splitlines() if pattern in line]
        if not lines:
            raise RuntimeError(f"the log does not say {pattern!r}")
        return {"log_line": lines[-1].strip()}
    return check


def both(*checks: Callable[[Path], dict]) -> Callable[[Path], dict]:
    def check(log: Path) -> dict:
        return {k: v for c in checks for k, v in c(log).items()}
    return check


def json_file(path: Path) -> Callable[[Path], dict]:
    def check(_: Path) -> dict:
        return json.loads(path.read_text())
    return check


def ort_providers(onnx_path: Path, dry_run: bool) -> Callable[[Path], dict]:
    """Median latency of the model in ORT's CUDA provider against its CPU provider, batch 1 and 8."""
    def call(_: Path) -> dict:
        import numpy as np
        import onnxruntime as ort

        from parsimony import onnxrt

        available = ort.get_available_providers()
        gpu = "CPUExecutionProvider" if dry_run else "CUDAExecutionProvider"
        if gpu not in available:
            return {"skipped": f"onnxruntime {ort.__version__} here has only {available}; "
                               "install onnxruntime-gpu to time the CUDA provider"}
        out = {"onnxruntime": ort.__version__}
        for provider in dict.fromkeys([gpu, "CPUExecutionProvider"]):
            session = onnxrt.session(onnx_path, providers=[provider])  # the gateway's options, this provider
            inp = session.get_inputs()[0]
            for batch in (1, 8):
                shape, rng = (batch, *inp.shape[1:]), np.random.default_rng(0)
                x = (rng.integers(0, 256, shape, dtype=np.uint8) if inp.type == "tensor(uint8)"  # a final graph
                     else rng.random(shape, dtype=np.float32))
                feed = {inp.name: x}
                out[f"{provider}_b{batch}_ms"] = _median_ms(lambda s=session, f=feed: s.run(None, f))
            out[f"{provider}_active"] = session.get_providers()[0]
        return out
    return call


def _median_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def plan(out: Path, dry_run: bool) -> list[Step]:
    py = [sys.executable]
    device = "cpu" if dry_run else "cuda"
    train = ["-m", "training.run", "--config", DEMO_CONFIG, "--device", device, "--amp", "--epochs", "1",
             "--set", "sparsity.cooldown_epochs=0", *(_DRY_TRAIN if dry_run else [])]
    amp_run, ddp_run = out / "run-amp", out / "run-ddp"
    torchrun = [*py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    compaction = ["--models", "demo", "--quick", "--backends", "ort"] if dry_run else [
        "--models", "resnet50d-os8", "--sparsity", "50", "--batches", "32", "1",
        "--backends", "cuda-fp16", "cuda-fp16-graph", "--device", "cuda"]
    # the paper's batch (16) on the GPU: a batch-2 step is too short to compare the proximal step with
    proximal = ["--models", "demo", "--groups", "channel", "--steps", "1"] if dry_run else ["--steps", "10",
                                                                                            "--batch", "16"]
    steps = [
        Step("env", None, 60, call=environment),
        Step("train-amp", [*py, *train, "--out", str(amp_run)], 240, check=exported(amp_run)),
        Step("torchrun-nccl", [*torchrun, *train, "--out", str(ddp_run)], 180,
             check=both(logged(f"backend {'gloo' if dry_run else 'nccl'}"), exported(ddp_run))),
        Step("compaction", [*py, "-m", "benchmarks.compaction", *compaction, "--json", str(out / "compaction.json")],
             300, check=json_file(out / "compaction.json")),
        Step("proximal-cost", [*py, "-m", "benchmarks.proximal_cost", *proximal, "--device", device,
                               "--json", str(out / "proximal.json")], 180, check=json_file(out / "proximal.json")),
        Step("ort-cuda", None, 120, call=ort_providers(amp_run / "model.onnx", dry_run)),
    ]
    if not dry_run:
        steps.append(Step("pytest-gpu", [*py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                         *_gpu_test_files()], 180))
    return steps


def _gpu_test_files() -> list[str]:
    """Test files with a ``gpu`` mark, named one by one: collecting the whole suite would import the
    serving stack, which a bare GPU host does not have."""
    return sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


# --- running -----------------------------------------------------------------------------------


def run_step(step: Step, out: Path, deadline: float) -> Outcome:
    left = deadline - time.monotonic()
    if left < 5:
        return Outcome(step.name, "skipped", 0.0, error="the check's time budget is spent")
    log = out / f"{step.name}.log"
    started = time.monotonic()
    try:
        if step.argv is not None:
            with log.open("w") as fh:
                proc = subprocess.run(step.argv, stdout=fh, stderr=subprocess.STDOUT, timeout=min(step.timeout_s, left),
                                      cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if proc.returncode != 0:
                return Outcome(step.name, "failed", time.monotonic() - started,
                               error=f"exit {proc.returncode}: {_tail(log)}")
        details = step.call(out) if step.call is not None else {}
        if step.check is not None:
            details.update(step.check(log))
    except subprocess.TimeoutExpired:
        return Outcome(step.name, "timeout", time.monotonic() - started, error=_tail(log))
    except Exception as exc:  # noqa: BLE001 - one step's failure is reported, the others still run
        return Outcome(step.name, "failed", time.monotonic() - started, error=f"{type(exc).__name__}: {exc}")
    status = "skipped" if "skipped" in details else "passed"
    return Outcome(step.name, status, time.monotonic() - started, details)


def _tail(log: Path, lines: int = 15) -> str:
    """The last lines of a log that say something (not rules of '=' or '-')."""
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join([line for line in text if any(c.isalnum() for c in line)][-lines:])


def markdown(report: dict) -> str:
    env = next((o["details"] for o in report["steps"] if o["name"] == "env"), {})
    head = [f"# GPU check, {report['date']}", "",
            f"{env.get('gpu', 'no GPU')} (compute capability {env.get('capability', '-')}), "
            f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), AMP dtype {env.get('amp_dtype', '-')}; "
            f"{'dry run on the CPU' if report['dry_run'] else 'on the GPU'}; "
            f"{report['seconds']:.0f} s in all.", "",
            "| step | status | seconds | result |", "|---|---|---|---|"]
    rows = [f"| {o['name']} | {o['status']} | {o['seconds']:.1f} | {_summary(o)} |" for o in report["steps"]]
    return "\n".join(head + rows) + "\n"


def _summary(outcome: dict) -> str:
    if outcome["error"]:
        return outcome["error"].splitlines()[-1][:200].replace("|", "\\|")
    d = outcome["details"]
    if outcome["name"] == "compaction":
        rows = [r for m in d.get("models", {}).values() for r in m["rows"]]
        return "; ".join(f"{r['backend']} b{r['batch']}: {r['dense_ms']:.2f}→{r['compact_ms']:.2f} ms "
                         f"(×{r['speedup']:.2f}, MACs ×{r['mac_ratio']:.2f})" for r in rows)
    if outcome["name"] == "proximal-cost":
        return "; ".join(f"{r['case']} {r['groups']}: {1e3 * r['proximal_s']:.2f} ms (op by op "
                         f"{1e3 * r['proximal_eager_s']:.2f}), {r['ratio_pct']:.2f}% of an fp32 step"
                         + (f", {r['ratio_amp_pct']:.2f}% of a bf16 step" if "ratio_amp_pct" in r else "")
                         for r in d.get("rows", []))
    text = json.dumps({k: v for k, v in d.items() if k != "models"}, default=str)
    return (text[:300] + "…" if len(text) > 300 else text).replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="report folder (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes (for the test suite)")
    p.add_argument("--budget-s", type=float, default=480.0, help="time for the whole check (default: %(default)s)")
    p.add_argument("--only", nargs="+", help="run only these steps (names as in the module doc)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps = [s for s in plan(out, args.dry_run) if not args.only or s.name in args.only]
    started, deadline = time.monotonic(), time.monotonic() + args.budget_s
    outcomes = []
    for step in steps:
        outcomes.append(o := run_step(step, out, deadline))
        print(f"[gpu-check] {o.name}: {o.status} in {o.seconds:.1f} s {o.error.splitlines()[-1] if o.error else ''}",
              flush=True)
    report = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "seconds": time.monotonic() - started, "steps": [asdict(o) for o in outcomes]}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(o.status in ("passed", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
