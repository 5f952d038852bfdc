"""Synthetic COCO-format data for the tests: coloured shapes on noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def shape_mask(h: int, w: int, kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "square":
        return (np.abs(xx + 0.5 - cx) < r) & (np.abs(yy + 0.5 - cy) < r)
    d = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
    if kind == "disc":
        return d < r
    return (d < r) & (d > r / 2)  # donut


def make_coco(root: Path, n_images: int = 6, size: tuple[int, int] = (128, 160), seed: int = 0,
              per_image: int = 2, polygons: bool = False, crowd: bool = True) -> Path:
    """Write ``root/images/*.jpg`` and ``root/instances.json``; return ``root``."""
    rng = np.random.default_rng(seed)
    h, w = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n_images):
        img = rng.integers(0, 80, size=(h, w, 3)).astype(np.uint8)
        for k in range(per_image):
            kind = ["square", "disc", "donut"][(i + k) % 3]
            r = rng.uniform(14, 30)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            m = shape_mask(h, w, kind, cx, cy, r)
            img[m] = rng.integers(120, 255, size=3)
            if polygons and kind == "square":
                x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
                seg = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            else:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                seg = {"size": [h, w], "counts": rle["counts"].decode()}
            x, y, bw, bh = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))).tolist()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "segmentation": seg,
                         "area": float(m.sum()), "bbox": [x, y, bw, bh], "iscrowd": 0})
        if crowd and i == 0:
            m = shape_mask(h, w, "square", 8, 8, 6)
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 1,
                         "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                         "area": float(m.sum()), "bbox": [2, 2, 12, 12]})
        name = f"img{i:03d}.jpg"
        Image.fromarray(img).save(root / "images" / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (root / "instances.json").write_text(json.dumps(data))
    return root
