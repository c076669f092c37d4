"""Matplotlib figures of trajectories."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def top_component_curves(ax, trajectory, k: int = 10, x: str = "time", title=None):
    """Plot the `k` components with the largest final norm over time (or loss)."""
    norms = np.asarray(trajectory["component_norms"])
    top = np.argsort(norms[-1])[::-1][:k]
    x_values = xs(trajectory, x)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(top)))
    for c, r in zip(colors, top):
        ax.plot(x_values, norms[:, r], color=c, lw=1.5)
    _axes(ax, x)
    ax.set_ylabel("component norm")
    if title:
        ax.set_title(title)


def xs(trajectory, x):
    """The x values of a trajectory's saves: flow time, or the loss."""
    if x == "loss":
        return np.asarray(trajectory["loss"])
    return np.asarray(trajectory.ts)


def _axes(ax, x):
    if x == "loss":
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("loss (decreasing →)")
    else:
        ax.set_xlabel("flow time t")
    ax.grid(alpha=0.3)


def curve(ax, trajectory, name: str, x: str = "time", label=None, **kw):
    """Plot a scalar observer over time (or loss) on a log y-axis."""
    ax.plot(xs(trajectory, x), np.asarray(trajectory[name]), label=label, **kw)
    ax.set_yscale("log")
    _axes(ax, x)


def save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
