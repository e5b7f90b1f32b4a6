"""subnetdp: Subnetwork Data Parallelism for PyTorch. See README.md and docs/architecture.md."""

from .engine import (
                     CollectiveError,
                     Plan,
                     PlanError,
                     PlanMismatchError,
                     SDPConfigError,
                     SubnetworkDataParallel,
                     SubnetworkSimulator,
                     make_plan,
                     plan_for,
                     recalibrate_norm_statistics,
                     scale_residual_branches,
)

__version__ = "0.1.0"
__all__ = ["CollectiveError", "Plan", "PlanError", "PlanMismatchError", "SDPConfigError",
           "SubnetworkDataParallel", "SubnetworkSimulator", "make_plan", "plan_for", "recalibrate_norm_statistics",
           "scale_residual_branches", "__version__"]
