"""The one plotting setup: matplotlib without a display, imported only when a plot is drawn.

Plots are an extra (``pip install 'modular-llm[plot]'``): merging and loading never need them.
"""

from __future__ import annotations

__all__ = ["pyplot"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (PNG files, no window)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'modular-llm[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
