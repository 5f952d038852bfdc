"""Copy-paste augmentation (Ghiasi et al., "Simple Copy-Paste is a Strong
Data Augmentation Method for Instance Segmentation", CVPR 2021).

A composite is a training image with objects of another training image
pasted on it: a random subset of the other image's usable objects, flipped
or not, rescaled by a random factor (2^-1 to 2^1) and put at a random place,
pixels copied where their masks are (no blending: Ghiasi et al. found it did
not matter). The pasted objects occlude the image's own: their masks lose the
covered pixels, and an object left below the usable size is no longer a
positive (one left with no pixel is dropped). So every object is seen in new
contexts, at new scales and as an occluder.

``deepmask train --copy-paste N`` adds ``N`` composites to the training
images. They are made before training, written to the run folder as JPEG
files (the feature cache and the patch path read them as any other image),
and are a pure function of ``(seed, index)``: a resumed run, or every
process of a torchrun, makes the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from deepmask_cli.core.config import SamplerConfig
from deepmask_cli.training.data import ImageRecord, Instance, instance_from_rle, record_image
from deepmask_cli.core.files import atomic_write

#: Octaves of the pasted objects' random rescaling, each way.
SCALE_OCTAVES = 1.0


def _instance(mask: np.ndarray, crowd: bool, sampler: SamplerConfig) -> Instance | None:
    """An :class:`Instance` of a whole-image boolean mask; None when empty."""
    return instance_from_rle(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))), crowd, sampler)


def composite(base: Image.Image, base_rec: ImageRecord, src: Image.Image, src_rec: ImageRecord,
              rng: np.random.Generator, sampler: SamplerConfig) -> tuple[Image.Image, list[Instance]]:
    """``base`` with some of ``src``'s usable objects pasted on it: the new
    image and its instances (``base``'s, less what the pasted objects cover,
    then the pasted ones)."""
    chosen = [j for j, inst in enumerate(src_rec.instances) if inst.usable and rng.random() < 0.5]
    if not chosen:
        usable = [j for j, inst in enumerate(src_rec.instances) if inst.usable]
        chosen = [usable[int(rng.integers(len(usable)))]]
    masks = np.stack([mask_utils.decode(src_rec.instances[j].rle).astype(bool) for j in chosen])
    ys, xs = np.nonzero(masks.any(0))
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    W, H = base.size
    s = 2.0 ** rng.uniform(-SCALE_OCTAVES, SCALE_OCTAVES)
    s = min(s, max(W, H) / max(x1 - x0, y1 - y0))  # no bigger than the base image
    w, h = max(1, round((x1 - x0) * s)), max(1, round((y1 - y0) * s))
    piece = np.asarray(src.crop((x0, y0, x1, y1)).resize((w, h), Image.BILINEAR))
    # each mask resized as a fraction, then cut at one half: the object keeps its shape at any scale
    pm = np.stack([np.asarray(Image.fromarray(m[y0:y1, x0:x1].astype(np.float32)).resize((w, h), Image.BILINEAR)) >= 0.5
                   for m in masks])
    if rng.random() < 0.5:
        piece, pm = piece[:, ::-1], pm[:, :, ::-1]
    # top-left corner: anywhere the piece fits, or anywhere it covers the image when it does not
    ty = int(rng.integers(min(0, H - h), max(0, H - h) + 1))
    tx = int(rng.integers(min(0, W - w), max(0, W - w) + 1))
    # the part of the piece inside the image
    cy0, cx0 = max(0, -ty), max(0, -tx)
    cy1, cx1 = min(h, H - ty), min(w, W - tx)
    placed = np.zeros((len(chosen), H, W), bool)
    placed[:, ty + cy0: ty + cy1, tx + cx0: tx + cx1] = pm[:, cy0:cy1, cx0:cx1]
    cover = placed.any(0)
    out = np.array(base.convert("RGB"))
    inside = np.zeros((H, W, 3), np.uint8)
    inside[ty + cy0: ty + cy1, tx + cx0: tx + cx1] = piece[cy0:cy1, cx0:cx1]
    out[cover] = inside[cover]
    instances = []
    for inst in base_rec.instances:
        kept = _instance(mask_utils.decode(inst.rle).astype(bool) & ~cover, inst.crowd, sampler)
        if kept is not None:
            instances.append(kept)
    for m in placed:
        new = _instance(m, False, sampler)
        if new is not None:
            instances.append(new)
    return Image.fromarray(out), instances


def make_composites(records: Sequence[ImageRecord], n: int, out_dir: str | Path, *, seed: int = 0,
                    sampler: SamplerConfig | None = None) -> list[ImageRecord]:
    """``n`` composites of ``records``: composite ``k`` pastes objects of a
    random other image on image ``k mod len(records)``, drawn from
    ``(seed, k)``. Each is written to ``out_dir`` (JPEG, quality 95,
    atomically: processes of one run that write the same composite write the
    same bytes) and returned as an :class:`ImageRecord`."""
    sampler = sampler or SamplerConfig()
    donors = [i for i, r in enumerate(records) if any(inst.usable for inst in r.instances)]
    if n <= 0 or not donors:
        return []
    out_dir = Path(out_dir)
    out = []
    for k in range(n):
        rng = np.random.default_rng([seed, k, 23])
        b = k % len(records)
        others = [i for i in donors if i != b] or donors
        a = others[int(rng.integers(len(others)))]
        base_rec, src_rec = records[b], records[a]
        image, instances = composite(record_image(base_rec), base_rec, record_image(src_rec), src_rec, rng, sampler)
        path = out_dir / f"copy-paste-{seed}-{k:05d}.jpg"
        atomic_write(path, lambda f: image.save(f, format="JPEG", quality=95))
        out.append(ImageRecord(path, image.width, image.height, instances))
    return out

