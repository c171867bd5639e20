"""The curves of a sweep: train and validation accuracy and loss per variant, over epochs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from regularize.core import atomic
from regularize.sweep.variants import format_rate


def plot_curves(
    runs: Mapping[float | str, Sequence[Mapping[str, Sequence[float]]]],
    path: str | os.PathLike,
    *,
    title: str = "",
) -> Path:
    """Draws train (solid) and validation (dashed) accuracy and loss per variant.

    The train curves are what `fit()` logs: running means over each epoch
    with dropout active. The file is written atomically.

    Args:
        runs: variant (a rate, or a label such as "head@0.3") -> one history per run (e.g.
            per seed), each with "accuracy", "val_accuracy", "loss", "val_loss" lists.
            Several runs are drawn as their mean with a band of one (sample) standard
            deviation. Variants are drawn in the mapping's order.
        path: The PNG file to write.
        title: The figure's title.

    Returns:
        `path`.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = draw_curves(runs, title=title)
    try:
        atomic.write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def draw_curves(runs: Mapping, *, title: str = ""):
    """The figure `plot_curves` writes (a matplotlib `Figure`; the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10")
    panels = (("accuracy", "accuracy"), ("loss", "loss"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, (variant, histories) in enumerate(runs.items()):
            name = f"rate {format_rate(variant)}" if not isinstance(variant, str) else variant
            for split, style in (("", "-"), ("val_", "--")):
                series = _stack([h[f"{split}{key}"] for h in histories])
                epochs = np.arange(1, series.shape[1] + 1)
                mean = series.mean(axis=0)
                line = f"{name} {'val' if split else 'train (fit)'}"
                ax.plot(epochs, mean, style, color=colors(i % 10), label=line)
                if len(histories) > 1:
                    std = series.std(axis=0, ddof=1)
                    ax.fill_between(
                        epochs, mean - std, mean + std, color=colors(i % 10), alpha=0.15
                    )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _stack(series: Sequence[Sequence[float]]) -> np.ndarray:
    length = min(len(s) for s in series)
    return np.array([list(s)[:length] for s in series], dtype=float)
