"""matplotlib is optional (``pip install "subnetdp[plots]"``): where it is missing, figures are
skipped with a note and every table and JSON file is still written."""

from __future__ import annotations

import sys
from typing import Any


def pyplot(what: str) -> Any | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (and a note naming ``what`` is
    not drawn) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, so {what} not drawn (pip install 'subnetdp[plots]')",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    return plt
