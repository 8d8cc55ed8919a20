"""Tables and plots of a sparsity sweep (`training.sweep`): results.csv, results.md and three PNGs.

Rows come from `training.sweep.collect` (one per complete run); a *setting* is (kind, tasks, λ)
and aggregates its runs over seeds as mean ± sample standard deviation. Plots use matplotlib's
object API with the Agg canvas, so no global backend or pyplot state is touched.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from training.io import atomic_write_text
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
    trivial = [f"{t.name} {primary_metric(t.kind)} {_mean_over(settings, f'trivial/{t.name}/{primary_metric(t.kind)}'):.4g}"
               for t in tasks]
    lines += ["", f"Trivial predictors (mean over runs): {', '.join(trivial)}."]
    return lines


def _mean_over(settings: Sequence[Setting], column: str) -> float:
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


# --- plots ------------------------------------------------------------------------------------

def _lambda_axis(ax, lams: Sequence[float]) -> Callable[[float], float]:
    """λ axis with λ = 0 labelled "dense": logarithmic (dense one decade left of the smallest λ)
    when the λ values span 20× or more, else linear with dense at 0 (a fine grid stays readable)."""
    positive = sorted({x for x in lams if x > 0})
    log = bool(positive) and positive[-1] / positive[0] >= 20
    if log:
        dense_x = positive[0] / 10
        ax.set_xscale("log")
        ax.set_xlim(dense_x / 2, positive[-1] * 2)
        ax.axvline(math.sqrt(dense_x * positive[0]), color="0.75", ls=":", lw=1)
    else:
        dense_x = 0.0
        top = positive[-1] if positive else 1.0
        ax.set_xlim(-0.08 * top, top * 1.08)
    lo, hi = ax.get_xlim()
    where = (lambda v: math.log(v / lo) / math.log(hi / lo)) if log else (lambda v: (v - lo) / (hi - lo))
    labels, last = ["dense"], where(dense_x)
    for lam in positive:  # label a λ only when it is not crowded by the previous labelled one
        keep = where(lam) - last >= 0.1
        labels.append(format_lambda(lam) if keep else "")
        last = where(lam) if keep else last
    ax.set_xticks([dense_x, *positive], labels)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("group-lasso λ" + (" (log scale)" if log else ""))
    return lambda lam: lam if lam > 0 else dense_x


def _errorbar(ax, xs, group: Sequence[Setting], column: str, scale: float = 1.0, **kw) -> None:
    stats = [s.stat(column) for s in group]
    ys = [m / scale for m, _ in stats]
    errs = [(e / scale if math.isfinite(e) else 0.0) for _, e in stats]
    ax.errorbar(xs, ys, yerr=errs, capsize=3, **kw)


def _seeds_note(meta: dict) -> str:
    n = len(meta["seeds"])
    return f"mean ± std over {n} seeds" if n > 1 else "1 seed"


def plot_metric_vs_lambda(settings: Sequence[Setting], tasks: Sequence[TaskSpec], meta: dict) -> Figure:
    fig = Figure(figsize=(4.3 * len(tasks), 3.8), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    lams = [s.lam for s in settings]
    multi = series(settings, "multi")
    for ax, task in zip(axes, tasks, strict=True):
        x = _lambda_axis(ax, lams)
        metric = primary_metric(task.kind)
        column = f"{task.name}/{metric}"
        _errorbar(ax, [x(s.lam) for s in multi], multi, column, marker="o", label="multi-task")
        single = series(settings, "single", (task.name,))
        if len(single) > 1:
            _errorbar(ax, [x(s.lam) for s in single], single, column, marker="s", ls="--", label="single-task")
        elif single:
            ax.axhline(single[0].mean(column), color="C1", ls="--", label="single-task dense")
        ax.axhline(_mean_over(settings, f"trivial/{column}"), color="0.5", ls=":", label="trivial predictor")
        better = "higher" if metric_direction(task.kind, metric) > 0 else "lower"
        ax.set_ylabel(f"{metric} ({better} is better)")
        ax.set_title(task.name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{meta['dataset']}: test metric against λ ({_seeds_note(meta)})")
    return fig


def plot_zero_groups(settings: Sequence[Setting], tasks: Sequence[TaskSpec], meta: dict) -> Figure:
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    x = _lambda_axis(ax, [s.lam for s in settings])
    multi = series(settings, "multi")
    _errorbar(ax, [x(s.lam) for s in multi], multi, "pct_zero_groups", marker="o", label="multi-task: groups")
    _errorbar(ax, [x(s.lam) for s in multi], multi, "pct_zero_weights", marker="^", ls="--",
              label="multi-task: weights in zero groups")
    for i, task in enumerate(tasks):
        single = series(settings, "single", (task.name,))
        if len(single) > 1:
            _errorbar(ax, [x(s.lam) for s in single], single, "pct_zero_groups", marker="s", ls=":",
                      color=f"C{i + 2}", label=f"single-task {task.name}: groups")
    ax.axhline(ACCEPT_ZERO_GROUPS, color="C3", ls=":", lw=1, label=f"{ACCEPT_ZERO_GROUPS:g} % (acceptance)")
    ax.set_ylim(-3, 103)
    ax.set_ylabel("% zero in the shared encoder")
    if not any(math.isfinite(s.mean("pct_zero_groups")) for s in settings):
        ax.text(0.5, 0.5, "no sparsity.json in any run:\nzero-group counts unavailable", ha="center",
                va="center", transform=ax.transAxes, color="0.4")
    ax.legend(fontsize="small", loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title(f"{meta['dataset']}: encoder sparsity against λ ({_seeds_note(meta)})")
    return fig


def _annotate(ax, group: Sequence[Setting], xs: Sequence[float]) -> None:
    """Label each point with its λ; points within 5 % of the axes' extent of each other
    share one label ("dense, λ=1e-4") so that labels never overprint."""
    points = [(x, s.mean("delta_vs_single"), "dense" if s.lam == 0 else f"λ={format_lambda(s.lam)}")
              for s, x in zip(group, xs, strict=True) if math.isfinite(x) and math.isfinite(s.mean("delta_vs_single"))]
    if not points:
        return
    ax.autoscale_view()
    span_x, span_y = (abs(hi - lo) for lo, hi in (ax.get_xlim(), ax.get_ylim()))
    clusters: list[list[tuple[float, float, str]]] = []
    for p in points:
        near = next((c for c in clusters if abs(c[0][0] - p[0]) < 0.05 * span_x
                     and abs(c[0][1] - p[1]) < 0.05 * span_y), None)
        near.append(p) if near is not None else clusters.append([p])
    for c in clusters:
        ax.annotate(", ".join(p[2] for p in c), c[0][:2], textcoords="offset points", xytext=(6, 4),
                    fontsize="small")


def plot_delta_vs_macs(settings: Sequence[Setting], tasks: Sequence[TaskSpec], meta: dict) -> Figure:
    fig = Figure(figsize=(6.4, 4.3), layout="constrained")
    ax = fig.subplots()
    multi = series(settings, "multi")
    compact = all(math.isfinite(s.mean("compact_macs")) for s in multi)
    column = "compact_macs" if compact else "dense_macs"
    xs = [s.mean(column) / 1e6 for s in multi]
    _errorbar(ax, xs, multi, "delta_vs_single", marker="o", lw=0.8, label="vs dense single-task (same seed)")
    _errorbar(ax, xs, multi, "delta_vs_dense", marker="s", lw=0.8, ls="--", label="vs dense multi-task (same seed)")
    _annotate(ax, multi, xs)
    finite = [x for x in xs if math.isfinite(x) and x > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_xscale("log")
    ax.axhline(0.0, color="0.5", lw=1)
    ax.axhline(ACCEPT_DELTA, color="C3", ls=":", lw=1, label=f"{ACCEPT_DELTA:g} % (acceptance, vs dense MT)")
    h, w = meta.get("image_size") or ("?", "?")
    what = "compact MACs (M)" if compact else "MACs (M; dense — no sparsity.json yet)"
    ax.set_xlabel(f"{what} at {h}×{w}")
    ax.set_ylabel("ΔMTL (%), higher is better")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_title(f"{meta['dataset']}: multi-task ΔMTL against cost ({_seeds_note(meta)})")
    return fig
