"""Surgery plans: match the old and new interaction maps, then carry the weights over.

- :mod:`pipeline.plan.model`: the plan as frozen data, its JSON form and hash;
- :mod:`pipeline.plan.match`: axis matching by atom signatures;
- :mod:`pipeline.plan.rules`: init rules and their exactness;
- :mod:`pipeline.plan.build`: plan construction from two models and their maps;
- :mod:`pipeline.plan.apply`: applying a plan to tensors, state dicts and optimizer state;
- :mod:`pipeline.plan.verify`: comparing the old and new models on probe inputs;
- :mod:`pipeline.plan.report`: tables, JSON, HTML and PNG reports.
"""

from pipeline.plan.apply import apply_optimizer_state, apply_param, apply_plan
from pipeline.plan.build import ModelSide, build_plan, plan_specs
from pipeline.plan.model import Plan, PlanError, diff_plans
from pipeline.plan.options import PlanOptions, load_options, parse_options

__all__ = [
    "ModelSide",
    "Plan",
    "PlanError",
    "PlanOptions",
    "apply_optimizer_state",
    "apply_param",
    "apply_plan",
    "build_plan",
    "diff_plans",
    "load_options",
    "parse_options",
    "plan_specs",
]
