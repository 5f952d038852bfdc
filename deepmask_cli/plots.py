"""Plots with matplotlib: a training run's curves and the recall curves that compare proposal methods."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path``, written under a temporary name and renamed."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Loss (smoothed) and validation curves from ``metrics.jsonl`` entries."""
    plt = _pyplot()
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
    return _save(fig, path)


def recall_figure(runs: dict[str, dict], out: str | Path, *, by_size: bool = False) -> Path:
    """The paper's pictures for comparing proposal methods, as one PNG.

    ``runs`` maps a label (e.g. a results file's name) to the
    ``{iou_type: RecallResult}`` of :func:`deepmask_cli.evaluate.evaluate_recall`
    with ``curves=True``. One row per IoU type (masks, boxes); left: average
    recall (IoU 0.5:0.95) against the number of proposals, log scale; right:
    recall against the IoU threshold at 10, 100 and 1000 proposals. Colours
    tell the runs apart. ``by_size`` adds the left panel's curves for small,
    medium and large objects (dashed, dash-dot, dotted)."""
    plt = _pyplot()
    from .evaluate import AREAS, IOU_THRESHOLDS

    types = [t for t in ("segm", "bbox") if any(t in r for r in runs.values())]
    fig, axes = plt.subplots(len(types), 2, figsize=(11, 4.2 * len(types)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    size_styles = {"small": "--", "medium": "-.", "large": ":"}
    k_styles = {10: ":", 100: "--", 1000: "-"}
    for row, t in enumerate(types):
        left, right = axes[row]
        for i, (label, res) in enumerate(runs.items()):
            if t not in res or res[t].recall is None:
                continue
            r, dets, c = res[t].recall, list(res[t].max_dets), colors[i % len(colors)]
            for a in ("all", *(AREAS[1:] if by_size else ())):
                ar = res[t].ar_curve(a)
                keep = ar >= 0
                left.plot(np.array(dets)[keep], ar[keep], size_styles.get(a, "-"), color=c, marker="." if a == "all" else None,
                          label=label if a == "all" else None)
            for k in (10, 100, 1000):
                if k in dets and (r[:, 0, dets.index(k)] >= 0).all():
                    right.plot(IOU_THRESHOLDS, r[:, 0, dets.index(k)], k_styles[k], color=c, label=f"{label} @{k}")
        name = {"segm": "masks", "bbox": "boxes"}[t]
        left.set(xscale="log", xlabel="proposals per image", ylabel="average recall (IoU 0.5:0.95)",
                 title=f"{name}: recall against proposals" + (" (- all, -- small, -. medium, : large)" if by_size else ""),
                 ylim=(0, 1))
        right.set(xlabel="IoU threshold", ylabel="recall", title=f"{name}: recall against IoU (: 10, -- 100, - 1000)",
                  xlim=(0.5, 0.95), ylim=(0, 1))
        for ax in (left, right):
            ax.grid(alpha=0.3)
        left.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)
