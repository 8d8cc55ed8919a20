"""Tables of a sparsity sweep (`training.sweep`): results.csv and results.md, and the three PNGs of
`training.sweep_plots`.

Rows come from `training.sweep_collect.collect` (one per complete run); a *setting* is (kind, tasks, λ)
and aggregates its runs over seeds as mean ± sample standard deviation. Plots use matplotlib's
object API with the Agg canvas, so no global backend or pyplot state is touched.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from parsimony.io import atomic_write_text
from training.metrics import metric_direction, primary_metric
from training.tasks import TaskSpec

#: Quality has collapsed at λ when ΔMTL against the dense model of the same tasks falls below this (%).
COLLAPSE_DELTA = -10.0
#: Acceptance criterion of the project: at ≥ ACCEPT_ZERO_GROUPS % zero encoder groups, the
#: multi-task ΔMTL against the dense multi-task model is ≥ ACCEPT_DELTA %.
ACCEPT_ZERO_GROUPS = 60.0
ACCEPT_DELTA = -1.0
PLOTS = {"metric": "metric-vs-lambda.png", "zeros": "zero-groups-vs-lambda.png", "delta": "delta-vs-macs.png"}
#: A target counts as met when the achieved value is this close: absolute for zero_groups (2
#: percentage points), relative for macs (5 %) and for latency_ms (10 %, the exported model timed).
TARGET_TOLERANCE = {"zero_groups": (0.02, "abs"), "macs": (0.05, "rel"), "latency_ms": (0.10, "rel")}


def format_lambda(lam: float) -> str:
    """Short, exact, file-name-safe λ: 0 → "0", 0.001 → "1e-3", 0.00025 → "2.5e-4"."""
    if lam == 0:
        return "0"
    mantissa, exponent = f"{lam:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


@dataclass
class Setting:
    """The runs of one (kind, tasks, λ) or (kind, tasks, target) over seeds; a target setting's
    ``lam`` is the mean λ its controller ended with (where it sits on the λ axis)."""

    kind: str
    tasks: tuple[str, ...]
    lam: float
    rows: list[dict] = field(default_factory=list)
    target: str = ""

    def stat(self, column: str) -> tuple[float, float]:
        """Mean and sample std over seeds of the finite values (std NaN for a single value)."""
        values = [float(r[column]) for r in self.rows if _is_number(r.get(column))]
        values = [v for v in values if math.isfinite(v)]
        if not values:
            return math.nan, math.nan
        mean = sum(values) / len(values)
        if len(values) < 2:
            return mean, math.nan
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    def mean(self, column: str) -> float:
        return self.stat(column)[0]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def group_settings(rows: Sequence[dict], task_order: Sequence[str] = ()) -> list[Setting]:
    """Settings ordered single-task first (in ``task_order``), then multi-task, each by λ."""
    by_key: dict[tuple, Setting] = {}
    for row in rows:
        target = row.get("target") or ""
        key = (row["kind"], tuple(row["tasks"].split("+")), 0.0 if target else float(row["lambda"]))
        by_key.setdefault((*key, target), Setting(*key, target=target)).rows.append(row)
    for setting in by_key.values():
        if setting.target:
            setting.lam = setting.mean("final_lambda")
    rank = {t: i for i, t in enumerate(task_order)}
    return sorted(by_key.values(),
                  key=lambda s: (s.kind != "single", [rank.get(t, len(rank)) for t in s.tasks], s.tasks, s.lam))


def series(settings: Sequence[Setting], kind: str, tasks: tuple[str, ...] | None = None) -> list[Setting]:
    """The λ series (ascending) of one kind; single-task series are picked by ``tasks``."""
    return [s for s in settings if s.kind == kind and (tasks is None or s.tasks == tasks)]


# --- files ------------------------------------------------------------------------------------

def write_report(out: Path, rows: list[dict], specs: dict[str, TaskSpec], meta: dict) -> list[Path]:
    """Write results.csv, results.md and the plots into ``out``; return the paths written."""
    settings = group_settings(rows, meta["tasks"])
    tasks = [specs[t] for t in meta["tasks"] if t in specs]
    paths = [out / "results.csv", out / "results.md"]
    atomic_write_text(paths[0], to_csv(rows))
    atomic_write_text(paths[1], to_markdown(settings, tasks, meta))
    if rows:
        from training.sweep_plots import (  # matplotlib
            plot_delta_vs_macs,
            plot_metric_vs_lambda,
            plot_zero_groups,
        )

        for key, plot in (("metric", plot_metric_vs_lambda), ("zeros", plot_zero_groups),
                          ("delta", plot_delta_vs_macs)):
            fig = plot(settings, tasks, meta)
            fig.savefig(out / PLOTS[key], dpi=110, bbox_inches="tight")
            paths.append(out / PLOTS[key])
    return paths


def to_csv(rows: Sequence[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return buffer.getvalue()


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value


# --- markdown ---------------------------------------------------------------------------------

def _arrow(task: TaskSpec) -> str:
    return "↑" if metric_direction(task.kind, primary_metric(task.kind)) > 0 else "↓"


def _pm(setting: Setting, column: str, scale: float = 1.0, digits: int = 4, sign: str = "") -> str:
    mean, std = setting.stat(column)
    if not math.isfinite(mean):
        return "—"
    text = f"{mean / scale:{sign}.{digits}g}"
    return f"{text} ± {std / scale:.2g}" if math.isfinite(std) else text


def to_markdown(settings: Sequence[Setting], tasks: Sequence[TaskSpec], meta: dict) -> str:
    h, w = meta.get("image_size") or ("?", "?")
    lines = [
        f"# Sparsity sweep: {meta['dataset']}, encoder {meta['encoder']}, tasks {', '.join(meta['tasks'])}",
        "",
        f"Seeds {', '.join(map(str, meta['seeds']))}: every cell is the mean ± sample standard deviation over "
        "the seeds (n per row; no ± with one seed). ΔMTL (docs/METHOD.md §6) in percent, positive = better: "
        "**vs ST** against the dense (λ = 0) single-task models *of the same seed*; **vs dense** against the "
        "dense model with the same tasks and the same seed (for multi-task rows: the dense multi-task "
        f"model). Compact parameters and MACs (M, at {h}×{w}) count the model after removing zero groups "
        "(sparsity.json); — where the runs have no sparsity.json. % zero groups / weights: shared encoder. "
        "ΔMTL is — where its baseline run is missing or a baseline metric is 0 (relative change undefined, "
        "e.g. an F1 of 0).",
        "",
    ]
    lines += _targets(settings, meta.get("targets", ()))
    lines += _table(settings, tasks)
    lines += ["", *_verdicts(settings, tasks, meta)]
    lines += ["", "Plots: " + ", ".join(f"[{name}]({name})" for name in PLOTS.values())]
    if meta.get("incomplete"):
        lines += ["", f"Not complete (not in the table): {', '.join(meta['incomplete'])}."]
    return "\n".join(lines) + "\n"


def _table(settings: Sequence[Setting], tasks: Sequence[TaskSpec]) -> list[str]:
    header = ["kind", "tasks", "λ", "n", *(f"{t.name} {primary_metric(t.kind)} {_arrow(t)}" for t in tasks),
              "% zero groups", "% zero weights", "compact params (M)", "compact MACs (M)",
              "ΔMTL vs ST (%)", "ΔMTL vs dense (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in settings:
        cells = [s.kind, "+".join(s.tasks), _lambda_cell(s), str(len(s.rows))]
        cells += [_pm(s, f"{t.name}/{primary_metric(t.kind)}") if t.name in s.tasks else "" for t in tasks]
        cells += [_pm(s, "pct_zero_groups", digits=3), _pm(s, "pct_zero_weights", digits=3),
                  _pm(s, "compact_parameters", 1e6), _pm(s, "compact_macs", 1e6),
                  _pm(s, "delta_vs_single", digits=3, sign="+"), _pm(s, "delta_vs_dense", digits=3, sign="+")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _lambda_cell(s: Setting) -> str:
    if s.target:
        return f"{s.target} (final λ {s.lam:.2g})" if math.isfinite(s.lam) else s.target
    return "0 (dense)" if s.lam == 0 else format_lambda(s.lam)


def target_met(kind: str, requested: float, achieved: float) -> bool:
    tol, how = TARGET_TOLERANCE[kind]
    return abs(achieved - requested) <= (tol if how == "abs" else tol * requested)


def _targets(settings: Sequence[Setting], order: Sequence[str] = ()) -> list[str]:
    """Requested against achieved per target setting (in ``order``), with what each costs and runs at."""
    rank = {t: i for i, t in enumerate(order)}
    rows = sorted((s for s in settings if s.target), key=lambda s: rank.get(s.target, len(rank)))
    if not rows:
        return []
    lines = ["## Targets: requested against achieved", "",
             "Achieved per seed (the controller's exact measure of the final model: zero-group fraction, or "
             "dense ÷ compact MACs as compaction builds it; for latency_ms the exported model timed). Met: within "
             + ", ".join(f"{'±' + format(t * 100, 'g') + (' pp' if h == 'abs' else ' %')} ({k})"
                         for k, (t, h) in TARGET_TOLERANCE.items()) + " in every seed. ORT: ONNX Runtime latency of "
             "the dense and the compact model timed side by side in the run's process.", "",
             "| target | n | achieved per seed | met | % zero groups | MAC ratio (exported) | ORT speed-up | ΔMTL vs dense (%) "
             "| final λ | wall (min/run) |", "|" + "---|" * 10]
    for s in rows:
        kind = s.target.split("=")[0]
        column = "measured_ms" if kind == "latency_ms" else "achieved"
        values = [float(r[column]) for r in s.rows if _is_number(r.get(column))]
        met = bool(values) and all(target_met(kind, float(s.rows[0]["requested"]), v) for v in values)
        ratio = Setting("", (), 0.0, [{"r": r["dense_macs"] / r["exported_macs"]} for r in s.rows
                                      if _is_number(r.get("exported_macs")) and r["exported_macs"]])
        cells = [s.target, str(len(s.rows)), ", ".join(f"{v:.4g}" for v in values) or "—",
                 "yes" if met else "NO", _pm(s, "pct_zero_groups", digits=3), _pm(ratio, "r", digits=3),
                 _pm(s, "ort_speedup", digits=3), _pm(s, "delta_vs_dense", digits=3, sign="+"),
                 _pm(s, "final_lambda", digits=3), _pm(s, "wall_min", digits=3)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _verdicts(settings: Sequence[Setting], tasks: Sequence[TaskSpec], meta: dict) -> list[str]:
    lines = [f"**Quality collapse** — defined as the smallest λ > 0 whose mean ΔMTL vs dense is below "
             f"{COLLAPSE_DELTA:g} %, or at which some task's mean primary metric is no better than the trivial "
             f"predictor's (metrics.json \"trivial\": majority class, mean depth, mean normal, majority "
             f"attributes):"]
    groups = [("multi-task", series(settings, "multi"))]
    groups += [(f"single-task {t.name}", series(settings, "single", (t.name,))) for t in tasks]
    for label, group in groups:
        if any(s.lam > 0 for s in group):
            found = collapse(group, tasks)
            text = f"λ = {format_lambda(found[0])} ({found[1]})" if found else "not within the grid"
            lines.append(f"- {label}: {text}")
    lines += ["", acceptance(series(settings, "multi"))]
    trivial = [f"{t.name} {primary_metric(t.kind)} {mean_over(settings, f'trivial/{t.name}/{primary_metric(t.kind)}'):.4g}"
               for t in tasks]
    lines += ["", f"Trivial predictors (mean over runs): {', '.join(trivial)}."]
    return lines


def mean_over(settings: Sequence[Setting], column: str) -> float:
    return Setting("", (), 0.0, [r for s in settings for r in s.rows]).mean(column)


def collapse(group: Sequence[Setting], tasks: Sequence[TaskSpec]) -> tuple[float, str] | None:
    """The first λ > 0 of ``group`` (ascending) where quality has collapsed, with the reason."""
    by_name = {t.name: t for t in tasks}
    for s in sorted(group, key=lambda s: s.lam):
        if s.lam == 0:
            continue
        delta = s.mean("delta_vs_dense")
        if delta < COLLAPSE_DELTA:
            return s.lam, f"ΔMTL vs dense {delta:+.1f} %"
        for name in s.tasks:
            task, metric = by_name[name], primary_metric(by_name[name].kind)
            ours, trivial = s.mean(f"{name}/{metric}"), s.mean(f"trivial/{name}/{metric}")
            if (ours - trivial) * metric_direction(task.kind, metric) <= 0:
                return s.lam, f"{name} {metric} {ours:.4g}, trivial {trivial:.4g}"
    return None


def acceptance(group: Sequence[Setting]) -> str:
    head = (f"**Acceptance** (at a λ leaving ≥ {ACCEPT_ZERO_GROUPS:g} % of the shared encoder's groups zero, "
            f"multi-task ΔMTL vs dense multi-task ≥ {ACCEPT_DELTA:g} %): ")
    sparse = [s for s in group if not s.target and s.lam > 0 and math.isfinite(s.mean("pct_zero_groups"))]
    if not sparse and any(s.target for s in group):
        return head + "not applicable — the sparse runs were given targets, not λ (requested against achieved above)."
    if not sparse:
        return head + "not evaluated — no multi-task run with λ > 0 has sparsity.json."
    candidates = [s for s in sparse if s.mean("pct_zero_groups") >= ACCEPT_ZERO_GROUPS]
    if not candidates:
        top = max(sparse, key=lambda s: s.mean("pct_zero_groups"))
        return head + (f"FAIL — no λ reaches {ACCEPT_ZERO_GROUPS:g} % zero groups (most: "
                       f"{top.mean('pct_zero_groups'):.1f} % at λ = {format_lambda(top.lam)}).")
    best = max(candidates, key=lambda s: s.mean("delta_vs_dense"))
    ok = best.mean("delta_vs_dense") >= ACCEPT_DELTA
    return head + (f"{'PASS' if ok else 'FAIL'} — best λ = {format_lambda(best.lam)}: "
                   f"{best.mean('pct_zero_groups'):.1f} % zero groups, ΔMTL vs dense multi-task "
                   f"{best.mean('delta_vs_dense'):+.2f} %.")
