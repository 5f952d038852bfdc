"""Run-length encoding of masks, with pycocotools (COCO's own C code)."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils


def encode(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """``masks: (K, H, W)`` bool -> K COCO RLEs ``{"size": [H, W], "counts": str}``.

    pycocotools wants a Fortran-ordered ``(H, W, K)`` uint8 array; the masks that
    :func:`deepmask_cli.postprocess.paste_masks` returns are already laid out so
    that this needs no copy.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu()
        kwh = masks.transpose(1, 2).contiguous().numpy()  # a no-op for pasted masks
        arr = kwh.view(np.uint8).transpose(2, 1, 0)
    else:
        arr = np.asfortranarray(np.asarray(masks, dtype=bool).transpose(1, 2, 0)).view(np.uint8)
    if arr.shape[2] == 0:
        return []
    rles = mask_utils.encode(arr)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def decode(rles: list[dict]) -> np.ndarray:
    """K COCO RLEs (compressed ``counts`` as str or bytes) -> ``(K, H, W)`` bool."""
    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    fixed = [to_bytes(r) for r in rles]
    return mask_utils.decode(fixed).transpose(2, 0, 1).astype(bool)


def to_bytes(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        return mask_utils.frPyObjects(rle, *rle["size"])
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def area(rles: list[dict]) -> np.ndarray:
    """Pixel counts. (pycocotools' ``area`` on a list of more than 255 RLEs
    overflows a uint8 on numpy 2, so it is called in chunks of 255.)"""
    if not rles:
        return np.zeros(0)
    objs = [to_bytes(r) for r in rles]
    return np.concatenate([mask_utils.area(objs[i : i + 255]) for i in range(0, len(objs), 255)]).astype(np.float64)


def iou(rles_a: list[dict], rles_b: list[dict]) -> np.ndarray:
    """Pairwise mask IoU ``(len(a), len(b))``."""
    if not rles_a or not rles_b:
        return np.zeros((len(rles_a), len(rles_b)))
    a = [to_bytes(r) for r in rles_a]
    b = [to_bytes(r) for r in rles_b]
    return np.asarray(mask_utils.iou(a, b, [0] * len(b)), dtype=np.float64).reshape(len(a), len(b))
