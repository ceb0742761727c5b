"""Reward-versus-budget plots (PNG, matplotlib Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from noisesearch.io import atomic_save_figure
from noisesearch.simulate.metrics import rescale


def plot_curves(path, budgets_tflops, curves: dict, rewards, stderr: dict | None = None, gains: dict | None = None,
                display: dict | None = None, title: str = "") -> Path:
    """One panel per reward; one line per method (``curves[name]`` is [B, R]), with +-1 standard
    error bands when ``stderr`` is given. Rewards are shown in the pool's display units when it has
    them (e.g. the TTSnap authors' rescaling); ``gains[name]`` (per reward) goes into the legend."""
    import matplotlib  # deferred: heavy, plots only (matplotlib)

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # deferred: heavy, plots only (matplotlib)

    display = display or {}
    x = np.asarray(budgets_tflops, float)
    fig, axes = plt.subplots(1, len(rewards), figsize=(5.2 * len(rewards), 4.0), squeeze=False)
    for j, r in enumerate(rewards):
        ax = axes[0, j]
        d = display.get(r)
        for name, c in curves.items():
            y = rescale(np.asarray(c)[:, j], d)
            label = name
            if gains and name in gains and gains[name] is not None:
                g = gains[name][j]
                if g is not None and np.isfinite(g) and name != "best-of-n":
                    label = f"{name} ({g:+.1f}% AUC)"
            line, = ax.plot(x, y, marker="o", markersize=2.5, linewidth=1.4, label=label)
            if stderr and name in stderr:
                s = np.asarray(stderr[name])[:, j] * (abs(float(d.get("scale", 1.0))) if d else 1.0)
                ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("budget per prompt (TFLOPs)")
        ax.set_ylabel(d.get("label", r) if d else r)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(r)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_save_figure(path, fig, dpi=120)
    finally:
        plt.close(fig)
    return path
