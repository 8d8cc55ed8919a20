"""The three plots of a sparsity sweep (`training.sweep_report` writes them): a metric against λ,
zero groups against λ, ΔMTL against compact MACs. matplotlib's object API with the Agg canvas, so no
global backend or pyplot state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from training.metrics import metric_direction, primary_metric
from training.sweep_report import ACCEPT_DELTA, ACCEPT_ZERO_GROUPS, Setting, format_lambda, mean_over, series
from training.tasks import TaskSpec


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
        ax.axhline(mean_over(settings, f"trivial/{column}"), color="0.5", ls=":", label="trivial predictor")
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
