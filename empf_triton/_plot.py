"""Figures without pyplot: no global backend switch and no figure registry, so plotting from
`empf report` (or in a notebook that calls it) leaves matplotlib's global state as it was."""

from __future__ import annotations

from typing import Any


def subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
    """`pyplot.subplots` on a standalone `matplotlib.figure.Figure` (its `savefig` renders with
    Agg for PNG whatever the interactive backend is); nothing to close afterwards."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)
