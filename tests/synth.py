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


def unit_scale_(model, *, seed: int = 0, batch: int = 8):
    """Give a randomly initialised DeepMask activations of unit scale, in place.

    PyTorch's default initialisation shrinks the signal at each of the
    trunk's layers, so a random Lite0 gives a map with a standard deviation
    near 1e-6: every window then scores the same and ties decide the tests.
    Each convolution and linear layer, in the order the data meets them, is
    rescaled so that its output has unit standard deviation on smooth random
    patches (the layer-sequential unit-variance init of Mishkin and Matas,
    2016, without its orthogonal start), in one pass: a hook rescales the
    layer and hands the rescaled output on. The last layer of each head
    (the logits) is centred too, so that scores and mask pixels fall on both
    sides of any threshold. Deterministic for a given seed.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    p = model.config.patch_size
    small = torch.rand(batch, 3, max(2, p // 8), max(2, p // 8), generator=g)
    patches = F.interpolate(small, size=(p, p), mode="bilinear", align_corners=False)
    logits = {model.mask_head.fc2, model.score_head.fc3}
    if model.refine_head is not None:
        logits.add(model.refine_head.predict)
        if not model.refine_head.predict.weight.any():  # a correction starts at zero; training moves it
            torch.nn.init.normal_(model.refine_head.predict.weight, generator=g)
    done = set()  # each layer once, though the refinement's pass meets the trunk again

    def rescale(layer, _inputs, out):
        if layer in done:
            return None
        done.add(layer)
        with torch.no_grad():
            std = out.std()
            if std > 0:
                layer.weight.div_(std)
                if layer.bias is not None:
                    layer.bias.div_(std)
                out = out / std
            if layer in logits:
                mean = out.mean()
                layer.bias.sub_(mean)
                out = out - mean
        return out

    handles = [m.register_forward_hook(rescale) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model.eval()
        with torch.no_grad():
            model(patches)
            if model.refine_head is not None:
                model.refined_masks(patches)
    finally:
        for h in handles:
            h.remove()
    return model


def tiny_config():
    """A tiny DeepMask: 64-pixel patches, 4x4 feature windows, 16x16 masks."""
    from deepmask_cli.core.config import ModelConfig

    return ModelConfig(trunk="efficientnet-lite0", patch_size=64, object_size=40, mask_size=16,
                       mask_channels=8, mask_hidden=32, score_hidden=(16, 16), dropout=0.0)


def tiny_model(config=None, seed: int = 0):
    """A random tiny DeepMask (``config``: :func:`tiny_config`) with
    activations of unit scale (:func:`unit_scale_`), so that its windows'
    scores differ."""
    import torch

    from deepmask_cli.modeling.model import DeepMask

    torch.manual_seed(seed)
    return unit_scale_(DeepMask(config or tiny_config()), seed=seed)


def fail_on_pass(proposer, n: int, message: str) -> None:
    """Make ``proposer``'s ``n``-th dense pass raise ``RuntimeError(message)``
    (a network that dies mid-run), the others run as usual."""
    real, calls = proposer.dense_pass, []

    def dense_pass(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError(message)
        return real(*a, **kw)

    proposer.dense_pass = dense_pass


def trunk_levels_calls(proposer) -> list[int]:
    """Record each call of ``proposer``'s trunk's ``levels`` (its ``last``
    stride) in the list returned, the calls running as usual: how often a
    proposer ran the trunk for its finer maps."""
    calls, real = [], proposer.trunk.levels
    proposer.trunk.levels = lambda x, last=16: calls.append(last) or real(x, last)
    return calls


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (for
    torchrun's --master-port, so that runs side by side do not collide)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
