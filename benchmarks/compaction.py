"""Dense against compact: latency, MACs, parameters and peak memory of compacted multi-task models,
in PyTorch eager and ONNX Runtime (CPU), optionally CUDA fp16 with CUDA graphs.

    python -m benchmarks.compaction                           # both models, 30/50/70 %, batch 1 and 8
    python -m benchmarks.compaction --quick                   # tiny sizes: a smoke test
    python -m benchmarks.compaction --models demo --profile --json out.json
    python -m benchmarks.compaction --device cuda             # adds the CUDA fp16 section
    python -m benchmarks.compaction --device cuda --backends cuda-fp16 cuda-fp16-graph   # GPU only

Models: ``demo`` (``tiny`` encoder, light heads, 96x128) and ``resnet50d-os8`` (dilated
ResNet-50-D, ASPP heads, 288x384), each with the synthetic-scenes tasks (segmentation with 7
classes, depth, normals), untrained (weights do not change the cost of dense kernels).

Sparsity s: s % of ALL the encoder's channels (every traced channel space together) are chosen
uniformly at random (seed ``--seed``; a lower level's channels are a subset of a higher one's) and
their whole channel groups are zeroed as the proximal step leaves them: producer filters, biases,
BN gamma and beta, and every encoder consumer's input slice. Each space thus loses about s % of
its channels, with a random spread, so widths are rarely multiples of 8; ``round_to=8`` keeps a
few dead channels to fix that (compared with ``round_to=1`` at 50 %, when 50 is a level). Only
the encoder is sparse: the heads keep their widths, but their input convs read fewer channels.

Before timing, every compact model is checked against its sparse source in PyTorch (max relative
error per task < 1e-4) and `export_onnx` checks ONNX Runtime against PyTorch. Dense (the unpruned
model: zeros do not make dense kernels faster) is timed once per model, batch and backend.
MACs: `count_macs`, one multiply-add = 1 MAC, Conv2d and Linear only (per image). Peak memory:
see `benchmarks._timing` (CPU: peak RSS of a fresh process above its RSS after imports, load-time
copies excluded; CUDA: peak allocated bytes).

Target: in ONNX Runtime at batch 8, the 50 %-sparse compact model (round_to 8) reaches a speed-up
of at least 0.9 x its MAC ratio (whole model, heads included). When it does not (or with
``--profile``), ORT's profiler splits the time by op type for dense and compact.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import onnxruntime as ort
import torch
from safetensors.torch import save_file
from torch import nn

from benchmarks._timing import Job, configure_logging, cuda_measure, measure
from parsimony.io import atomic_write_json
from training.compaction import compact, load_compact
from training.data.synthetic_scenes import TASKS
from training.export import export_onnx
from training.models import count_parameters, create_model, macs_by_module, macs_by_prefix
from training.sparsity import build_groups

log = logging.getLogger("benchmarks.compaction")
MAX_REL_ERROR = 1e-4
TARGET = 0.9  # speed-up >= TARGET x MAC ratio
TARGET_KEY = (50, 8, 8, "ort")  # sparsity %, round_to, batch, backend
CPU_BACKENDS = ("eager", "ort")
CUDA_BACKENDS = ("cuda-fp16", "cuda-fp16-graph")
BACKEND_NAMES = {"eager": "PyTorch eager", "ort": "ONNX Runtime", "cuda-fp16": "CUDA fp16 eager",
                 "cuda-fp16-graph": "CUDA fp16 graph"}


@dataclass(frozen=True)
class Case:
    name: str
    encoder: str
    image_size: tuple[int, int]
    quick_size: tuple[int, int]


CASES = {
    "demo": Case("demo (tiny, light heads)", "tiny", (96, 128), (32, 48)),
    "resnet50d-os8": Case("dilated ResNet-50-D OS8, ASPP heads", "resnet50d-os8", (288, 384), (64, 96)),
}


@dataclass
class Variant:
    """The dense model (sparsity None) or one compacted model, saved and exported."""

    sparsity: int | None
    round_to: int | None
    directory: str
    onnx: str
    params: int
    macs: dict[str, int]  # per image: "total", "encoder", "heads"
    channels: tuple[int, int] = (0, 0)  # encoder channels kept, of

    @property
    def label(self) -> str:
        return "dense" if self.sparsity is None else f"{self.sparsity}% r{self.round_to}"


# --- preparing the models ---------------------------------------------------------------------


def sparsify(model: nn.Module, percent: int, seed: int) -> nn.Module:
    """A copy of ``model`` with ``percent`` % of all encoder channels zeroed, whole groups (module doc)."""
    sparse = copy.deepcopy(model)
    groups = build_groups(sparse, "channel")
    widths = {name: space.width for name, space in groups.spaces.items()}
    total = sum(widths.values())
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: round(percent * total / 100)]
    start = 0
    with torch.no_grad():
        for name, width in widths.items():
            picked = chosen[(chosen >= start) & (chosen < start + width)] - start
            start += width
            for s in groups.slices(name):
                sparse.get_parameter(s.name).index_fill_(s.dim, picked, 0.0)
    return sparse


def check_exact(sparse: nn.Module, small: nn.Module, image_size: tuple[int, int]) -> float:
    """Largest per-task ``max|compact - sparse| / max|sparse|``; raises above `MAX_REL_ERROR`."""
    x = torch.rand(1, 3, *image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = sparse.eval()(x), small.eval()(x)
    errors = {t: ((got[t] - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for t, w in want.items()}
    if not max(errors.values()) < MAX_REL_ERROR:
        raise RuntimeError(f"compact model disagrees with its sparse source: {errors}; refusing to time it")
    return max(errors.values())


def save_variant(model: nn.Module, directory: Path, image_size: tuple[int, int], **fields) -> Variant:
    """``config.json`` + ``model.safetensors`` (the layout `load_compact` reads) and ``model.onnx``, the
    raw graph (float32 images in, head outputs out): the network's own cost, dense against compact."""
    directory.mkdir(parents=True)
    atomic_write_json(directory / "config.json", model.config.to_dict())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    onnx = export_onnx(model, directory / "model.onnx", image_size=image_size, check_batch_sizes=(1,),
                       raw_outputs=True).path
    macs = macs_by_prefix(macs_by_module(model, image_size), depth=1)
    return Variant(directory=str(directory), onnx=str(onnx), params=count_parameters(model),
                   macs={"total": sum(macs.values()), **macs}, **fields)


def prepare(case: Case, size: tuple[int, int], levels: list[tuple[int, int]], seed: int, tmp: Path) -> list[Variant]:
    torch.manual_seed(0)
    dense = create_model(encoder=case.encoder, tasks=TASKS).eval()
    variants = [save_variant(dense, tmp / "dense", size, sparsity=None, round_to=None)]
    for percent, round_to in levels:
        sparse = sparsify(dense, percent, seed)
        small, plan = compact(sparse, round_to=round_to)
        error = check_exact(sparse, small, size)
        kept = (sum(s.width for s in plan.spaces), sum(s.original_width for s in plan.spaces))
        variant = save_variant(small, tmp / f"s{percent}-r{round_to}", size, sparsity=percent,
                               round_to=round_to, channels=kept)
        log.info("%s: %d of %d encoder channels kept, max rel error vs sparse %.1e", variant.label, *kept, error)
        variants.append(variant)
    return variants


# --- measuring --------------------------------------------------------------------------------


def measure_variant(v: Variant, backend: str, batch: int, size: tuple[int, int], args) -> dict:
    timing = dict(warmup=args.warmup, repeats=args.repeats, min_time=args.min_time)
    if backend in CUDA_BACKENDS:
        return cuda_measure(load_compact(v.directory), size, batch, graph=backend.endswith("graph"), **timing)
    path = v.directory if backend == "eager" else v.onnx
    return measure(Job(backend, path, size, batch, args.threads, **timing))


def measure_all(variants: list[Variant], backends: tuple[str, ...], size, args) -> dict[tuple, dict]:
    jobs = [(v, b, n) for b in args.batches for n in backends for v in variants]
    results = {}
    for i, (v, batch, backend) in enumerate(jobs, 1):
        results[(v.label, batch, backend)] = r = measure_variant(v, backend, batch, size, args)
        log.info("[%d/%d] %s batch %d %s: %.1f ms, peak %.0f MB", i, len(jobs), v.label, batch, backend,
                 r["ms"], r["peak_mb"])
    return results


def build_rows(variants: list[Variant], results: dict, backends: tuple[str, ...], batches: list[int]) -> list[dict]:
    dense, rows = variants[0], []
    for v in variants[1:]:
        for batch in batches:
            for backend in backends:
                d, c = results[(dense.label, batch, backend)], results[(v.label, batch, backend)]
                speedup, mac_ratio = d["ms"] / c["ms"], dense.macs["total"] / v.macs["total"]
                rows.append({"sparsity": v.sparsity, "round_to": v.round_to, "batch": batch, "backend": backend,
                             "dense_ms": d["ms"], "compact_ms": c["ms"], "speedup": speedup,
                             "mac_ratio": mac_ratio, "efficiency": speedup / mac_ratio,
                             "params": [dense.params, v.params], "peak_mb": [d["peak_mb"], c["peak_mb"]]})
    return rows


def profile(variants: list[Variant], size, batch: int, args) -> dict[str, dict[str, float]]:
    """ORT ms per run by op category for each variant (`benchmarks._timing.ort_profile`)."""
    return {v.label: measure(Job("ort", v.onnx, size, batch, args.threads, warmup=args.warmup,
                                 profile_runs=max(3, args.repeats)))["profile_ms"] for v in variants}


# --- output -----------------------------------------------------------------------------------


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def table(rows: list[dict]) -> str:
    lines = ["| sparsity | round_to | batch | backend | dense ms | compact ms | speed-up | MAC ratio | "
             "speed-up/MAC ratio | params dense→compact | peak memory dense→compact (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['sparsity']}% | {r['round_to']} | {r['batch']} | {BACKEND_NAMES[r['backend']]} | "
            f"{r['dense_ms']:.1f} | {r['compact_ms']:.1f} | {r['speedup']:.2f}× | {r['mac_ratio']:.2f}× | "
            f"{r['efficiency']:.2f} | {_m(r['params'][0])}→{_m(r['params'][1])} | "
            f"{r['peak_mb'][0]:.0f}→{r['peak_mb'][1]:.0f} |")
    return "\n".join(lines)


def macs_lines(variants: list[Variant]) -> str:
    out = []
    for v in variants:
        kept = f", encoder channels {v.channels[0]}/{v.channels[1]}" if v.sparsity is not None else ""
        out.append(f"- {v.label}: {v.macs['total'] / 1e9:.2f} GMACs/image (encoder {v.macs['encoder'] / 1e9:.2f}, "
                   f"heads {v.macs['heads'] / 1e9:.2f}), {_m(v.params)} params{kept}")
    return "\n".join(out)


def target_check(rows: list[dict]) -> dict:
    for r in rows:
        if (r["sparsity"], r["round_to"], r["batch"], r["backend"]) == TARGET_KEY:
            return {"measured": True, "met": r["efficiency"] >= TARGET, "speedup": r["speedup"],
                    "mac_ratio": r["mac_ratio"], "efficiency": r["efficiency"]}
    return {"measured": False, "met": False}


def target_line(name: str, t: dict, quick: bool) -> str:
    head = f"**{name}** — target (ONNX Runtime, batch 8, 50% sparse, round_to 8: speed-up ≥ {TARGET} × MAC ratio)"
    if not t["measured"]:
        return f"{head}: not measured (needs 50 in --sparsity and 8 in --batches)."
    verdict = "MET" if t["met"] else "NOT MET"
    note = " (quick sizes: a smoke test, not the acceptance measurement)" if quick else ""
    return (f"{head}: speed-up {t['speedup']:.2f}× vs MAC ratio {t['mac_ratio']:.2f}× = "
            f"{t['efficiency']:.2f} of it → {verdict}{note}.")


def profile_table(prof: dict[str, dict[str, float]], batch: int) -> str:
    cats = ["Conv (encoder)", "Conv (heads)", "Resize", "other"]
    labels = list(prof)
    lines = [f"ONNX Runtime time by op type, batch {batch} (ms per run, share; from SessionOptions.enable_profiling, "
             "node kernel times; the heads are not compacted but their input convs read fewer channels):", "",
             "| op type | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for cat in [*cats, "total"]:
        cells = []
        for label in labels:
            total = sum(prof[label].values())
            ms = total if cat == "total" else prof[label].get(cat, 0.0)
            cells.append(f"{ms:.1f} ({100 * ms / total:.0f}%)" if total else "-")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- entry point ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--sparsity", nargs="+", type=int, default=None,
                   help="percent of encoder channels removed (default 30 50 70; --quick: 50)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration, at least (default 5; --quick 2)")
    p.add_argument("--min-time", type=float, default=None, help="timed seconds per configuration, at least (default 1; --quick 0)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="intra-op threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the zeroed channels")
    p.add_argument("--quick", action="store_true", help="tiny image sizes and few runs: a smoke test")
    p.add_argument("--profile", action="store_true", help="ORT op-type profile of every variant (else only when the target is missed)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: add the CUDA fp16 / CUDA graph section")
    p.add_argument("--backends", nargs="+", choices=[*CPU_BACKENDS, *CUDA_BACKENDS], default=None,
                   help="time only these (default: eager and ort, plus the CUDA ones with --device cuda)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    quick = args.quick
    args.sparsity = args.sparsity or ([50] if quick else [30, 50, 70])
    args.repeats = args.repeats if args.repeats is not None else (2 if quick else 5)
    args.min_time = args.min_time if args.min_time is not None else (0.0 if quick else 1.0)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    if not all(0 <= s < 100 for s in args.sparsity) or min(args.batches) < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--sparsity must lie in [0, 100); --batches, --repeats and --threads must be positive")
    return args


def backends_for(device: str, chosen: list[str] | None = None) -> tuple[str, ...]:
    wanted = tuple(chosen) if chosen else CPU_BACKENDS + (CUDA_BACKENDS if device == "cuda" else ())
    if any(b in CUDA_BACKENDS for b in wanted) and not torch.cuda.is_available():
        print("CUDA section skipped: torch.cuda.is_available() is False.\n")
        wanted = tuple(b for b in wanted if b not in CUDA_BACKENDS)
    if not wanted:
        raise SystemExit("error: no backend left to time (the CUDA ones need a GPU)")
    return wanted


def run_model(key: str, args, backends: tuple[str, ...]) -> dict:
    case = CASES[key]
    size = case.quick_size if args.quick else case.image_size
    levels = [(s, 8) for s in sorted(set(args.sparsity))] + ([(50, 1)] if 50 in args.sparsity else [])
    with tempfile.TemporaryDirectory(prefix="compaction-bench-") as tmp:
        variants = prepare(case, size, levels, args.seed, Path(tmp))
        results = measure_all(variants, backends, size, args)
        rows = build_rows(variants, results, backends, args.batches)
        target = target_check(rows)
        prof, prof_batch = {}, 8 if 8 in args.batches else max(args.batches)
        if args.profile or (target["measured"] and not target["met"]):
            chosen = variants if args.profile else [v for v in variants if v.label in ("dense", "50% r8")]
            prof = profile(chosen, size, prof_batch, args)
    return {"case": case.name, "image_size": list(size), "variants": [asdict(v) for v in variants], "rows": rows,
            "target": target, "profile": prof, "profile_batch": prof_batch}


def report(result: dict, args) -> str:
    h, w = result["image_size"]
    variants = [Variant(**{**v, "channels": tuple(v["channels"])}) for v in result["variants"]]
    cpu = [r for r in result["rows"] if r["backend"] in CPU_BACKENDS]
    cuda = [r for r in result["rows"] if r["backend"] in CUDA_BACKENDS]
    parts = [f"## {result['case']}, {h}x{w}", "", macs_lines(variants), "", table(cpu)]
    if cuda:
        parts += ["", f"CUDA section ({torch.cuda.get_device_name()}, fp16 weights and inputs):", "", table(cuda)]
    parts += ["", target_line(result["case"], result["target"], args.quick)]
    if result["profile"]:
        parts += ["", profile_table(result["profile"], result["profile_batch"])]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "onnxruntime": ort.__version__, "threads": args.threads,
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    print(f"torch {env['torch']}, onnxruntime {env['onnxruntime']} (CPUExecutionProvider), {env['threads']} "
          f"intra-op threads, {env['cores']} cores, {env['cpu']}; median of ≥{args.repeats} runs (≥{args.min_time:g} s) "
          f"after {args.warmup} warm-up; MACs: 1 multiply-add = 1 MAC; peak memory: see benchmarks._timing\n")
    backends = backends_for(args.device, args.backends)
    results = {}
    for key in args.models:
        results[key] = run_model(key, args, backends)
        print(report(results[key], args), flush=True)
    if args.json:
        atomic_write_json(Path(args.json), {"env": env, "args": vars(args), "models": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
