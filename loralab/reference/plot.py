"""Decision-boundary figure for the spiral experiment (matplotlib, imported only here and only when called).

Each panel colours a 200×200 grid over [−1.15, 1.15]² by the predicted class and overlays the held-out points.
It draws on a bare `Figure` with the Agg canvas, so it never touches pyplot or the caller's backend.
Without matplotlib, plot_spirals raises PlotUnavailable, which says how to install it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .mlp import Params, predict
from .spirals import rotate

__all__ = ["plot_spirals", "PlotUnavailable"]

_COLOURS = ("#4C72B0", "#DD8452", "#55A868")


class PlotUnavailable(ImportError):
    """matplotlib (the optional [plot] extra) is not installed."""


def plot_spirals(path: str | Path, x_test: np.ndarray, y_test: np.ndarray, rotation: float, base: Params,
                 lora: Params, scaling: float, full: Params) -> Path:
    """Write four panels (base on the original task; base, LoRA, full fine-tuning on the rotated task) to path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] != "matplotlib":
            raise
        raise PlotUnavailable("the figure needs matplotlib, which is not installed: pip install loralab[plot] "
                              "(or pass --no-plot)") from None

    x_rot = rotate(x_test, rotation)
    panels = [("base, original task", x_test, base, None),
              (f"base, rotated {rotation} rad", x_rot, base, None),
              ("LoRA (base frozen), rotated", x_rot, base, lora),
              ("full fine-tuning, rotated", x_rot, full, None)]
    grid = np.linspace(-1.15, 1.15, 200)
    gx, gy = np.meshgrid(grid, grid)
    points = np.stack([gx.ravel(), gy.ravel()], axis=1)              # (40000, 2)

    fig = Figure(figsize=(16, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    cmap = ListedColormap(_COLOURS)
    for k, (title, xs, params, adapter) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        regions = predict(points, params, adapter, scaling).reshape(gx.shape)
        ax.contourf(gx, gy, regions, levels=[-0.5, 0.5, 1.5, 2.5], cmap=cmap, alpha=0.3)
        ax.scatter(xs[:, 0], xs[:, 1], c=y_test, cmap=cmap, s=6, edgecolors="none")
        accuracy = (predict(xs, params, adapter, scaling) == y_test).mean()
        ax.set_title(f"{title}\nheld-out accuracy {accuracy:.1%}", fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_aspect("equal")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path.resolve()
