"""Human-readable output of a run: one log line per epoch and the final metrics table."""

from __future__ import annotations

import logging

from training.kinds import kind_of
from training.metrics import metric_direction, primary_metric
from training.tasks import TaskSpec

log = logging.getLogger("training")


def log_epoch(record: dict, tasks: tuple[TaskSpec, ...], improved: bool) -> None:
    parts = [f"epoch {record['epoch']}", f"train loss {record['train'].get('loss', float('nan')):.4f}",
             f"val loss {record['val_loss']:.4f}"]
    for t in tasks:
        m = primary_metric(t.kind)
        parts.append(f"{t.name} {m} {record['val'][t.name][m]:.4g}")
    if "sparsity" in record:
        parts.append(f"zero groups {record['sparsity']['pct_zero_groups']:.1f}%")
    log.info(" | ".join(parts) + ("  (best)" if improved else ""))


def table_rows(tasks: tuple[TaskSpec, ...], model: dict, trivial: dict | None) -> list[tuple[str, ...]]:
    rows = []
    for t in tasks:
        for name in kind_of(t).table_metric_names(t):
            arrow = "higher" if metric_direction(t.kind, name) > 0 else "lower"
            ours = model[t.name][name]
            row = [t.name, name, arrow, f"{ours:.4g}"]
            if trivial is not None:
                base = trivial[t.name][name]
                better = (ours - base) * metric_direction(t.kind, name) > 0
                row += [f"{base:.4g}", "yes" if better else "NO"]
            rows.append(tuple(row))
    return rows


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(header), line, *map(fmt, rows)])


def metrics_table(tasks: tuple[TaskSpec, ...], model: dict, trivial: dict | None) -> str:
    header = ("task", "metric", "better", "model")
    if trivial is not None:
        header += ("trivial", "beats trivial")
    return format_table(header, table_rows(tasks, model, trivial))
