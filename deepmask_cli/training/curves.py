"""The curves of a training run (``curves.png``): loss and validation against steps."""

from __future__ import annotations

from pathlib import Path

from deepmask_cli.viz.figures import pyplot, save_figure


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Loss (smoothed) and validation curves from ``metrics.jsonl`` entries."""
    plt = pyplot()
    steps = [h for h in history if "loss" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("mask_loss", "score_loss"):
        ema, ys = None, []
        for h in steps:
            ema = h[key] if ema is None else 0.98 * ema + 0.02 * h[key]
            ys.append(ema)
        left.plot([h["step"] for h in steps], ys, label=key)
    vals = [h for h in history if "val" in h]
    # score_live: validations since it was added (a resumed older run's earlier ones lack it)
    for k in ("iou_mean", "iou@0.5", "iou@0.7", "score_acc", "score_live"):
        pts = [(h["step"], h["val"][k]) for h in vals if k in h["val"]]
        if pts:
            right.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=k)
    left.set(title="training loss (EMA)", xlabel="step")
    right.set(title="validation (per patch)", xlabel="step", ylim=(0, 1))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
