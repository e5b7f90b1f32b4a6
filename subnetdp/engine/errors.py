"""Exceptions raised by the engine. Each one says what was wrong and how to fix it."""

from __future__ import annotations


class SDPConfigError(ValueError):
    """A wrapper argument, a module path or a model structure that SDP cannot use."""


class PlanError(ValueError):
    """No valid plan exists for these units, workers and coverage."""


class PlanMismatchError(RuntimeError):
    """Ranks computed different plans (different model, config or seed on some rank)."""


class CollectiveError(RuntimeError):
    """A collective failed or timed out, most often because a peer died or is stuck."""


class DisconnectedPlanWarning(UserWarning):
    """The plan's worker-overlap graph is disconnected (each unit has one holder, k = 1): groups
    of workers share no unit, and exchange only the shared parameters' gradients."""
