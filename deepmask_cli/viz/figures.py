"""Matplotlib set-up shared by every figure deepmask draws: files only, written atomically."""

from __future__ import annotations

from pathlib import Path

from deepmask_cli.core.files import atomic_write


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported when a figure is drawn (not at start-up)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path``, written under a temporary name and renamed."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)
