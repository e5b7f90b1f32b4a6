"""subnetdp: Subnetwork Data Parallelism for PyTorch. See README.md and docs/architecture.md.

The names below come from ``subnetdp.engine`` and ``subnetdp.export``, imported on first use
(PEP 562): ``import subnetdp`` and the ``subnetdp`` command's start-up (``--help``) do not import
torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0.dev0"
__all__ = ["CollectiveError", "DisconnectedPlanWarning", "MemoryBudget", "Plan", "PlanError", "PlanMismatchError",
           "SDPConfigError", "SubnetworkDataParallel", "SubnetworkSimulator", "fold_residual_scale", "make_plan",
           "plan_for", "recalibrate_norm_statistics", "scale_residual_branches", "Ensemble", "load_ensemble",
           "load_subnetwork", "save_ensemble", "save_subnetwork", "standalone_subnetwork", "__version__"]
_FROM_EXPORT = {"Ensemble", "load_ensemble", "load_subnetwork", "save_ensemble", "save_subnetwork",
                "standalone_subnetwork"}

if TYPE_CHECKING:
    from .engine import (
                         CollectiveError,
                         DisconnectedPlanWarning,
                         MemoryBudget,
                         Plan,
                         PlanError,
                         PlanMismatchError,
                         SDPConfigError,
                         SubnetworkDataParallel,
                         SubnetworkSimulator,
                         fold_residual_scale,
                         make_plan,
                         plan_for,
                         recalibrate_norm_statistics,
                         scale_residual_branches,
    )
    from .export import (
                         Ensemble,
                         load_ensemble,
                         load_subnetwork,
                         save_ensemble,
                         save_subnetwork,
                         standalone_subnetwork,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module(".export" if name in _FROM_EXPORT else ".engine", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # a subpackage not imported yet (subnetdp.engine), as before
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
