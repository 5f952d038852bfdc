"""Training curves as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import os
from pathlib import Path

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
