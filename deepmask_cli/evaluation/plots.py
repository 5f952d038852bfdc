"""The recall curves that compare proposal methods (``deepmask eval --plot``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepmask_cli.evaluation.recall import AREAS, IOU_THRESHOLDS
from deepmask_cli.viz.figures import pyplot, save_figure


def recall_figure(runs: dict[str, dict], out: str | Path, *, by_size: bool = False) -> Path:
    """The paper's pictures for comparing proposal methods, as one PNG.

    ``runs`` maps a label (e.g. a results file's name) to the
    ``{iou_type: RecallResult}`` of :func:`deepmask_cli.evaluation.recall.evaluate_recall`
    with ``curves=True``. One row per IoU type (masks, boxes); left: average
    recall (IoU 0.5:0.95) against the number of proposals, log scale; right:
    recall against the IoU threshold at 10, 100 and 1000 proposals. Colours
    tell the runs apart. ``by_size`` adds the left panel's curves for small,
    medium and large objects (dashed, dash-dot, dotted)."""
    plt = pyplot()

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
    return save_figure(fig, out)
