"""`python -m training.sweep`: train dense and group-lasso models over a λ grid and compare them.

    python -m training.sweep --config configs/sweep-scenes.yaml --out runs/sweep-scenes
    python -m training.sweep --config configs/sweep-scenes.yaml --out runs/sweep-scenes \\
        --lambdas 1e-3 1e-2 1e-1 --seeds 0 1 2 --tasks segmentation,depth
    python -m training.sweep --config base.yaml --dataset nyuv2 --data-root data/nyuv2 --out runs/sweep-nyu
    python -m training.sweep --config configs/sweep-scenes.yaml --out runs/targets \
        --targets zero_groups=0.6 macs=3 macs=3:size --seeds 0 1 2

--targets replaces the λ grid by sparsity targets, one run each (`training.run --target`); a
``:WEIGHT`` suffix picks the group weight (size, macs or latency) instead of the target's own.
The report then also lists, per target, what was requested against what each seed achieved.

Per seed it trains (each with `training.run`, in this process, into SWEEP_DIR/runs/<name>):
the dense single-task model of every task (the ΔMTL baselines), the dense multi-task model and
the multi-task model at every λ of the grid; with --single-task-grid also every single-task model
at every λ. A run whose directory holds metrics.json is complete and skipped; one with a
checkpoint but no metrics.json is resumed; a run directory made with a different configuration
is refused. Run it again to continue an interrupted sweep or to rebuild the report.

SWEEP_DIR receives sweep-config.yaml (the resolved base configuration), results.csv (one row per
complete run), results.md (mean ± std over seeds per setting) and the plots (see
`training.sweep_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from parsimony.io import atomic_write_text
from parsimony.layout import CONFIG_FILE, METRICS_FILE
from training import run as run_command
from training.checkpoint import LAST
from training.config import ConfigError, RunConfig, apply_set_items, load_yaml, resolve_config, set_dotted
from training.data import DataError, DatasetSpec, build_dataset
from training.sweep_collect import RUN_LOG, collect
from training.sweep_report import format_lambda, write_report

log = logging.getLogger("training.sweep")

#: With Adam(W) an update moves a group by at most about lr·sqrt(|g|) per step, the same scale as the
#: proximal threshold lr·λ·sqrt(|g|): λ ≳ 1 zeroes every group whatever the learning rate, and on
#: configs/sweep-scenes.yaml zeros appear near 0.1 (8 %) and everything is zero by 0.3.
DEFAULT_LAMBDAS = (1e-2, 1e-1, 1.5e-1, 2e-1, 3e-1)
#: Config keys allowed to differ between a run directory and the sweep (they do not change results).
IGNORED_KEYS = {"out", "device", "dataset.num_workers"}


class SweepError(ValueError):
    """Invalid sweep input or an inconsistent sweep directory; the message says how to fix it."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep."""

    kind: str  # "single" or "multi"
    tasks: tuple[str, ...]
    lam: float
    seed: int
    target: str = ""  # "KIND=VALUE[:WEIGHT]" instead of λ

    @property
    def name(self) -> str:
        what = self.tasks[0] if self.kind == "single" else "mtl"
        how = f"target-{self.target.replace('=', '').replace(':', '-')}" if self.target else \
            f"lam{format_lambda(self.lam)}"
        return f"{self.kind}-{what}-{how}-seed{self.seed}"

    def sparsity(self) -> dict:
        """The sparsity keys this run sets."""
        target, _, weight = self.target.partition(":")
        return {"lam": self.lam, "target": target or None, "group_weight": weight or None}

    def overrides(self, run_dir: Path) -> dict:
        return {"tasks": list(self.tasks), "seed": self.seed, "sparsity": self.sparsity(), "out": str(run_dir)}


@dataclass(frozen=True)
class Sweep:
    """The resolved sweep: base configuration tree and the grid."""

    out: Path
    base: dict  # config tree: file values, then the sweep's flags
    tasks: tuple[str, ...]
    lambdas: tuple[float, ...]  # positive, ascending
    seeds: tuple[int, ...]
    single_task_grid: bool
    targets: tuple[str, ...] = ()  # "KIND=VALUE[:WEIGHT]", in the order given
    baselines: bool = True  # the dense single-task runs (ΔMTL vs ST)

    @property
    def runs_dir(self) -> Path:
        return self.out / "runs"

    def run_dir(self, spec: RunSpec) -> Path:
        return self.runs_dir / spec.name

    def runs(self) -> list[RunSpec]:
        """Per seed: dense single-task baselines, dense multi-task, the multi-task grid, then the
        single-task grid, so an interrupted sweep holds complete seeds first."""
        specs = []
        for seed in self.seeds:
            if self.baselines:
                specs += [RunSpec("single", (t,), 0.0, seed) for t in self.tasks]
            specs += [RunSpec("multi", self.tasks, lam, seed) for lam in (0.0, *self.lambdas)]
            specs += [RunSpec("multi", self.tasks, 0.0, seed, target) for target in self.targets]
            if self.single_task_grid:
                specs += [RunSpec("single", (t,), lam, seed) for t in self.tasks for lam in self.lambdas]
        return specs

    def run_config(self, spec: RunSpec) -> RunConfig:
        """The configuration `training.run` resolves for ``spec`` (and writes to its config.yaml)."""
        return resolve_config(self.base, spec.overrides(self.run_dir(spec)))


# --- command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="base YAML configuration of every run (as for training.run)")
    p.add_argument("--out", required=True, metavar="SWEEP_DIR", help="sweep directory (runs, results, plots)")
    p.add_argument("--lambdas", type=float, nargs="+", metavar="λ",
                   help=f"group-lasso strengths of the grid; 0 (dense) is always added "
                        f"(default {' '.join(map(format_lambda, DEFAULT_LAMBDAS))} unless --targets is given)")
    p.add_argument("--targets", nargs="+", default=[], metavar="KIND=VALUE[:WEIGHT]",
                   help="sparsity targets instead of λ values, e.g. zero_groups=0.6 macs=3 macs=3:size "
                        "latency_ms=5 (WEIGHT: size, macs or latency; default the target's)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="train the dense single-task baselines (ΔMTL vs ST; default on)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    p.add_argument("--tasks", type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
                   help="comma-separated tasks of the multi-task model (default: the config's, else all)")
    p.add_argument("--dataset", help="data set name (overrides the config)")
    p.add_argument("--data-root", help="root folder of a real data set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key of every run, e.g. --set train.epochs=4 (repeatable)")
    p.add_argument("--single-task-grid", "--single-task", action=argparse.BooleanOptionalAction, default=False,
                   help="also train every single-task model over the λ grid (the dense single-task "
                        "baselines are always trained)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p


def resolve_sweep(args: argparse.Namespace) -> Sweep:
    tree = load_yaml(args.config) if args.config else {}
    for key, value in (("dataset.name", args.dataset), ("dataset.root", args.data_root), ("tasks", args.tasks)):
        if value is not None:
            set_dotted(tree, key, value)
    apply_set_items(tree, args.set, "train.epochs=4")
    base = resolve_config(tree)  # validates every key once, before any run starts
    tasks = dataset_tasks(base)
    if len(tasks) < 2:
        raise SweepError(f"a sweep compares a multi-task model with single-task ones: give at least two tasks "
                         f"(got {list(tasks)})")
    lambdas = args.lambdas if args.lambdas is not None else ([] if args.targets else list(DEFAULT_LAMBDAS))
    bad = [x for x in lambdas if not math.isfinite(x) or x < 0]
    if bad:
        raise SweepError(f"--lambdas must be finite and >= 0, got {bad}")
    return Sweep(out=Path(args.out), base=base.model_dump(mode="json"), tasks=tasks,
                 lambdas=tuple(sorted({x for x in lambdas if x > 0})), seeds=tuple(dict.fromkeys(args.seeds)),
                 single_task_grid=args.single_task_grid, targets=parse_targets(args.targets),
                 baselines=args.baselines)


def parse_targets(items: list[str]) -> tuple[str, ...]:
    """Normalised ``KIND=VALUE[:WEIGHT]`` items; a bad target or weight raises with the valid forms."""
    from training.sparsity.targets import GROUP_WEIGHTS, TargetError, parse_target

    out = []
    for item in items:
        text, _, weight = item.partition(":")
        try:
            target = str(parse_target(text))
        except TargetError as exc:
            raise SweepError(f"--targets {item}: {exc}") from None
        if weight and weight not in GROUP_WEIGHTS:
            raise SweepError(f"--targets {item}: unknown group weight {weight!r}; choose one of {GROUP_WEIGHTS}")
        out.append(f"{target}:{weight}" if weight else target)
    return tuple(dict.fromkeys(out))


def dataset_tasks(cfg: RunConfig) -> tuple[str, ...]:
    """The task names the runs will train, checked against the data set (unknown tasks raise)."""
    d = cfg.dataset
    spec = DatasetSpec(root=d.root, image_size=d.image_size, num_samples=1,
                       tasks=tuple(cfg.tasks) if cfg.tasks else None, seed=cfg.seed, options=dict(d.options))
    _, info = build_dataset(d.name, "val", spec)
    return tuple(t.name for t in info.tasks)


# --- plan and execution -----------------------------------------------------------------------

def plan_action(sweep: Sweep, spec: RunSpec) -> str:
    """"done", "resume" or "start"; refuses a run directory made with another configuration."""
    run_dir = sweep.run_dir(spec)
    saved = run_dir / CONFIG_FILE
    if saved.is_file():
        _check_same_config(run_dir, resolve_config(load_yaml(saved)), sweep.run_config(spec))
    if (run_dir / METRICS_FILE).is_file():
        return "done"
    return "resume" if (run_dir / LAST).is_file() else "start"


def _check_same_config(run_dir: Path, saved: RunConfig, wanted: RunConfig) -> None:
    a, b = _flatten(saved.model_dump(mode="json")), _flatten(wanted.model_dump(mode="json"))
    diff = [f"{k}: {a.get(k)!r} in the run, {b.get(k)!r} in the sweep"
            for k in sorted(set(a) | set(b)) if k not in IGNORED_KEYS and a.get(k) != b.get(k)]
    if diff:
        raise SweepError(f"{run_dir} was trained with another configuration ({'; '.join(diff[:5])}); "
                         f"use a new --out, or delete that run directory to retrain it")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def print_plan(sweep: Sweep, plan: list[tuple[RunSpec, str]]) -> None:
    counts = {a: sum(1 for _, b in plan if b == a) for a in ("start", "resume", "done")}
    print(f"sweep {sweep.out}: tasks {', '.join(sweep.tasks)}; λ grid 0 (dense), "
          f"{', '.join(map(format_lambda, sweep.lambdas)) or '(none)'}; targets {', '.join(sweep.targets) or '(none)'}; "
          f"seeds {', '.join(map(str, sweep.seeds))}")
    print(f"{len(plan)} runs: {counts['start']} to start, {counts['resume']} to resume, "
          f"{counts['done']} complete (skipped)")
    for spec, action in plan:
        print(f"  {action:<6}  {spec.name}")
    sys.stdout.flush()


def execute(sweep: Sweep, spec: RunSpec, action: str) -> bool:
    """Train one run with `training.run.main` in this process; True when it finished."""
    run_dir = sweep.run_dir(spec)
    if action == "resume":
        argv = ["--resume", str(run_dir)]
    else:
        config_path = sweep.out / "sweep-config.yaml"
        argv = ["--config", str(config_path), "--tasks", ",".join(spec.tasks), "--seed", str(spec.seed),
                "--set", f"sparsity.lam={_yaml_float(spec.lam)}", "--out", str(run_dir)]
        target, weight = spec.sparsity()["target"], spec.sparsity()["group_weight"]
        argv += ["--target", target] if target else []
        argv += ["--group-weight", weight] if weight else []
    with _isolated_run(run_dir):
        log.info("python -m training.run %s", " ".join(argv))
        try:
            return run_command.main(argv) == 0
        except Exception:  # one diverging or crashing run must not end the whole sweep
            log.exception("run %s failed", spec.name)
            return False


def _yaml_float(x: float) -> str:
    """``repr`` that YAML reads back as a float: YAML 1.1 wants a dot in "1.0e-05"."""
    text = repr(float(x))
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


@contextlib.contextmanager
def _isolated_run(run_dir: Path) -> Iterator[None]:
    """Keep process-wide state of one run from leaking into the next: the deterministic-algorithms
    switch and the log handlers. Each run's log lines also go to RUN_DIR/train.log."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / RUN_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("training")
    level = logger.level
    logger.setLevel(logging.INFO)  # train.log has every INFO line, whatever the process set before
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
        torch.use_deterministic_algorithms(deterministic)
        configure_logging()


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)


# --- entry point ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        sweep = resolve_sweep(args)
        plan = [(spec, plan_action(sweep, spec)) for spec in sweep.runs()]
    except (SweepError, ConfigError, DataError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_plan(sweep, plan)
    if args.dry_run:
        return 0
    failed = train_all(sweep, plan)
    rows, task_specs = collect(sweep, [spec for spec, _ in plan])
    meta = _report_meta(sweep, plan, failed)
    if rows and rows[0]["image_size"]:
        meta["image_size"] = rows[0]["image_size"].split("x")
    written = write_report(sweep.out, rows, task_specs, meta)
    print(f"wrote {', '.join(str(p) for p in written)}")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}; see their train.log, fix the cause "
              f"and run the same command again to resume", file=sys.stderr)
        return 1
    return 0


def train_all(sweep: Sweep, plan: list[tuple[RunSpec, str]]) -> list[str]:
    """Run every planned run that is not done; the names of those that failed."""
    todo = [(spec, action) for spec, action in plan if action != "done"]
    if todo:
        atomic_write_text(sweep.out / "sweep-config.yaml", yaml.safe_dump(sweep.base, sort_keys=False))
    failed = []
    for i, (spec, action) in enumerate(todo, 1):
        print(f"\n=== [{i}/{len(todo)}] {action} {spec.name}", flush=True)
        if not execute(sweep, spec, action):
            failed.append(spec.name)
    return failed


def _report_meta(sweep: Sweep, plan: list[tuple[RunSpec, str]], failed: list[str]) -> dict:
    missing = [spec.name for spec, _ in plan if not (sweep.run_dir(spec) / METRICS_FILE).is_file()]
    return {"dataset": sweep.base["dataset"]["name"], "encoder": sweep.base["model"]["encoder"],
            "image_size": sweep.base["dataset"]["image_size"], "tasks": list(sweep.tasks),
            "seeds": list(sweep.seeds), "lambdas": [format_lambda(x) for x in sweep.lambdas],
            "targets": list(sweep.targets),
            "incomplete": missing, "failed": failed}


if __name__ == "__main__":
    sys.exit(main())
