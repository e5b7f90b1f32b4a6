"""The SDP engine: units, plans, the cut, the syncs, the multi-process wrapper and the
single-process simulator (see docs/architecture.md). It knows nothing of models, data or the
training application."""

from .errors import CollectiveError, DisconnectedPlanWarning, PlanError, PlanMismatchError, SDPConfigError
from .evaluation import fold_residual_scale, recalibrate_norm_statistics, scale_residual_branches
from .plan import MemoryBudget, Plan, UnitCost, holders_needed, make_plan
from .planning import plan_for
from .simulator import SubnetworkSimulator
from .subnetwork import Subnetwork
from .wrapper import SubnetworkDataParallel

__all__ = ["CollectiveError", "DisconnectedPlanWarning", "MemoryBudget", "Plan", "PlanError", "PlanMismatchError",
           "SDPConfigError", "Subnetwork", "SubnetworkDataParallel", "SubnetworkSimulator", "UnitCost",
           "fold_residual_scale", "holders_needed", "make_plan", "plan_for", "recalibrate_norm_statistics",
           "scale_residual_branches"]
