"""Figures without pyplot: no global backend switch and no figure registry, so plotting from
`empf report` (or in a notebook that calls it) leaves matplotlib's global state as it was."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ._files import write_file_atomic


def subplots(*args: Any, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
    """`pyplot.subplots` on a standalone `matplotlib.figure.Figure` (its `savefig` renders with
    Agg for PNG whatever the interactive backend is); nothing to close afterwards."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """`fig.savefig(path)` written whole (`write_file_atomic`): an error or Ctrl-C while it is
    drawn or written leaves the previous file at `path` as it was, never a broken PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_file_atomic(Path(path), buf.getbuffer())
