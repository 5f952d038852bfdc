"""COCO-format training data: where a dataset's files are, and its
instances file read into :class:`ImageRecord` s (the images that can be
trained on, each with its objects as RLE masks), with a report of what was
skipped and why. The patches cut from them are :mod:`deepmask_cli.training.patches`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from pycocotools import mask as mask_utils

from deepmask_cli.formats.coco import CocoFileError, read_category_ids, read_instances_leniently
from deepmask_cli.core.config import SamplerConfig
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
    """One object of an image: its mask as a COCO RLE, its box, and whether
    it may be a positive."""

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
            ids = read_category_ids(ann_file)
        except CocoFileError:
            raise DataError(f"{ann_file}: cannot read its categories for --categories non-voc") from None
        return ids - VOC_CATEGORIES
    try:
        ids = frozenset(int(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise DataError(f"--categories {spec!r}: give voc, non-voc or category ids like 1,2,3") from None
    if not ids:
        raise DataError("--categories: no category id given")
    return ids


@dataclass
class ImageRecord:
    """A training image: its file, the size its annotations were made for,
    and its objects."""

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
        coco = read_instances_leniently(ann_file)
    except CocoFileError as e:
        raise DataError(str(e)) from None
    # an image entry without a usable id, name or size counts as a bad annotation
    report: dict[str, Any] = {"missing_images": [], "bad_images": [], "bad_annotations": coco.bad_images, "crowd": 0,
                              "tiny": 0, "other_categories": 0}
    by_image: dict[Any, list[dict]] = {}
    for a in coco.annotations:
        if categories is not None and a.get("category_id") not in categories:
            report["other_categories"] += 1  # not labelled at all: background, as for the paper's VOC-only run
            continue
        by_image.setdefault(a["image_id"], []).append(a)
    records = []
    for im in coco.images:
        path = images_dir / im.file_name
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
        for a in by_image.get(im.id, []):
            inst = _instance(a, im.height, im.width, sampler)
            if inst is None:
                report["bad_annotations"] += 1
                continue
            report["crowd"] += inst.crowd
            report["tiny"] += (not inst.crowd) and not inst.usable
            insts.append(inst)
        records.append(ImageRecord(path, im.width, im.height, insts))
    bad = report["missing_images"] + report["bad_images"]
    if bad and not skip_bad_images:
        raise DataError(f"{bad[0]}: missing or unreadable ({len(bad)} such images); fix them or allow skipping")
    if not any(i.usable for r in records for i in r.instances):
        raise DataError(f"{ann_file}: no usable object (non-crowd, area >= {sampler.min_object_area:g}) in any readable image")
    return records, report


def _instance(a: dict, h: int, w: int, sampler: SamplerConfig) -> Instance | None:
    """One annotation's instance, or ``None`` for one that is not a mask of
    its image (counted as a bad annotation and skipped): a segmentation that
    :func:`~deepmask_cli.formats.rle.normalise` refuses, or an empty mask
    (polygons of fewer than three points, which it drops, included)."""
    try:
        rle = normalise(a.get("segmentation"), h, w, lenient=True)
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


def record_image(rec: ImageRecord) -> Image.Image:
    """The record's image as RGB, at the size its annotations were made for."""
    img = load_image(rec.path, exif=False)
    if (img.width, img.height) != (rec.width, rec.height):
        img = img.resize((rec.width, rec.height), Image.BILINEAR)
    return img
