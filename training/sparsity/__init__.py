"""Channel-level group sparsity of the shared encoder (docs/METHOD.md §2-3).

Typical use in a training loop::

    from training.sparsity import GroupLasso, build_groups, sparsity_report

    groupset = build_groups(model, mode="channel")          # after model.to(device)
    reg = GroupLasso.from_config(groupset, config.sparsity)
    ...
    loss = task_loss
    if (extra := reg.loss_term(epoch)) is not None:          # penalty mode
        loss = loss + extra
    loss.backward(); optimizer.step()
    reg.after_step(optimizer.param_groups[0]["lr"], epoch)   # proximal mode
    ...
    reg.finalize()                                           # before compaction
    report = sparsity_report(model, groupset, image_size=(288, 384))
"""

from training.sparsity.groups import (
    GROUP_MODES,
    ChannelGroup,
    GroupSet,
    ParamSlice,
    SliceIndex,
    alive_channels,
    build_groups,
    zero_mask,
)
from training.sparsity.regularizer import (
    REG_MODES,
    GroupLasso,
    check_same_across_ranks,
    zero_mask_digest,
)
from training.sparsity.report import format_report, plot_survival, sparsity_report
from training.sparsity.trace import ChannelGraph, ChannelSpace, trace_channels

__all__ = [
    "GROUP_MODES",
    "REG_MODES",
    "ChannelGraph",
    "ChannelGroup",
    "ChannelSpace",
    "GroupLasso",
    "GroupSet",
    "ParamSlice",
    "SliceIndex",
    "alive_channels",
    "build_groups",
    "check_same_across_ranks",
    "format_report",
    "plot_survival",
    "sparsity_report",
    "trace_channels",
    "zero_mask",
    "zero_mask_digest",
]
