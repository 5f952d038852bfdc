"""COCO-format training data and the paper's patch sampler.

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

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from deepmask_cli.formats.coco import CocoFileError, load_json
from deepmask_cli.core.config import ModelConfig, SamplerConfig
from deepmask_cli.core.errors import UserError
from deepmask_cli.formats.images import ImageError, load_image
from deepmask_cli.formats.rle import normalise


class DataError(UserError, ValueError):
    """A dataset that cannot be trained on; one line naming the file and the fix."""


# ----------------------------------------------------------------- locating data
def resolve_coco(
    root: str | Path | None = None, *, ann: str | Path | None = None, images: str | Path | None = None, split: str = "train"
) -> tuple[Path, Path]:
    """``(annotation file, images folder)`` of a COCO-style dataset.

    Accepts a folder holding ``instances.json`` and ``images/``, or COCO's own
    layout ``annotations/instances_<split>*.json`` with the images in
    ``<split>*/``; ``ann``/``images`` name them directly.
    """
    if ann is not None or images is not None:
        if ann is None or images is None:
            raise DataError("--ann and --images go together: name both the annotation file and the images folder")
        return Path(ann), Path(images)
    if root is None:
        raise DataError("name a dataset folder, or --ann FILE --images DIR")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    if (root / "instances.json").is_file():
        return root / "instances.json", root / "images"
    cands = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if cands:
        name = cands[-1].stem.split("instances_", 1)[1]
        return cands[-1], root / name
    raise DataError(
        f"{root}: found neither instances.json + images/ nor annotations/instances_{split}*.json; "
        "use --ann FILE --images DIR"
    )


def coco_val_split(root: str | Path | None) -> tuple[Path, Path] | None:
    """The validation split beside a training split in COCO's own layout
    (``annotations/instances_val*.json`` and its ``val*/`` folder), or None
    (a folder with ``instances.json`` holds one split only)."""
    if root is None or not Path(root).is_dir() or (Path(root) / "instances.json").is_file():
        return None
    try:
        ann, images = resolve_coco(root, split="val")
    except DataError:
        return None
    return (ann, images) if images.is_dir() else None


@dataclass
class Instance:
    bbox: tuple[float, float, float, float]  # x, y, w, h
    rle: dict
    crowd: bool
    usable: bool  # may be a positive (not crowd, not tiny)


#: COCO's ids of the 20 PASCAL VOC categories: the paper trained on these
#: alone to measure recall on the 60 others (its generalisation test).
VOC_CATEGORIES = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72})


def parse_categories(spec: str | None, ann_file: str | Path | None = None) -> frozenset[int] | None:
    """A category selection: ``voc`` (:data:`VOC_CATEGORIES`), ``non-voc``
    (every other category of ``ann_file``) or ids ``1,2,3``; None: all."""
    if spec is None:
        return None
    spec = spec.strip().lower()
    if spec == "voc":
        return VOC_CATEGORIES
    if spec == "non-voc":
        if ann_file is None:
            raise DataError("--categories non-voc needs the annotation file whose other categories it means")
        try:
            cats = load_json(ann_file, fix="").get("categories") or []
            ids = {int(c["id"]) for c in cats}
        except (CocoFileError, ValueError, TypeError, KeyError, AttributeError):
            raise DataError(f"{ann_file}: cannot read its categories for --categories non-voc") from None
        return frozenset(ids - VOC_CATEGORIES)
    try:
        ids = frozenset(int(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise DataError(f"--categories {spec!r}: give voc, non-voc or category ids like 1,2,3") from None
    if not ids:
        raise DataError("--categories: no category id given")
    return ids


def canonical_log2(bbox_xywh, object_size: int) -> float:
    """log2 of the scale (window pixels per image pixel) at which an object
    with this box has its longer side ``object_size``."""
    return math.log2(object_size / max(bbox_xywh[2], bbox_xywh[3]))


@dataclass
class ImageRecord:
    path: Path
    width: int
    height: int
    instances: list[Instance]


def load_coco(
    ann_file: str | Path,
    images_dir: str | Path,
    *,
    sampler: SamplerConfig | None = None,
    skip_bad_images: bool = True,
    check_decode: bool = False,
    categories: frozenset[int] | None = None,
) -> tuple[list[ImageRecord], dict[str, Any]]:
    """Read a COCO instances file into :class:`ImageRecord` s.

    Returns ``(records, report)`` where ``report`` counts what was skipped and
    why. With ``categories``, annotations of other categories are dropped (left
    unlabelled) and counted as ``other_categories``. Raises
    :class:`DataError` for a missing or non-COCO file or an empty dataset;
    missing or undecodable images are skipped (listed in the report) or fatal
    with ``skip_bad_images=False``.
    """
    sampler = sampler or SamplerConfig()
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: no such annotation file")
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: no such images folder")
    try:
        data = load_json(ann_file, fix="pass a COCO instances file")
    except CocoFileError as e:
        raise DataError(str(e)) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{ann_file}: not a COCO instances file (needs 'images' and 'annotations' lists)")
    report: dict[str, Any] = {"missing_images": [], "bad_images": [], "bad_annotations": 0, "crowd": 0, "tiny": 0,
                              "other_categories": 0}
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        if isinstance(a, dict) and "image_id" in a:
            if categories is not None and a.get("category_id") not in categories:
                report["other_categories"] += 1  # not labelled at all: background, as for the paper's VOC-only run
                continue
            by_image.setdefault(a["image_id"], []).append(a)
    records = []
    for im in data["images"]:
        try:
            iid, fname, w, h = im["id"], im["file_name"], int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError):
            report["bad_annotations"] += 1
            continue
        path = images_dir / fname
        if not path.is_file():
            report["missing_images"].append(str(path))
            continue
        if check_decode:
            try:
                load_image(path, exif=False)
            except ImageError as e:
                report["bad_images"].append(f"{path}: {e}")
                continue
        insts = []
        for a in by_image.get(iid, []):
            inst = _instance(a, h, w, sampler)
            if inst is None:
                report["bad_annotations"] += 1
                continue
            report["crowd"] += inst.crowd
            report["tiny"] += (not inst.crowd) and not inst.usable
            insts.append(inst)
        records.append(ImageRecord(path, w, h, insts))
    bad = report["missing_images"] + report["bad_images"]
    if bad and not skip_bad_images:
        raise DataError(f"{bad[0]}: missing or unreadable ({len(bad)} such images); fix them or allow skipping")
    if not any(i.usable for r in records for i in r.instances):
        raise DataError(f"{ann_file}: no usable object (non-crowd, area >= {sampler.min_object_area:g}) in any readable image")
    return records, report


def _instance(a: dict, h: int, w: int, sampler: SamplerConfig) -> Instance | None:
    """One annotation's instance, or ``None`` for one that is not a mask of
    its image (counted as a bad annotation and skipped)."""
    seg = a.get("segmentation")
    if isinstance(seg, list) and not any(isinstance(p, list) and len(p) >= 6 for p in seg):
        return None
    try:
        rle = normalise(seg, h, w, lenient=True)
        return instance_from_rle(rle, bool(a.get("iscrowd", 0)), sampler)
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def instance_from_rle(rle: dict, crowd: bool, sampler: SamplerConfig) -> Instance | None:
    """An :class:`Instance` of an RLE mask, its box and area read from it
    (None when empty): usable as a positive when not crowd and at least
    ``sampler``'s minimum area and side."""
    area = float(mask_utils.area(rle))
    x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
    if area <= 0 or bw <= 0 or bh <= 0:
        return None
    usable = (not crowd) and area >= sampler.min_object_area and min(bw, bh) >= sampler.min_object_side
    return Instance((x, y, bw, bh), rle, crowd, usable)


# ----------------------------------------------------------------- the sampler
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


def record_image(rec: ImageRecord) -> Image.Image:
    """The record's image as RGB, at the size its annotations were made for."""
    img = load_image(rec.path, exif=False)
    if (img.width, img.height) != (rec.width, rec.height):
        img = img.resize((rec.width, rec.height), Image.BILINEAR)
    return img


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
    """Sample ``i`` -> ``(patch (3, P, P) float in [0,1], mask (m, m) float {0,1}, label float ±1)``.

    Deterministic in ``(seed, i)``; ``len`` is nominal (the sampler draws fresh
    patches for every index).
    """

    def __init__(self, records: list[ImageRecord], model: ModelConfig, config: SamplerConfig, *, seed: int = 0,
                 fill=(0.5, 0.5, 0.5), length: int = 10**9, augment: bool = True, cache_images: bool = True):
        self.records = records
        self.model = model
        self.config = config
        self.sampler = PatchSampler(records, model, config)
        self.seed = seed
        self.fill = tuple(int(round(255 * v)) for v in fill)
        self.length = length
        self.augment = augment
        self.cache_images = cache_images
        self._cache: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return self.length

    def image(self, i: int) -> Image.Image:
        img = self._cache.get(i)
        if img is None:
            img = record_image(self.records[i])
            if self.cache_images:
                self._cache[i] = img
        return img

    def spec(self, index: int) -> PatchSpec:
        return self.sampler.draw(np.random.default_rng([self.seed, index]))

    def render(self, spec: PatchSpec, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, m = self.model.patch_size, self.model.mask_size
        patch = crop_resized(self.image(spec.image), spec.cx, spec.cy, spec.scale, p, self.fill)
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
