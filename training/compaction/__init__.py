"""Physical compaction: remove the encoder's dead channels so the model gets smaller and faster
while computing exactly what the sparse model computes.

Two phases::

    from training.compaction import apply_plan, plan_compaction, save_compact, load_compact

    plan = plan_compaction(model, round_to=8)     # serialisable: kept channels per channel space
    print(plan.summary())
    small = apply_plan(model, plan)               # a new model; `model` is untouched
    save_compact(small, plan, "out/compact")      # config.json + model.safetensors + plan.json
    same = load_compact("out/compact")            # rebuilt from config.json, no pickle
"""

from training.compaction.apply import apply_plan, check_plan, compact, compacted_config, sliced_state_dict
from training.compaction.io import (
    CONFIG_FILE,
    PLAN_FILE,
    WEIGHTS_FILE,
    check_plan_describes,
    load_compact,
    load_config,
    load_plan,
    save_compact,
)
from training.compaction.plan import (
    PLAN_FORMAT,
    CompactionPlan,
    SpacePlan,
    config_hash,
    plan_compaction,
    producer_norms,
    target_width,
)

__all__ = [
    "CONFIG_FILE",
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "PLAN_FORMAT",
    "CompactionPlan",
    "SpacePlan",
    "apply_plan",
    "check_plan",
    "check_plan_describes",
    "compact",
    "compacted_config",
    "config_hash",
    "load_compact",
    "load_config",
    "load_plan",
    "plan_compaction",
    "producer_norms",
    "save_compact",
    "sliced_state_dict",
    "target_width",
]
