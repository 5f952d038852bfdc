"""Plots: training curves drawn with Pillow, and recall curves drawn with matplotlib (an optional extra)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _panel(draw: ImageDraw.ImageDraw, box, series: dict[str, list[tuple[float, float]]], title: str, colors) -> None:
    x0, y0, x1, y1 = box
    font = ImageFont.load_default()
    draw.rectangle(box, outline=(90, 90, 90))
    draw.text((x0 + 6, y0 + 4), title, fill=(20, 20, 20), font=font)
    pts = [p for s in series.values() for p in s]
    if not pts:
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xmin, xmax = min(xs), max(xs)
    ymin, ymax = min(ys), max(ys)
    if xmax == xmin:
        xmax = xmin + 1
    if ymax == ymin:
        ymax = ymin + 1e-6
    px0, py0, px1, py1 = x0 + 50, y0 + 22, x1 - 10, y1 - 22

    def tr(x: float, y: float) -> tuple[float, float]:
        return px0 + (x - xmin) / (xmax - xmin) * (px1 - px0), py1 - (y - ymin) / (ymax - ymin) * (py1 - py0)

    for v in (ymin, (ymin + ymax) / 2, ymax):
        _, ty = tr(xmin, v)
        draw.line([(px0, ty), (px1, ty)], fill=(225, 225, 225))
        draw.text((x0 + 4, ty - 6), f"{v:.3g}", fill=(60, 60, 60), font=font)
    draw.text((px0, py1 + 6), f"step {xmin:g}", fill=(60, 60, 60), font=font)
    draw.text((px1 - 70, py1 + 6), f"step {xmax:g}", fill=(60, 60, 60), font=font)
    ly = y0 + 4
    for (name, s), c in zip(series.items(), colors):
        if len(s) > 1:
            draw.line([tr(*p) for p in s], fill=c, width=2)
        elif s:
            cx, cy = tr(*s[0])
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=c)
        draw.text((x1 - 130, ly), name, fill=c, font=font)
        ly += 12


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Loss (smoothed) and validation curves from ``metrics.jsonl`` entries."""
    path = Path(path)
    img = Image.new("RGB", (900, 360), "white")
    draw = ImageDraw.Draw(img)
    steps = [h for h in history if "loss" in h]
    smooth: dict[str, list[tuple[float, float]]] = {"mask_loss": [], "score_loss": []}
    for key in smooth:
        ema = None
        for h in steps:
            ema = h[key] if ema is None else 0.98 * ema + 0.02 * h[key]
            smooth[key].append((h["step"], ema))
    vals = [h for h in history if "val" in h]
    # score_live: validations since it was added (a resumed older run's earlier ones lack it)
    val_series = {k: [(h["step"], h["val"][k]) for h in vals if k in h["val"]]
                  for k in ("iou_mean", "iou@0.5", "iou@0.7", "score_acc", "score_live")}
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    _panel(draw, (5, 5, 445, 355), smooth, "training loss (EMA)", palette)
    _panel(draw, (455, 5, 895, 355), val_series, "validation (per patch)", palette)
    tmp = path.with_name(path.name + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
    return path


def recall_figure(runs: dict[str, dict], out: str | Path, *, by_size: bool = False) -> Path:
    """The paper's pictures for comparing proposal methods, as one PNG.

    ``runs`` maps a label (e.g. a results file's name) to the
    ``{iou_type: RecallResult}`` of :func:`deepmask_cli.evaluate.evaluate_recall`
    with ``curves=True``. One row per IoU type (masks, boxes); left: average
    recall (IoU 0.5:0.95) against the number of proposals, log scale; right:
    recall against the IoU threshold at 10, 100 and 1000 proposals. Colours
    tell the runs apart. ``by_size`` adds the left panel's curves for small,
    medium and large objects (dashed, dash-dot, dotted). Needs matplotlib
    (``pip install 'deepmask[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'deepmask[plot]'") from None
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
                ar = _mean_over_iou(r[:, AREAS.index(a), :])
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _mean_over_iou(recall: np.ndarray) -> np.ndarray:
    """Average recall per column over IoU thresholds, -1 where there is no ground truth."""
    valid = recall > -1
    sums = np.where(valid, recall, 0).sum(0)
    n = valid.sum(0)
    return np.where(n > 0, sums / np.maximum(n, 1), -1.0)
