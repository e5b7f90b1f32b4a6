"""The SDP engine: units, plans, the multi-process wrapper and the single-process simulator.
It knows nothing of models, data or the training application."""

from .evaluation import recalibrate_norm_statistics, scale_residual_branches
from .errors import CollectiveError, PlanError, PlanMismatchError, SDPConfigError
from .plan import Plan, UnitCost, holders_needed, make_plan
from .simulator import SubnetworkSimulator
from .wrapper import SubnetworkDataParallel, plan_for

__all__ = ["CollectiveError", "Plan", "PlanError", "PlanMismatchError", "SDPConfigError",
           "SubnetworkDataParallel", "SubnetworkSimulator", "UnitCost", "holders_needed", "make_plan",
           "plan_for", "recalibrate_norm_statistics", "scale_residual_branches"]
