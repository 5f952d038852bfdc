"""The paper's patch sampler: which windows are positives and negatives, and
the patches and mask targets cut from them.

A patch is a square window of the image, given by its centre ``(cx, cy)`` in
image pixels and its scale ``s`` (patch pixels per image pixel); it covers
``patch_size / s`` image pixels and is resized to ``patch_size``. Where it
leaves the image it is filled with the trunk's mean colour (zero after
normalisation, the same neutral fill as inference's padding).

Labels follow the paper (Pinheiro et al. 2015, section 3.1): a patch is
positive when an object is centred in it within ``pos_shift`` patch pixels and
its longer side is ``object_size`` within ``pos_scale`` octaves; its mask target
is that object alone. A negative is at least ``neg_shift`` pixels or
``neg_scale`` octaves away from every object (crowd regions included), so the
in-between cases, which are neither, are never sampled.

Sample ``i`` of a dataset is drawn from a random generator seeded with
``(seed, i)``: the data of a run depends on nothing but the seed and the step,
whatever the number of workers or processes, which makes runs repeatable and
resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from deepmask_cli.core.config import ModelConfig, SamplerConfig
from deepmask_cli.training.data import ImageRecord, record_image


def canonical_log2(bbox_xywh, object_size: int) -> float:
    """log2 of the scale (window pixels per image pixel) at which an object
    with this box has its longer side ``object_size``."""
    return math.log2(object_size / max(bbox_xywh[2], bbox_xywh[3]))


@dataclass
class PatchSpec:
    """Where a patch comes from; all that a sample needs to be redrawn."""

    image: int
    cx: float
    cy: float
    scale: float  # patch pixels per image pixel
    flip: bool
    label: int  # +1 or -1
    instance: int  # index of the centred object for positives, -1 otherwise


def window_labels(cx: np.ndarray, cy: np.ndarray, log2s: float, objects: np.ndarray, usable: np.ndarray,
                  config: SamplerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's labelling rule for windows centred at image pixels
    ``(cx, cy)`` (arrays of one shape ``S``) at scale ``2**log2s``, against
    ``objects``: ``(K, 3)`` rows of centre x, centre y and canonical log2
    scale (:func:`canonical_log2`), ``usable`` ``(K,)`` marking those that
    may be positives. Distances are in window pixels. Returns

    - ``positive_of`` ``(*S, K)``: the object is centred within ``pos_shift``
      and at the canonical scale within ``pos_scale`` octaves (usable ones);
    - ``negative`` ``S``: no object within ``neg_shift`` and ``neg_scale``;
    - ``near`` ``S``: some object within ``3 neg_shift`` and ``neg_scale + 1``
      (where hard negatives are drawn).

    The patch sampler and the feature cache both label with it."""
    s = 2.0 ** log2s
    dist = np.hypot(cx[..., None] - objects[:, 0], cy[..., None] - objects[:, 1]) * s
    dlog = np.abs(log2s - objects[:, 2])
    positive_of = (dist <= config.pos_shift) & (dlog <= config.pos_scale) & usable
    negative = ~((dist < config.neg_shift) & (dlog < config.neg_scale)).any(-1)
    near = ((dist < 3 * config.neg_shift) & (dlog < config.neg_scale + 1)).any(-1)
    return positive_of, negative, near


class PatchSampler:
    """Draws :class:`PatchSpec` s following the paper's labelling rule."""

    def __init__(self, records: list[ImageRecord], model: ModelConfig, config: SamplerConfig, *, neg_log2_range=(-3.0, 1.5)):
        self.records = records
        self.model = model
        self.config = config
        self.neg_log2_range = neg_log2_range
        self.positives = [(i, j) for i, r in enumerate(records) for j, inst in enumerate(r.instances) if inst.usable]
        # per image: centres and canonical log2 scales of every object (crowd too)
        self._centres = []
        for r in records:
            c = np.array([[x + w / 2, y + h / 2, canonical_log2((x, y, w, h), model.object_size)]
                          for x, y, w, h in (i.bbox for i in r.instances)])
            self._centres.append(c.reshape(-1, 3))

    def is_negative(self, image: int, cx: float, cy: float, log2s: float) -> bool:
        """No object within ``neg_shift`` patch pixels and ``neg_scale`` octaves."""
        c = self._centres[image]
        _, negative, _ = window_labels(np.asarray(cx), np.asarray(cy), log2s, c, np.zeros(len(c), bool), self.config)
        return bool(negative)

    def draw(self, rng: np.random.Generator) -> PatchSpec:
        """A positive (with probability ``pos_fraction``) or a negative (a
        hard one, near an object, with probability ``hard_neg_fraction``),
        drawn with ``rng``."""
        cfg = self.config
        flip = bool(cfg.hflip and rng.random() < 0.5)
        if rng.random() < cfg.pos_fraction:
            i, j = self.positives[rng.integers(len(self.positives))]
            inst = self.records[i].instances[j]
            x, y, w, h = inst.bbox
            log2s = canonical_log2(inst.bbox, self.model.object_size) + rng.uniform(-cfg.pos_scale, cfg.pos_scale)
            s = 2.0**log2s
            # shift within a disc of radius pos_shift (patch pixels)
            r, a = cfg.pos_shift * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
            return PatchSpec(i, x + w / 2 + r * math.cos(a) / s, y + h / 2 + r * math.sin(a) / s, s, flip, 1, j)
        for _ in range(100):
            i = int(rng.integers(len(self.records)))
            rec = self.records[i]
            if rec.instances and rng.random() < cfg.hard_neg_fraction:
                # a hard negative: near an object, but shifted or scaled out of tolerance
                inst = rec.instances[rng.integers(len(rec.instances))]
                x, y, w, h = inst.bbox
                log2s = canonical_log2(inst.bbox, self.model.object_size) + rng.uniform(-2.0, 2.0)
                s = 2.0**log2s
                r, a = rng.uniform(0, 3 * cfg.neg_shift), rng.uniform(0, 2 * math.pi)
                cx, cy = x + w / 2 + r * math.cos(a) / s, y + h / 2 + r * math.sin(a) / s
            else:
                log2s = rng.uniform(*self.neg_log2_range)
                cx, cy = rng.uniform(0, rec.width), rng.uniform(0, rec.height)
            if self.is_negative(i, cx, cy, log2s):
                return PatchSpec(i, cx, cy, 2.0**log2s, flip, -1, -1)
        # An image crowded everywhere: fall back to a far-out scale.
        return PatchSpec(i, rec.width / 2, rec.height / 2, 2.0 ** self.neg_log2_range[0] / 4, flip, -1, -1)


def crop_resized(img: Image.Image, cx: float, cy: float, scale: float, size: int, fill, resample=Image.BILINEAR) -> Image.Image:
    """The ``size``-pixel square patch centred at ``(cx, cy)`` of an image scaled
    by ``scale``, filled with ``fill`` outside the image (antialiased when
    shrinking, as inference's pyramid is)."""
    half = size / (2 * scale)
    x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    ix0, iy0 = max(0.0, x0), max(0.0, y0)
    ix1, iy1 = min(float(img.width), x1), min(float(img.height), y1)
    out = Image.new(img.mode, (size, size), fill)
    if ix1 <= ix0 or iy1 <= iy0:
        return out
    # target rectangle of the visible part, in patch pixels
    tx0, ty0 = round((ix0 - x0) * scale), round((iy0 - y0) * scale)
    tx1, ty1 = round((ix1 - x0) * scale), round((iy1 - y0) * scale)
    if tx1 <= tx0 or ty1 <= ty0:
        return out
    piece = img.resize((tx1 - tx0, ty1 - ty0), resample, box=(ix0, iy0, ix1, iy1))
    out.paste(piece, (tx0, ty0))
    return out


def color_jitter(arr: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation jitter of an ``(H, W, 3)`` float image in [0, 1]."""
    if strength <= 0:
        return arr
    b, c, s = (1 + rng.uniform(-strength, strength) for _ in range(3))
    arr = arr * b
    mean = arr.mean()
    arr = (arr - mean) * c + mean
    gray = arr.mean(axis=2, keepdims=True)
    arr = (arr - gray) * s + gray
    return np.clip(arr, 0.0, 1.0)


class PatchDataset(torch.utils.data.Dataset):
    """Sample ``i`` -> ``(patch (3, P, P) float in [0,1], mask (m, m) float {0,1}, label float ±1)``
    (``P`` is the window's ``patch_size`` plus twice ``context``).

    Deterministic in ``(seed, i)``; ``len`` is nominal (the sampler draws fresh
    patches for every index).
    """

    def __init__(self, records: list[ImageRecord], model: ModelConfig, config: SamplerConfig, *, seed: int = 0,
                 fill=(0.5, 0.5, 0.5), length: int = 10**9, augment: bool = True, cache_images: bool = True,
                 context: int = 0):
        self.records = records
        self.model = model
        self.config = config
        self.sampler = PatchSampler(records, model, config)
        self.seed = seed
        self.fill = tuple(int(round(255 * v)) for v in fill)
        self.length = length
        self.augment = augment
        self.cache_images = cache_images
        #: Pixels of the image around each window in its patch (the mask
        #: target covers the window alone): SharpMask's refinement reads
        #: the window's crop of the patch's maps.
        self.context = context
        self._cache: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return self.length

    def image(self, i: int) -> Image.Image:
        """Record ``i``'s image (kept in memory with ``cache_images``)."""
        img = self._cache.get(i)
        if img is None:
            img = record_image(self.records[i])
            if self.cache_images:
                self._cache[i] = img
        return img

    def spec(self, index: int) -> PatchSpec:
        """Where sample ``index`` comes from: a pure function of ``(seed, index)``."""
        return self.sampler.draw(np.random.default_rng([self.seed, index]))

    def render(self, spec: PatchSpec, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The patch, mask target and label of ``spec``; colour-jittered with
        ``rng`` when the dataset augments and one is given."""
        p, m = self.model.patch_size, self.model.mask_size
        patch = crop_resized(self.image(spec.image), spec.cx, spec.cy, spec.scale, p + 2 * self.context, self.fill)
        arr = np.asarray(patch, dtype=np.float32) / 255.0
        if self.augment and rng is not None:
            arr = color_jitter(arr, rng, self.config.color_jitter)
        if spec.label > 0:
            inst = self.records[spec.image].instances[spec.instance]
            full = Image.fromarray(mask_utils.decode(inst.rle) * 255)
            tgt = crop_resized(full, spec.cx, spec.cy, spec.scale * m / p, m, 0)
            mask = (np.asarray(tgt) >= 128).astype(np.float32)
        else:
            mask = np.zeros((m, m), np.float32)
        if spec.flip:
            arr, mask = arr[:, ::-1], mask[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        return x, torch.from_numpy(np.ascontiguousarray(mask)), torch.tensor(float(spec.label))

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, index, 1])
        return self.render(self.spec(index), rng)
