"""Sparsity report: zero groups per layer and overall, and what compaction would save.

"Compact" numbers are those of the model once its dead channels (`alive_channels`) are physically
removed: every conv scales by (alive_in/in)·(alive_out/out) of the spaces it reads and writes
(head input convs by alive_in/in of the encoder output), encoder BNs by alive/total, everything
else is unchanged. They are computed exactly in integers, and equal the parameter and MAC counts
of the rebuilt narrower model. MACs count Conv2d and Linear multiply-adds (see
`training.models.complexity`), not FLOPs.

The schema of `sparsity_report` is read by the λ sweep; change it only together with the sweep.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from training.models.complexity import count_parameters, macs_by_module
from training.sparsity.groups import GroupSet, alive_channels, zero_mask
from training.sparsity.trace import unwrap


def sparsity_report(model: nn.Module, groupset: GroupSet, image_size: tuple[int, int] = (224, 224)) -> dict:
    """JSON-serialisable summary: zero groups, weights in zero groups, dense vs compact cost."""
    model = unwrap(model)
    zeros = zero_mask(groupset, model)
    alive = alive_channels(model, groupset)
    total_w, zero_w = groupset.index(model).count_scalars(zeros)
    groups_zero = sum(int(z.sum()) for z in zeros.values())
    dense_params, dense_macs = count_parameters(model), macs_by_module(model, image_size)
    saved_params, compact_macs = _compact(model, groupset, alive, dense_macs)
    return {
        "mode": groupset.mode,
        "groups_total": groupset.num_groups,
        "groups_zero": groups_zero,
        "pct_zero_groups": _pct(groups_zero, groupset.num_groups),
        "encoder_weights": total_w,
        "zero_weights": zero_w,
        "pct_zero_weights": _pct(zero_w, total_w),
        "dense_parameters": dense_params,
        "compact_parameters": dense_params - saved_params,
        "dense_macs": sum(dense_macs.values()),
        "compact_macs": compact_macs,
        "alive_channels": sum(int(a.sum()) for a in alive.values()),
        "total_channels": sum(a.numel() for a in alive.values()),
        "layers": _layers(groupset, zeros, alive),
    }


def _layers(groupset: GroupSet, zeros: dict[str, Tensor], alive: dict[str, Tensor]) -> list[dict]:
    """One row per grouped space; ``channels``/``alive`` are those of the feature space it covers
    (in paper mode: the space the conv reads; the RGB input counts as all alive)."""
    rows = []
    for name, space in groupset.spaces.items():
        feature = name if groupset.mode == "channel" else groupset.graph.conv_inputs[space.consumers[0]]
        kept = alive[feature] if feature is not None else None
        n_zero, size = int(zeros[name].sum()), groupset.group_size(name)
        rows.append(
            {
                "name": name,
                "groups": space.width,
                "zero": n_zero,
                "pct_zero": _pct(n_zero, space.width),
                "weights": size * space.width,
                "zero_weights": size * n_zero,
                "channels": space.width if kept is None else kept.numel(),
                "alive": space.width if kept is None else int(kept.sum()),
            }
        )
    return rows


def _compact(
    model: nn.Module, groupset: GroupSet, alive: dict[str, Tensor], macs: dict[str, int]
) -> tuple[int, int]:
    """(parameters removed, MACs left) once dead channels are gone. A wholly dead space still keeps
    one channel, as compaction does (a zero-width conv cannot be built)."""
    graph = groupset.graph
    kept = {name: max(1, int(a.sum())) for name, a in alive.items()}
    saved, compact_macs = 0, sum(macs.values())
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name in graph.conv_inputs:
            s_in, s_out = graph.conv_inputs[name], graph.conv_outputs.get(name)
            a_in = kept[s_in] if s_in is not None else module.in_channels
            a_out = kept[s_out] if s_out is not None else module.out_channels
            dense = _conv_params(module, module.in_channels, module.out_channels)
            saved += dense - _conv_params(module, a_in, a_out)
            if name in macs:
                per_pair = macs[name] // (module.in_channels * module.out_channels)
                compact_macs -= macs[name] - per_pair * a_in * a_out
        elif isinstance(module, nn.BatchNorm2d) and name in graph.norm_spaces and module.affine:
            saved += 2 * (module.num_features - kept[graph.norm_spaces[name]])
    return saved, compact_macs


def _conv_params(conv: nn.Conv2d, c_in: int, c_out: int) -> int:
    kh, kw = conv.kernel_size
    return c_out * c_in * kh * kw + (c_out if conv.bias is not None else 0)


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def format_report(report: dict) -> str:
    """A compact text table for the final log: per layer, channels alive/total and % zero groups."""
    width = max([len(r["name"]) for r in report["layers"]] + [5])
    lines = [f"{'layer':<{width}}  {'alive/channels':>14}  {'zero groups':>11}"]
    for r in report["layers"]:
        lines.append(f"{r['name']:<{width}}  {r['alive']:>6}/{r['channels']:<7}  {r['pct_zero']:>10.1f}%")
    lines += [
        f"{report['mode']} groups: {report['groups_zero']}/{report['groups_total']} zero "
        f"({report['pct_zero_groups']:.1f}%); weights in zero groups: {report['zero_weights']}/"
        f"{report['encoder_weights']} ({report['pct_zero_weights']:.1f}%)",
        f"channels alive: {report['alive_channels']}/{report['total_channels']}; parameters "
        f"{_si(report['dense_parameters'])} -> {_si(report['compact_parameters'])}; MACs "
        f"{_si(report['dense_macs'])} -> {_si(report['compact_macs'])} "
        f"(x{_ratio(report['dense_macs'], report['compact_macs']):.2f} fewer)",
    ]
    return "\n".join(lines)


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _ratio(dense: int, compact: int) -> float:
    return dense / compact if compact else float("inf")


def plot_target(ax, target: dict) -> None:
    """λ (log scale, right axis) and the measured progress against the schedule, per control step."""
    steps = [t["step"] for t in target["trajectory"]]
    ax.plot(steps, [100 * t["progress"] for t in target["trajectory"]], "o-", ms=3, label="measured")
    ax.plot(steps, [100 * t["schedule"] for t in target["trajectory"]], "--", color="0.4", label="schedule")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("progress towards the target (%)")
    state = "reached" if target["reached"] else "NOT reached"
    ax.set_title(f"target {target['target']}: {state}, achieved {target['achieved']:.4g}", fontsize=10)
    if target.get("frozen_at_step") is not None:
        ax.axvline(target["frozen_at_step"], color="C2", ls=":", label="zero set frozen")
    ax.grid(alpha=0.3)
    lam = ax.twinx()
    lam.plot(steps, [t["lambda"] for t in target["trajectory"]], color="C3", lw=1, label="λ")
    lam.set_yscale("log")
    lam.set_ylabel("λ", color="C3")
    handles = ax.get_legend_handles_labels()
    more = lam.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="lower right")


def plot_survival(report: dict, path: str | Path) -> Path:
    """Bar chart of per-layer channel survival (% alive) saved as a PNG; returns the path. With a
    sparsity target (``report["target"]``) a second panel draws λ and the measured progress
    against the schedule over the training steps.

    Uses matplotlib's object API with the Agg canvas, so it needs no display and leaves the
    global pyplot backend alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = report["layers"]
    survival = [100.0 * r["alive"] / r["channels"] if r["channels"] else 0.0 for r in rows]
    target = report.get("target")
    width = max(6.0, 0.28 * len(rows) + 2)
    fig = Figure(figsize=(width + (5.5 if target else 0), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if target else 1, 1)
    if target:
        plot_target(fig.add_subplot(1, 2, 2), target)
    colors = ["tab:orange" if "stream" in r["name"] else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), survival, color=colors)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=90, fontsize=7)
    ax.set_ylim(0, 118)  # headroom for the legend above full bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("channels alive (%)")
    ax.set_title(
        f"Channel survival ({report['mode']} groups)\n{report['alive_channels']}/{report['total_channels']} "
        f"channels alive, {report['pct_zero_groups']:.1f}% zero groups",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    if "tab:orange" in colors:
        handles = [Patch(color="tab:orange", label="residual stream"), Patch(color="tab:blue", label="other")]
        ax.legend(handles=handles, loc="upper right", ncols=2, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
