"""Strict JSON for the files the application writes (metrics.jsonl, summary.json, a sweep's
results.json): a NaN or infinite number (a diverged metric) is written as null, where the json
module would write the bare ``NaN`` that other readers reject. No torch import: the sweep's
`--help` stays fast."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (nested in dicts, lists, tuples) replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes strict JSON: NaN and infinities (a diverged metric) become null,
    where the json module would write the bare ``NaN`` that other readers reject."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
