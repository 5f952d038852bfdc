"""Image to network input: pixels to a float tensor, and the geometry of the
pyramid (each level's size, its zero-padded canvas, canvas buckets), shared
by inference, the feature cache and quantization."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from deepmask_cli.core.config import TRUNK_STRIDE


def image_to_tensor(image: Image.Image | np.ndarray | torch.Tensor, device: torch.device | str | None = None
                    ) -> torch.Tensor:
    """A PIL image, an ``(H, W[, C])`` uint8/float array or a ``(3, H, W)``
    float tensor in ``[0, 1]`` -> ``(3, H, W)`` float32 in ``[0, 1]``, on
    ``device`` (8-bit pixels travel there as bytes, a quarter of the floats)."""
    if isinstance(image, torch.Tensor):
        t = image.to(device).float()
        if t.dim() == 2:
            t = t[None].expand(3, -1, -1)
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W), got {tuple(image.shape)}")
        return t
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        arr = np.asarray(image)
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"an array image must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    arr = np.ascontiguousarray(arr[:, :, :3])
    if not arr.flags.writeable:  # e.g. np.asarray of a PIL image
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(2, 0, 1)
    if t.dtype == torch.uint8:
        return t.to(device).float().div_(255)
    if t.dtype == torch.uint16:
        return t.float().div_(65535).to(device)
    return t.float().to(device)


def level_size(height: int, width: int, scale: float, max_side: int) -> tuple[int, int]:
    """The size an image is resized to for pyramid ``scale``, its longer side
    first capped at ``max_side``."""
    cap = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale * cap)), max(1, round(width * scale * cap))


def pyramid_canvas(images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], patch_size: int, normalize,
                   min_size: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """One pyramid level for the trunk: ``(B, 3, Hc, Wc)``.

    Each ``(3, H, W)`` image is resized to its ``(h, w)`` (antialiased when
    shrinking), normalised (``normalize=None``: the images already are; the
    two orders agree, as resampling weights sum to one), and placed half a
    window in from the top-left corner of a zero canvas (zero is the trunk's
    mean colour after normalisation: the neutral fill), at least as large as
    an image of ``min_size`` would need. The canvas leaves at least half a window
    beyond every image and its sides are multiples of the trunk's stride, so
    the window whose top-left cell is ``(i, j)`` is centred on resized pixel
    ``(16 i, 16 j)``.
    """
    half = patch_size // 2
    hc = max(canvas_cells(max(h, min_size[0]), patch_size) for h, _ in sizes) * TRUNK_STRIDE
    wc = max(canvas_cells(max(w, min_size[1]), patch_size) for _, w in sizes) * TRUNK_STRIDE
    canvas = images[0].new_zeros(len(images), 3, hc, wc)
    for b, (t, (h, w)) in enumerate(zip(images, sizes)):
        down = h < t.shape[1] or w < t.shape[2]
        resized = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False, antialias=down)
        canvas[b, :, half : half + h, half : half + w] = resized[0] if normalize is None else normalize(resized)[0]
    return canvas


def canvas_cells(size: int, patch_size: int) -> int:
    """Trunk cells along a side of ``size`` resized pixels once padded: an
    image side has ``canvas_cells - feat_size + 1`` window positions."""
    return math.ceil((size + patch_size) / TRUNK_STRIDE)


#: Canvas buckets on a GPU when ``shape_bucket`` is -1 (see
#: :class:`InferenceConfig`): 128-pixel steps, at least 640 (COCO's photos,
#: 640 pixels or less, then share one shape; 2048-pixel ones get their own).
GPU_SHAPE_BUCKET, GPU_MIN_SIDE = 128, 640


def canvas_side(longest: int, bucket: int, min_side: int = 0) -> int:
    """The side of the square canvas (at scale 1) for a batch whose longest
    image side is ``longest``: rounded up to a multiple of ``bucket``, at
    least ``min_side``; 0 (canvases fit to the images) without a bucket."""
    return max(min_side, math.ceil(longest / bucket) * bucket) if bucket else 0

